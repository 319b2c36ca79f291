"""Train end to end from a Hydra config: ``python -m lightning_wsi.train [overrides]``.

With no arguments it runs the embedded demo: writes the synthetic slides if absent, tiles them,
trains encoder and aggregator together on CPU, evaluates, and prints the final validation metrics
and where the outputs are. Outputs in the Hydra run folder: ``checkpoints/`` (``last.ckpt``,
``best.ckpt``), ``metrics.csv``, ``loss.png``, ``roc.png`` (binary tasks, bootstrapped 95% band),
``predictions.csv``, ``heatmaps/*.png`` (attention over validation slides) and ``summary.json``
(what ``python -m lightning_wsi.summarize`` tabulates across a sweep), ``problems.csv`` (every
bad slide, left-out tile and dropped slide) and ``train.log``.

``ckpt_path=/path/to/last.ckpt`` resumes a run (``ckpt_path=last``: this run folder's
``last.ckpt``, else the newest ``last.ckpt`` of the runs beside it).
"""

from __future__ import annotations

import difflib
import inspect
import json
import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from lightning_wsi.config import swept_dirname  # noqa: F401 - also registers the resolvers
from lightning_wsi.data import SlideDataModule, make_synthetic_dataset
from lightning_wsi.data.datamodule import BadSlideError
from lightning_wsi.data.manifest import ManifestError
from lightning_wsi.data.problems import Problem
from lightning_wsi.heatmaps import write_heatmaps
from lightning_wsi.models import SlideModule
from lightning_wsi.models.tasks import median_grade
from lightning_wsi.ordinal_reports import format_kappa, kappa_ci
from lightning_wsi.reports import (
    epoch_series,
    format_auroc,
    known_lesions,
    plot_loss_curve,
    plot_roc,
    write_predictions_csv,
)
from lightning_wsi.survival_reports import cindex_ci, format_cindex, plot_km_by_risk

__all__ = ["ConfigError", "check_tile_size", "main", "run"]


class ConfigError(ValueError):
    """Config values that cannot work together; the message names the keys and the fix."""


# Bad input a user can fix: reported as one line with exit code 2, not a traceback.
USER_ERRORS = (
    ConfigError,
    BadSlideError,
    ManifestError,
    FileNotFoundError,
    MissingMandatoryValue,
    InstantiationException,
)


def check_tile_size(cfg: DictConfig) -> None:
    """An encoder preset whose position embedding is fixed (``dynamic_img_size: false``, e.g.
    H-optimus-0/1 and Prov-GigaPath) takes only its native tile size: say so in one line before
    any slide is read, rather than with timm's assertion at the first step."""
    native = cfg.encoder.get("native_tile_size")
    kwargs = cfg.encoder.get("kwargs") or {}
    if native is None or kwargs.get("dynamic_img_size", False) or cfg.tile_size == native:
        return
    raise ConfigError(
        f"encoder={cfg.encoder.name} takes {native}-px tiles only (dynamic_img_size: false), "
        f"got tile_size={cfg.tile_size}; set tile_size={native} (and mpp="
        f"{cfg.encoder.get('native_mpp', 0.5)}), or encoder.kwargs.dynamic_img_size=true to "
        "interpolate its position embedding"
    )


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Train and evaluate as ``cfg`` says; write the outputs; return the summary."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_tile_size(cfg)
    if cfg.get("pretrain") is not None:
        # The foundation study's encoder weights, pretrained here once if the file is missing.
        # Before `fit`, so the ranks a launcher starts later find the file written.
        from lightning_wsi.pretrain import ensure_pretrained

        try:
            ensure_pretrained(cfg)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    if cfg.data.get("synthetic"):
        syn = cfg.data.synthetic
        manifest = _synthetic_dataset(syn)
        print(f"synthetic slides: {manifest.parent}")
    datamodule: SlideDataModule = instantiate(cfg.data.datamodule, _convert_="all")
    module: SlideModule = instantiate(cfg.model, _convert_="all")
    # Two callbacks: with a monitor, Lightning 2.6 writes `save_last` only when a top-k checkpoint
    # is saved too, so last.ckpt froze at the best epoch. Without one it keeps the latest state.
    best = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", filename="best", monitor="val/loss", mode="min"
    )
    last = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="last")
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=[best, last], logger=_loggers(cfg, output_dir),
        default_root_dir=str(output_dir),
    )  # fmt: skip
    trainer.fit(module, datamodule, ckpt_path=ckpt_path, weights_only=True)

    # The final evaluation is reported below, not logged: a logged `validate` would add an epoch
    # after the last one to metrics.csv (and to loss.png).
    trainer.loggers = []
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    datamodule.predict_splits = ["val"]
    predictions = _gather(trainer, trainer.predict(module, datamodule=datamodule))
    summary: dict[str, Any] = {}
    if trainer.is_global_zero:
        summary = _report(cfg, output_dir, datamodule, predictions, metrics, trainer)
    return summary


