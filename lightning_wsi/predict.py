"""Predict slides with a trained checkpoint: ``python -m lightning_wsi.predict CKPT MANIFEST``.

The manifest needs ``slide_id`` and ``path``; a ``label`` column, where given, is reported as
the target beside each prediction. Slides are read as in training (the checkpoint records the
data module's mpp, tile size and normalisation); every tissue tile of each slide (or
``--eval-k`` of them) is encoded, and ``predictions.csv`` and attention heatmaps are written. Bad
slides are named and skipped, never silently lost.

With ``--devices N`` (N > 1) prediction runs slide-parallel, as training does: every rank gets
every slide and encodes a contiguous shard of its tiles, rank 0 aggregates, and every rank gets
the same outputs; only global rank 0 writes the files and prints, so each slide appears once.
Lightning starts ranks 1..N-1 by running the same command again.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from lightning_wsi.data import SlideDataModule
from lightning_wsi.data.datamodule import BadSlideError
from lightning_wsi.data.manifest import ManifestError
from lightning_wsi.heatmaps import write_heatmaps
from lightning_wsi.models import SlideModule
from lightning_wsi.reports import known_lesions, write_predictions_csv

__all__ = ["main", "predict"]

_DATA_KEYS = (
    "mpp", "tile_size", "min_tissue_fraction", "task", "num_classes", "classes", "mean", "std",
    "slide_mpp", "eval_k",
)  # fmt: skip


def predict(
    checkpoint: Path,
    manifest: Path,
    out: Path,
    heatmaps: int = 6,
    accelerator: str = "auto",
    devices: int = 1,
    eval_k: int | None = None,
    num_workers: int = 1,
) -> list[dict]:
    """Predict every usable slide of ``manifest``; write predictions and heatmaps to ``out``.

    ``devices > 1`` runs ``strategy="slide_parallel"`` (one slide at a time, its tiles sharded
    over the ranks) rather than Lightning's default DDP, whose ranks would each predict a subset
    of the slides and each write their own ``predictions.csv`` to the same path. Every rank returns
    the predictions of every slide; only global rank 0 writes and prints.
    """
    strategy = _strategy(devices)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    module = SlideModule.load_from_checkpoint(checkpoint, map_location="cpu")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    data = dict(saved.get("datamodule_hyper_parameters") or {})
    kwargs = {k: data[k] for k in _DATA_KEYS if k in data}
    if eval_k is not None:
        kwargs["eval_k"] = eval_k
    datamodule = SlideDataModule(
        manifest, val_fraction=0.0, num_workers=num_workers, on_bad_slide="skip",
        require_labels=False, **kwargs,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    predictions = trainer.predict(module, datamodule=datamodule)
    if not trainer.is_global_zero:  # the same predictions as rank 0, which writes them
        return predictions
    out.mkdir(parents=True, exist_ok=True)
    write_predictions_csv(out / "predictions.csv", predictions)
    entries = {e.slide_id: e for split in datamodule.splits.values() for e in split}
    write_heatmaps(
        predictions[:heatmaps], entries, out / "heatmaps", known_lesions(manifest.parent)
    )
    skipped = ", ".join(b.slide_id for b in datamodule.bad_slides)
    print(f"{len(predictions)} slides predicted" + (f"; skipped: {skipped}" if skipped else ""))
    print(f"outputs: {out}")
    return predictions


def _strategy(devices: int) -> str:
    """Lightning's default for one device; slide-parallel for several (not DDP's slide split)."""
    if devices == 0 or devices < -1:
        raise ValueError(f"Expected `devices` >= 1 (or -1 for all), got {devices}.")
    return "auto" if devices == 1 else "slide_parallel"


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``lightning-wsi-predict``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m lightning_wsi.predict", description=__doc__)
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by training")
    parser.add_argument("manifest", type=Path, help="CSV with slide_id, path[, label, mpp]")
    parser.add_argument("--out", type=Path, default=Path("outputs/predictions"))
    parser.add_argument("--heatmaps", type=int, default=6, help="heatmaps for this many slides")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument(
        "--devices", type=int, default=1,
        help="processes/devices; more than 1 shards each slide's tiles over them (slide-parallel)",
    )  # fmt: skip
    parser.add_argument("--eval-k", type=int, default=None, help="cap on tiles per slide")
    parser.add_argument("--num-workers", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        _strategy(args.devices)
    except ValueError as err:
        parser.error(str(err))
    try:
        predict(
            args.checkpoint, args.manifest, args.out, args.heatmaps, args.accelerator,
            args.devices, args.eval_k, args.num_workers,
        )  # fmt: skip
    except (BadSlideError, ManifestError, FileNotFoundError, KeyError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
