"""Gradient equivalence per step, as the paper's Fig. 3: one process vs slide-parallel ranks.

Trains the same model on the same synthetic slides (SlideDataModule, real OpenSlide reads) as one
process with all K tiles and as N CPU ranks (gloo, Lightning's spawn launcher), optionally with
gradient caching, and records at every step the loss, and the gradients and parameters of a few
tracked layers. Prints, per step, the absolute loss difference and the normalised L1 difference
(sum |a - b| / sum |a|) of each tracked layer's gradient and parameters, and writes a PNG.

    python benchmarks/gradient_equivalence.py [--ranks 2 3] [--chunk 16] [--steps 12]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import lightning as L
import matplotlib
import torch

from lightning_wsi import SlideDataModule, SlideModule, SlideParallelStrategy
from lightning_wsi.data import make_synthetic_dataset

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TRACKED = {
    "encoder stem conv": "encoder.conv1.0.weight",
    "encoder last conv": "encoder.layer4.0.conv2.weight",
    "GMA projection": "aggregator.projection.0.weight",
    "GMA attention V": "aggregator.attention_v.0.weight",
    "head": "aggregator.head.1.weight",
}


class Track(L.Callback):
    """Per step: the loss, the tracked gradients (before the step) and parameters (after it)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.steps: list[dict] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        named = dict(module.named_parameters())
        self.steps.append({"grad": {n: named[n].grad.detach().clone() for n in TRACKED.values()}})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        named = dict(module.named_parameters())
        self.steps[-1]["param"] = {n: named[n].detach().clone() for n in TRACKED.values()}
        self.steps[-1]["loss"] = float(outputs["loss"])

    def on_train_end(self, trainer, module) -> None:
        torch.save(self.steps, self.out / f"rank{trainer.global_rank}.pt")


def run(manifest: Path, out: Path, devices: int | None, chunk: int | None, steps: int) -> list:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = SlideModule(
        "resnet10t", "gma", "binary", aggregator_kwargs={"hidden_dim": 64, "attention_dim": 32},
        encoder_lr=1e-3, aggregator_lr=1e-3, lr_schedule="constant",
    )  # fmt: skip
    dm = SlideDataModule(
        manifest, k=64, mpp=1.75, tile_size=64, val_fraction=0.0, progress=False,
        tiling_workers=0, encoder="resnet10t",
    )  # fmt: skip
    options = {}
    if devices is not None:
        options = {
            "devices": devices,
            "strategy": SlideParallelStrategy(encode_chunk_size=chunk, start_method="spawn"),
        }
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Track(out)], **options,
    )  # fmt: skip
    trainer.fit(module, dm)
    return torch.load(out / "rank0.pt", weights_only=True)


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normalised L1; 0 where both are exactly zero (a residual block's last convolution gets no
    gradient at step 0: timm zero-initialises the BatchNorm scale after it)."""
    diff, norm = float((a - b).abs().sum()), float(a.abs().sum())
    return diff / norm if norm > 0 else (0.0 if diff == 0 else float("inf"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--chunk", type=int, default=16, help="also run 2 ranks with this chunk")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--slides", type=int, default=12)
    parser.add_argument("--png", type=Path, default=Path("benchmarks/gradient_equivalence.png"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    root = Path(tempfile.mkdtemp())
    manifest = make_synthetic_dataset(root / "slides", n_slides=args.slides, progress=False)
    reference = run(manifest, root / "single", None, None, args.steps)
    runs = {f"{n} ranks": run(manifest, root / f"r{n}", n, None, args.steps) for n in args.ranks}
    if args.chunk:
        runs[f"2 ranks, chunk {args.chunk}"] = run(
            manifest, root / "chunk", 2, args.chunk, args.steps
        )

    print("resnet10t + GMA, K=64 tiles of 64 px per slide, AdamW; single process vs:")
    header = f"{'run':<18} {'step':>4} {'|loss diff|':>11}"
    header += "".join(f" {name[:16]:>16}" for name in TRACKED)
    print(header + "   (normalised L1: gradient / parameters)")
    rows = {}
    for label, steps in runs.items():
        rows[label] = []
        for i, (ours, ref) in enumerate(zip(steps, reference, strict=True)):
            loss = abs(ours["loss"] - ref["loss"])
            grads = [l1(ref["grad"][n], ours["grad"][n]) for n in TRACKED.values()]
            params = [l1(ref["param"][n], ours["param"][n]) for n in TRACKED.values()]
            rows[label].append((loss, grads, params))
            cells = "".join(f" {g:7.1e}/{p:7.1e}" for g, p in zip(grads, params, strict=True))
            print(f"{label:<18} {i:>4} {loss:>11.1e}{cells}")
        worst_g = max(max(g) for _, g, _ in rows[label])
        worst_p = max(max(p) for _, _, p in rows[label])
        worst_l = max(loss for loss, _, _ in rows[label])
        print(
            f"{label:<18} max  {worst_l:>11.1e}  gradients {worst_g:.1e}  parameters {worst_p:.1e}"
        )

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, values in rows.items():
        steps = range(len(values))
        axes[0].semilogy(steps, [max(v[0], 1e-12) for v in values], label=label)
        for j, name in enumerate(TRACKED):
            style = {"label": f"{label}: {name}", "alpha": 0.8}
            axes[1].semilogy(steps, [max(v[1][j], 1e-12) for v in values], **style)
            axes[2].semilogy(steps, [max(v[2][j], 1e-12) for v in values], **style)
    titles = ("absolute loss difference", "gradient, normalised L1", "parameters, normalised L1")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=5, ncol=2)
    fig.suptitle("Slide-parallel vs single process (float32, CPU, gloo)")
    fig.tight_layout()
    args.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.png, dpi=120)
    print(f"plot: {args.png}")


if __name__ == "__main__":
    main()
