"""Predict slides with a trained checkpoint: ``python -m lightning_wsi.predict CKPT MANIFEST``.

The manifest needs ``slide_id`` and ``path``; a ``label`` column, where given, is reported as
the target beside each prediction. Slides are read as in training (the checkpoint records the
data module's mpp, tile size and normalisation); every tissue tile of each slide (or
``--eval-k`` of them) is encoded, and ``predictions.csv`` (a row with a status for every
manifest slide: ``ok``, ``bad`` at setup or ``dropped`` while reading, with the reason),
``problems.csv`` and attention heatmaps are written to ``--out`` (default: a new timestamped
folder under ``outputs/predictions``). Nothing is lost silently.

The checkpoint is read with ``torch.load(weights_only=True)``: one carrying other pickled objects
is refused, and no path stored inside it is followed to load more weights.

With ``--devices N`` (N > 1) prediction runs slide-parallel, as training does: every rank gets
every slide and encodes a contiguous shard of its tiles, rank 0 aggregates, and every rank gets
the same outputs; only global rank 0 writes the files and prints, so each slide appears once.
Lightning starts ranks 1..N-1 by running the same command again.
"""

from __future__ import annotations

import argparse
import datetime
import io
import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from lightning_wsi.data import SlideDataModule
from lightning_wsi.data.datamodule import BadSlideError
from lightning_wsi.data.manifest import ManifestError
from lightning_wsi.data.problems import Problem
from lightning_wsi.heatmaps import write_heatmaps
from lightning_wsi.models import SlideModule
from lightning_wsi.reports import known_lesions, write_predictions_csv

__all__ = ["main", "predict"]

_DATA_KEYS = (
    "mpp", "tile_size", "min_tissue_fraction", "task", "num_classes", "classes", "mean", "std",
    "slide_mpp", "eval_k", "eval_part_size",
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
    cache_dir: Path | None = None,
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
    saved = _load_checkpoint(checkpoint)
    # The encoder's weights are in the state dict: a path or hub flag stored in the checkpoint
    # is never followed (it could name any file).
    hparams = saved.get(SlideModule.CHECKPOINT_HYPER_PARAMS_KEY) or {}
    hparams.update(checkpoint_path=None, pretrained=False)
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    module = SlideModule.load_from_checkpoint(buffer, map_location="cpu", weights_only=True)
    data = dict(saved.get("datamodule_hyper_parameters") or {})
    kwargs = {k: data[k] for k in _DATA_KEYS if k in data}
    if eval_k is not None:
        kwargs["eval_k"] = eval_k
    datamodule = SlideDataModule(
        manifest, val_fraction=0.0, num_workers=num_workers, on_bad_slide="skip",
        require_labels=False, cache_dir=cache_dir, **kwargs,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator=accelerator, devices=devices, strategy=strategy, logger=False,
        enable_checkpointing=False, enable_model_summary=False,
    )  # fmt: skip
    predictions = trainer.predict(module, datamodule=datamodule)
    if not trainer.is_global_zero:  # the same predictions as rank 0, which writes them
        return predictions
    out.mkdir(parents=True, exist_ok=True)
    bad = [{"slide_id": b.slide_id, "status": "bad", "reason": b.reason}
           for b in datamodule.bad_slides]  # fmt: skip
    edges = getattr(module.task, "bin_edges", None)  # a survival model's time bins
    write_predictions_csv(out / "predictions.csv", [*predictions, *bad], bin_edges=edges)
    entries = {e.slide_id: e for split in datamodule.splits.values() for e in split}
    predicted = [p for p in predictions if p.get("status") != "dropped"]
    failures: list[tuple[str, str]] = []
    write_heatmaps(
        predicted[:heatmaps], entries, out / "heatmaps", known_lesions(manifest.parent), failures
    )
    problems = datamodule.problems
    for slide_id, reason in failures:
        path = entries[slide_id].path if slide_id in entries else ""
        problems.add(Problem("heatmap", slide_id, path, reason, stage="report"))
    problems.write_csv(out / "problems.csv")
    n_rows = len(predictions) + len(bad)
    print(f"{len(predicted)} of {n_rows} slides predicted; {n_rows - len(predicted)} "
          "without a prediction (status and reason in predictions.csv)")  # fmt: skip
    print(problems.summary_line(out / "problems.csv"))
    print(f"outputs: {out}")
    return predictions


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely."""


def _load_checkpoint(checkpoint: Path) -> dict:
    """The checkpoint's contents, unpickled with ``weights_only=True`` (no code runs)."""
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint {checkpoint} holds pickled objects other than tensors and plain values "
            f"and was not loaded, as loading it could run code ({str(err).splitlines()[0]}). "
            "Use a checkpoint written by lightning-wsi training, or re-save a trusted one as "
            "a plain state dict"
        ) from None
    if not isinstance(saved, dict) or "state_dict" not in saved:
        raise CheckpointError(
            f"checkpoint {checkpoint} is not a Lightning checkpoint (no state_dict); give a "
            "checkpoints/last.ckpt or best.ckpt written by training"
        )
    return saved


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
    parser.add_argument(
        "--out", type=Path, default=None,
        help="output folder (default: outputs/predictions/<date>_<time>, new every run)",
    )  # fmt: skip
    parser.add_argument(
        "--cache-dir", type=Path, default=None,
        help="tile coordinate cache (default: .tiles beside the manifest)",
    )  # fmt: skip
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
    out = args.out or Path("outputs/predictions") / datetime.datetime.now().strftime(
        "%Y-%m-%d_%H-%M-%S"
    )
    try:
        predict(
            args.checkpoint, args.manifest, out, args.heatmaps, args.accelerator,
            args.devices, args.eval_k, args.num_workers, args.cache_dir,
        )  # fmt: skip
    except (BadSlideError, ManifestError, FileNotFoundError, KeyError, CheckpointError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
