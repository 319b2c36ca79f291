"""Slides per hour against the slide group size S, N CPU ranks, a fixed K.

N ranks (gloo, one thread each) run the real ``Trainer`` with
``SlideParallelStrategy(slide_group_size=S)`` for every divisor S of N: G = N / S groups each
train one slide per step, each rank encoding K / S of its slide's tiles (resnet18 by default,
AdamW, the GMA aggregator on each group's rank 0). A step is timed on rank 0 from batch start to
batch end (every rank waits for the step's world all-reduce, so it is the world's step); the
median over the steps after 2 warm-up ones gives slides per hour = 3600 * G / step seconds. The
sizes run in turn, twice (S descending, then ascending), and each S reports the mean of its two
medians, so a drift in the machine's load touches every S alike. Printed: the table and each S's
slides per hour relative to S = N (one group, every rank on one slide).

    python benchmarks/slide_groups.py [--ranks 4] [--model resnet18] [--k 32] [--size 112]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_wsi import SlideModule, SlideParallelStrategy


def slides(n: int, k: int, size: int) -> list[dict]:
    """``n`` slides of ``k`` random tiles, alternating labels."""
    g = torch.Generator().manual_seed(0)
    return [
        {
            "tiles": torch.randn(k, 3, size, size, generator=g),
            "coords": torch.arange(2 * k).view(k, 2) * size,
            "target": torch.tensor(i % 2),
            "slide_id": f"s{i}",
        }
        for i in range(n)
    ]


class StepTimer(L.Callback):
    """Seconds of every training step on rank 0, saved to ``out`` at the end."""

    def __init__(self, out: Path) -> None:
        self.out, self.times, self.start = out, [], 0.0

    def on_train_batch_start(self, *args) -> None:  # noqa: ANN002
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:  # noqa: ANN001, ANN002
        self.times.append(time.perf_counter() - self.start)

    def on_train_end(self, trainer, module) -> None:  # noqa: ANN001
        if trainer.global_rank == 0:
            torch.save(self.times, self.out)


def step_seconds(args: argparse.Namespace, group_size: int) -> float:
    """Median seconds of a step (after 2 warm-up steps) with groups of ``group_size`` ranks."""
    out = Path(tempfile.mkdtemp()) / "times.pt"
    groups = args.ranks // group_size
    strategy = SlideParallelStrategy(start_method="spawn", slide_group_size=group_size)
    module = SlideModule(args.model, "gma", "binary", lr_schedule="constant")
    trainer = L.Trainer(
        accelerator="cpu", devices=args.ranks, strategy=strategy, max_steps=args.steps + 2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[StepTimer(out)],
    )  # fmt: skip
    data = slides((args.steps + 2) * groups, args.k, args.size)
    trainer.fit(module, DataLoader(data, batch_size=None))  # each group: its slides (injected)
    return statistics.median(torch.load(out, weights_only=True)[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread per rank, inherited by spawned ranks
    sizes = [s for s in range(args.ranks, 0, -1) if args.ranks % s == 0]
    measured: dict[int, list[float]] = {s: [] for s in sizes}
    for size in sizes + sizes[::-1]:
        measured[size].append(step_seconds(args, size))
    print(
        f"{args.model}, K={args.k} tiles of {args.size} px, {args.ranks} CPU ranks (gloo, one "
        f"thread each), {os.cpu_count()} cores; median step of {args.steps}, mean of 2 runs"
    )
    print(f"{'S':>3} {'groups':>6} {'tiles/rank':>10} {'step s':>8} {'slides/h':>9} {'vs S=N':>7}")
    base = None
    for size in sizes:
        seconds = statistics.mean(measured[size])
        per_hour = 3600 * (args.ranks // size) / seconds
        base = base or per_hour
        print(
            f"{size:>3} {args.ranks // size:>6} {args.k / size:>10.1f} {seconds:>8.3f} "
            f"{per_hour:>9.0f} {per_hour / base:>7.2f}"
        )


if __name__ == "__main__":
    main()