def _synthetic_dataset(node: DictConfig) -> Path:
    """``data.synthetic``'s slides (written once, then reused): every key but ``root`` is a
    keyword of :func:`make_synthetic_dataset`; an unknown one is a one-line error naming it."""
    options = dict(OmegaConf.to_container(node, resolve=True))
    known = set(inspect.signature(make_synthetic_dataset).parameters) - {"root"}
    unknown = sorted(set(options) - known - {"root"})
    if unknown:
        raise ConfigError(
            f"unknown key(s) data.synthetic.{', data.synthetic.'.join(unknown)}; "
            f"valid: root, {', '.join(sorted(known))}"
        )
    return make_synthetic_dataset(options.pop("root"), **options)


def _loggers(cfg: DictConfig, output_dir: Path) -> list[Logger]:
    """The CSV log the reports are made from, plus the ``logger`` group's choice (if not csv).

    The CSV log lives in ``logs/`` because Lightning deletes the previous files of a non-empty
    log folder (and warns), and the run folder already holds Hydra's ``.hydra/``.
    """
    loggers: list[Logger] = [CSVLogger(output_dir, name="logs", version="")]
    extra = cfg.get("logger")
    if extra and extra.get("_target_"):
        if "MLFlowLogger" in extra["_target_"]:
            # The offline file store (no server, no database) that mlflow 3 keeps behind a flag.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        loggers.append(instantiate(extra))
    return loggers


def resolve_ckpt_path(value: str | None, output_dir: Path) -> str | None:
    """The checkpoint to resume from: a path, or ``last`` (this run's ``last.ckpt``, else the
    newest ``last.ckpt`` among the runs beside this one).

    Raises:
        FileNotFoundError: No such checkpoint, with the path looked at and the fix.
    """
    if value in (None, ""):
        return None
    if str(value) == "last":
        own = output_dir / "checkpoints" / "last.ckpt"
        found = (
            [own]
            if own.is_file()
            else sorted(
                output_dir.parent.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
            )
        )
        if not found:
            raise FileNotFoundError(
                f"ckpt_path=last: no checkpoints/last.ckpt in {output_dir} or the runs beside it "
                f"in {output_dir.parent}; give ckpt_path=/path/to/last.ckpt"
            )
        print(f"resuming from {found[-1]}")
        return str(found[-1])
    if not Path(value).is_file():
        raise FileNotFoundError(
            f"ckpt_path={value}: no such checkpoint file; give the path of a run's "
            "checkpoints/last.ckpt, or ckpt_path=last"
        )
    return str(value)


def _survival_report(
    predicted: list[dict], out: Path, cfg: DictConfig, summary: dict[str, Any]
) -> str:
    """C-index with its bootstrap CI (or why none) and ``km.png``: Kaplan-Meier curves of the
    validation slides split at the median predicted risk, with the log-rank p-value."""
    risks = [float(p["risk"]) for p in predicted]
    times = [float(p["target"][0]) for p in predicted]
    events = [float(p["target"][1]) for p in predicted]
    ids = [str(p["slide_id"]) for p in predicted]
    ci = cindex_ci(risks, times, events, cfg.bootstrap, cfg.seed, slide_ids=ids)
    summary.update({"val/cindex": ci.cindex, "val/cindex_low": ci.low,
                    "val/cindex_high": ci.high, "val/cindex_note": ci.note})  # fmt: skip
    groups = plot_km_by_risk(risks, times, events, out / "km.png", slide_ids=ids)
    p_value = groups.logrank.p_value
    summary.update({"val/events": int(sum(events)), "val/logrank_p": p_value,
                    "val/logrank_note": groups.note})  # fmt: skip
    split = (f"log-rank p = {p_value:.2g}" if math.isfinite(p_value) else
             f"no log-rank test ({groups.note})")  # fmt: skip
    return (
        f"{format_cindex(ci)}\nkm.png: {groups.n_high} high- vs {groups.n_low} low-risk "
        f"slides ({int(sum(events))} events), {split}"
    )


def _finetune_choice(cfg: DictConfig) -> str:
    """How the encoder trained: the `finetune` group's choice (full, frozen, lora, ...)."""
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("finetune")
        if choice:
            return str(choice)
    return "frozen" if cfg.freeze_encoder else "full"


