"""Throughput of a slide-parallel training step against bare encoder forward + backward.

Bare: one process using all its threads runs ``encoder(tiles)`` forward and backward on K tiles
(no aggregator, no optimiser, no Trainer). Slide-parallel: N CPU ranks (gloo, one thread each)
run the real ``Trainer`` step with ``SlideParallelStrategy``: each encodes K/N tiles, rank 0
aggregates, the feature gradient is scattered, gradients are all-reduced, AdamW steps. Both see
the same tiles; the ratio is tiles per second of slide-parallel over bare. Also printed: the
compute alone, each rank's bare forward + backward of its K/N tiles on one thread.

    python benchmarks/slide_parallel_overhead.py [--model resnet18] [--k 32] [--size 112]
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


def bare_seconds(model: str, k: int, size: int, steps: int, threads: int) -> float:
    """Median seconds of encoder forward + backward on k tiles."""
    torch.set_num_threads(threads)
    encoder = SlideModule(model, "gma", "binary").encoder
    tiles = slides(1, k, size)[0]["tiles"]
    times = []
    for _ in range(steps + 2):
        start = time.perf_counter()
        encoder(tiles).sum().backward()
        times.append(time.perf_counter() - start)
        encoder.zero_grad(set_to_none=True)
    return statistics.median(times[2:])


class StepTimer(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out, self.times, self.start = out, [], 0.0

    def on_train_batch_start(self, *args) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, *args) -> None:
        self.times.append(time.perf_counter() - self.start)

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_rank == 0:
            torch.save(self.times, self.out)


def trainer_seconds(
    model: str, k: int, size: int, steps: int, ranks: int | None, bucket_mb: float = 25.0
) -> float:
    """Median seconds of a Trainer step (after 2 warm-up steps): slide-parallel on ``ranks``
    one-thread processes, or ``None``: one process, all threads, Lightning's default strategy."""
    out = Path(tempfile.mkdtemp()) / "times.pt"
    options: dict = {}
    if ranks is not None:
        os.environ["OMP_NUM_THREADS"] = "1"  # one thread per rank, inherited by spawned ranks
        strategy = SlideParallelStrategy(start_method="spawn", bucket_cap_mb=bucket_mb)
        options = {"devices": ranks, "strategy": strategy}
    module = SlideModule(model, "gma", "binary", lr_schedule="constant")
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps + 2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[StepTimer(out)],
        **options,
    )  # fmt: skip
    trainer.fit(module, DataLoader(slides(steps + 2, k, size), batch_size=None))
    return statistics.median(torch.load(out, weights_only=True)[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    threads = torch.get_num_threads()
    bare = [bare_seconds(args.model, args.k, args.size, args.steps, threads)]
    single = trainer_seconds(args.model, args.k, args.size, args.steps, None)
    ours = trainer_seconds(args.model, args.k, args.size, args.steps, args.ranks, args.bucket_mb)
    torch.set_num_threads(threads)
    bare.append(bare_seconds(args.model, args.k, args.size, args.steps, threads))
    shard = bare_seconds(args.model, args.k // args.ranks, args.size, args.steps, 1)
    bare_s = statistics.mean(bare)
    print(
        f"{args.model}, K={args.k} tiles of {args.size} px, {args.ranks} CPU ranks (gloo), "
        f"one process on {threads} threads, gradient buckets of {args.bucket_mb:g} MB"
    )
    rows = [
        ("bare encoder fwd+bwd", bare_s, ""),
        ("compute alone, split", shard, " per rank"),
        ("1-process Trainer step", single, ""),
        ("slide-parallel Trainer step", ours, ""),
    ]
    for label, seconds, note in rows:
        print(f"{label:<28} {args.k / seconds:7.1f} tiles/s ({seconds:.3f} s{note})")
    print(
        f"slide-parallel / bare: {bare_s / ours:.2f}; / 1-process Trainer step: "
        f"{single / ours:.2f}; compute alone / bare: {bare_s / shard:.2f}"
    )


if __name__ == "__main__":
    main()
