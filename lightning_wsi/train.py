"""Train end to end from a Hydra config: ``python -m lightning_wsi.train [overrides]``.

With no arguments it runs the embedded demo: writes the synthetic slides if absent, tiles them,
trains encoder and aggregator together on CPU, evaluates, and prints the final validation metrics
and where the outputs are. Outputs in the Hydra run folder: ``checkpoints/`` (``last.ckpt``,
``best.ckpt``), ``metrics.csv``, ``loss.png``, ``roc.png`` (binary tasks, bootstrapped 95% band),
``predictions.csv``, ``heatmaps/*.png`` (attention over validation slides) and ``summary.json``
(what ``python -m lightning_wsi.summarize`` tabulates across a sweep).
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lightning_wsi.data import SlideDataModule, make_synthetic_dataset
from lightning_wsi.data.datamodule import BadSlideError
from lightning_wsi.data.manifest import ManifestError
from lightning_wsi.heatmaps import write_heatmaps
from lightning_wsi.models import SlideModule
from lightning_wsi.reports import (
    auroc_with_ci,
    epoch_series,
    known_lesions,
    plot_loss_curve,
    plot_roc,
    write_predictions_csv,
)

__all__ = ["main", "run"]

# Bad input a user can fix: reported as one line with exit code 2, not a traceback.
USER_ERRORS = (
    BadSlideError,
    ManifestError,
    FileNotFoundError,
    MissingMandatoryValue,
    InstantiationException,
)


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says; write the outputs; return the summary."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.data.get("synthetic"):
        syn = cfg.data.synthetic
        manifest = make_synthetic_dataset(syn.root, n_slides=syn.n_slides, seed=syn.seed)
        print(f"synthetic slides: {manifest.parent}")
    datamodule: SlideDataModule = instantiate(cfg.data.datamodule, _convert_="all")
    module: SlideModule = instantiate(cfg.model, _convert_="all")
    # Two callbacks: with a monitor, Lightning 2.6 writes `save_last` only when a top-k checkpoint
    # is saved too, so last.ckpt froze at the best epoch. Without one it keeps the latest state.
    best = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", filename="best", monitor="val/loss", mode="min"
    )
    last = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="last")
    logger = CSVLogger(output_dir, name="", version="")
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[best, last], logger=logger, default_root_dir=str(output_dir)
    )
    trainer.fit(module, datamodule)

    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    datamodule.predict_splits = ["val"]
    predictions = _gather(trainer, trainer.predict(module, datamodule=datamodule))
    summary: dict[str, Any] = {}
    if trainer.is_global_zero:
        summary = _report(cfg, output_dir, datamodule, predictions, metrics, trainer)
    return summary


def _gather(trainer: L.Trainer, predictions: list[dict]) -> list[dict]:
    """Every rank's predictions (plain DDP splits the slides; slide-parallel ranks agree)."""
    if trainer.world_size == 1 or getattr(trainer.strategy, "slide_parallel", False):
        return predictions
    everyone: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, predictions)
    unique = {p["slide_id"]: p for part in everyone for p in part}
    return list(unique.values())


def _report(
    cfg: DictConfig,
    out: Path,
    datamodule: SlideDataModule,
    predictions: list[dict],
    metrics: dict[str, float],
    trainer: L.Trainer,
) -> dict[str, Any]:
    write_predictions_csv(out / "predictions.csv", predictions)
    plot_loss_curve(out / "metrics.csv", out / "loss.png")
    summary: dict[str, Any] = {
        "K": cfg.K,
        "devices": trainer.num_devices * trainer.num_nodes,
        "encode_chunk_size": cfg.encode_chunk_size,
        "freeze_encoder": cfg.freeze_encoder,
        "encoder": cfg.encoder.name,
        "aggregator": cfg.aggregator.name,
        "seed": cfg.seed,
        "split_seed": cfg.split_seed,
        "val_slides": len(predictions),
        "outputs": str(out),
        **{k: float(v) for k, v in metrics.items()},
    }
    train_losses = epoch_series(out / "metrics.csv", "train/loss_epoch")
    summary["train/loss"] = train_losses[-1][1] if train_losses else math.nan
    lines = []
    if cfg.task.name == "binary" and predictions:
        probs = [float(p["probabilities"]) for p in predictions]
        targets = [int(p["target"]) for p in predictions]
        auroc, low, high = auroc_with_ci(probs, targets, cfg.bootstrap, cfg.seed)
        summary.update({"val/auroc": auroc, "val/auroc_low": low, "val/auroc_high": high})
        plot_roc(probs, targets, out / "roc.png", cfg.bootstrap, cfg.seed)
        lines.append(f"val/auroc {auroc:.3f} [{low:.3f}, {high:.3f}]  (95% bootstrap CI)")
    lines += [f"{k} {v:.4f}" for k, v in metrics.items() if k != "val/auroc"]
    paths = {e.slide_id: e for e in datamodule.splits["val"]}
    lesions = known_lesions(Path(datamodule.manifest).parent)
    write_heatmaps(predictions[: cfg.heatmaps], paths, out / "heatmaps", lesions)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(["", "final validation metrics:", *lines, f"outputs: {out}"]))
    return summary


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        run(cfg, output_dir)
    except USER_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        raise SystemExit(2) from None


def _one_line(err: BaseException) -> str:
    if isinstance(err, MissingMandatoryValue):
        key = err.full_key
        return f"{key} must be set, e.g. `python -m lightning_wsi.train {key}=...`"
    return " ".join(str(err).split()) if not isinstance(err, BadSlideError) else str(err)


def _check_keys(argv: list[str]) -> str | None:
    """A message naming a mistyped config key and the valid keys beside it, or ``None``.

    Hydra lists the valid options of a mistyped group choice itself, but for a key it only says
    that the key is "not in struct"; this composes the overrides first to say more.
    """
    overrides = [a for a in argv if "=" in a and not a.startswith(("-", "+", "~"))]
    if not overrides or any(a.startswith("hydra.") for a in overrides):
        return None
    first = [o if "[" in o or "(" in o else o.split(",")[0] for o in overrides]  # sweeps: 1st
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException

    with initialize_config_module("lightning_wsi.conf", version_base="1.3"):
        try:
            compose("train", overrides=first)
            return None
        except ConfigCompositionException as err:
            text = str(err.__cause__ or err)
            if "not in struct" not in text:
                return None
            bad = next((o.split("=")[0] for o in first if f"'{o.split('=')[0]}'" in str(err)), "")
            groups = [o for o in first if "." not in o.split("=")[0]]
            base = compose("train", overrides=[o for o in groups if o.split("=")[0] != bad])
    parent, _, leaf = bad.rpartition(".")
    node = OmegaConf.select(base, parent) if parent else base
    valid = sorted(str(k) for k in node.keys()) if isinstance(node, DictConfig) else []
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" (did you mean '{(parent + '.') if parent else ''}{close[0]}'?)" if close else ""
    where = f"'{parent}'" if parent else "the top level"
    return f"unknown config key '{bad}'{hint}; valid keys at {where}: {', '.join(valid)}"


def main() -> None:
    """Console entry point (``lightning-wsi-train``)."""
    message = _check_keys(sys.argv[1:])
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