def _strict_json(value: Any) -> Any:
    """NaN and infinity as ``null``: strict JSON readers reject Python's ``NaN``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    return value


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
    metrics_csv = out / "logs" / "metrics.csv"
    predicted = [p for p in predictions if p.get("status") != "dropped"]
    edges = getattr(trainer.lightning_module.task, "bin_edges", None)
    write_predictions_csv(out / "predictions.csv", predictions, bin_edges=edges)
    plot_loss_curve(metrics_csv, out / "loss.png")
    summary: dict[str, Any] = {
        "K": cfg.K,
        "devices": trainer.num_devices * trainer.num_nodes,
        "encode_chunk_size": cfg.encode_chunk_size,
        "freeze_encoder": cfg.freeze_encoder,
        "finetune": _finetune_choice(cfg),
        "encoder": cfg.encoder.name,
        "aggregator": cfg.aggregator.name,
        "seed": cfg.seed,
        "split_seed": cfg.split_seed,
        "val_slides": len(predicted),
        "outputs": str(out),
        **{k: float(v) for k, v in metrics.items()},
    }
    train_losses = epoch_series(metrics_csv, "train/loss_epoch")
    summary["train/loss"] = train_losses[-1][1] if train_losses else math.nan
    lines = []
    if cfg.task.name == "binary" and predicted:
        probs = [float(p["probabilities"]) for p in predicted]
        targets = [int(p["target"]) for p in predicted]
        ci = plot_roc(probs, targets, out / "roc.png", cfg.bootstrap, cfg.seed)
        summary.update({"val/auroc": ci.auroc, "val/auroc_low": ci.low,
                        "val/auroc_high": ci.high, "val/auroc_note": ci.note})  # fmt: skip
        lines.append(format_auroc(ci))
    if cfg.task.name == "ordinal" and predicted:
        grades = [int(median_grade(p["probabilities"])) for p in predicted]
        truth = [int(p["target"]) for p in predicted]
        kappa = kappa_ci(grades, truth, cfg.task.num_classes, cfg.bootstrap, cfg.seed)
        summary.update({"val/qwk": kappa.kappa, "val/qwk_low": kappa.low,
                        "val/qwk_high": kappa.high, "val/qwk_note": kappa.note})  # fmt: skip
        lines.append(format_kappa(kappa))
    if cfg.task.name == "survival" and predicted:
        lines.append(_survival_report(predicted, out, cfg, summary))
    shown = ("val/auroc", "val/cindex", "val/qwk")
    lines += [f"{k} {v:.4f}" for k, v in metrics.items() if k not in shown]
    paths = {e.slide_id: e for e in datamodule.splits["val"]}
    lesions = known_lesions(Path(datamodule.manifest).parent)
    failures: list[tuple[str, str]] = []
    write_heatmaps(predicted[: cfg.heatmaps], paths, out / "heatmaps", lesions, failures)
    problems = datamodule.problems
    for slide_id, reason in failures:
        path = paths[slide_id].path if slide_id in paths else ""
        problems.add(Problem("heatmap", slide_id, path, reason, stage="report"))
    problems.write_csv(out / "problems.csv")
    summary["problems"] = {"counts": problems.counts(), "records": problems.as_dicts()}
    (out / "summary.json").write_text(json.dumps(_strict_json(summary), indent=2))
    print("\n".join(["", "final validation metrics:", *lines,
                      problems.summary_line(out / "problems.csv"), f"outputs: {out}"]))  # fmt: skip
    return summary


class _Tee:
    """stdout that also goes to the run's ``train.log`` (what the command printed)."""

    def __init__(self, stream: Any, path: Path) -> None:
        self.stream, self.file = stream, open(path, "a", buffering=1)  # noqa: SIM115

    def write(self, text: str) -> int:
        if "\r" not in text and "\x1b[" not in text:  # progress bars redraw: not a log
            self.file.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def _hydra_main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    # Lightning's messages through the root logger, whose handlers Hydra set (console and
    # train.log), rather than Lightning's own console handler.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    # Messages no user of this command can act on: Lightning's own use of a deprecated torch
    # API, and an advertisement.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    stdout = sys.stdout
    if os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0":
        sys.stdout = _Tee(stdout, output_dir / f"{hydra_cfg.job.name}.log")
    launched = {k: os.environ.get(k) for k in _LAUNCH_KEYS}
    try:
        run(cfg, output_dir)
    except USER_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        if isinstance(sys.stdout, _Tee):  # also in train.log
            sys.stdout.file.write(f"error: {_one_line(err)}\n")
        raise SystemExit(2) from None
    finally:
        if sys.stdout is not stdout:
            sys.stdout.flush()
            sys.stdout.file.close()
            sys.stdout = stdout
        _restore_environment(launched)


# What Lightning's launcher writes into this process's environment when it starts the other
# ranks. Left set, the next job of a `-m` sweep (same process) would find LOCAL_RANK and take
# its ranks for started by someone else: it waited for a rank 1 that nobody started.
_LAUNCH_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _restore_environment(before: dict[str, str | None]) -> None:
    """Put the launch variables back as they were before the job (unset if they were)."""
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _one_line(err: BaseException) -> str:
    if isinstance(err, InstantiationException) and isinstance(
        err.__cause__, FileNotFoundError | ValueError
    ):  # what went wrong inside the target, without Hydra's wrapping
        return _one_line(err.__cause__)
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
