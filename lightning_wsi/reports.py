"""Slide-level reports: AUROC with a bootstrapped 95% CI, ROC and loss curves, known lesions.

Plots are written with matplotlib's Agg backend (no screen needed) as PNG files. A bootstrap
interval is reported only where it can mean something (enough slides of each class, both classes
in nearly every resample); otherwise it is withheld with the reason, never printed as
``[1.000, 1.000]`` over two slides.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator
from torchmetrics.functional.classification import binary_auroc, binary_roc

from lightning_wsi.data.synthetic import LESIONS_FORMAT, lesion_boxes
from lightning_wsi.heatmaps import plot_attention_heatmap
from lightning_wsi.intervals import MIN_USABLE, BootstrapCI, format_interval

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = [
    "AurocCI",
    "auroc_ci",
    "auroc_with_ci",
    "epoch_series",
    "format_auroc",
    "known_lesions",
    "loss_series",
    "plot_attention_heatmap",
    "plot_loss_curve",
    "plot_roc",
    "write_predictions_csv",
]

_FPR_GRID = np.linspace(0.0, 1.0, 101)
MIN_PER_CLASS = 5  # slides of each class below which a bootstrap AUROC interval is withheld


class AurocCI(BootstrapCI):
    """AUROC of slide probabilities with its 95% percentile-bootstrap interval, or why not
    (:class:`~lightning_wsi.intervals.BootstrapCI`; ``value`` is the AUROC, NaN when undefined:
    one class, non-finite scores)."""

    @property
    def auroc(self) -> float:
        return self.value


def _bootstrap(targets: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``[n, len(targets)]`` resampled slide indices and ``[n]`` whether each holds both classes."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(targets), (n, len(targets)))
    positives = targets[idx].sum(axis=1)
    return idx, (positives > 0) & (positives < len(targets))


def _withheld_because(
    targets: np.ndarray, usable: np.ndarray, n_bootstrap: int, min_per_class: int, min_usable: float
) -> str:
    """Why an interval would mislead, or ``""`` when it may be reported."""
    pos = int(targets.sum())
    neg = len(targets) - pos
    if n_bootstrap == 0:
        return "bootstrap off (0 resamples)"
    if min(pos, neg) < min_per_class:
        return (
            f"{len(targets)} slides ({pos} positive, {neg} negative): too few for a bootstrap "
            f"interval, need >= {min_per_class} per class"
        )
    if usable.mean() < min_usable:  # floored, so 89.6% never reads as the 90% it missed
        return (
            f"only {math.floor(100 * usable.mean())}% of {n_bootstrap} resamples hold both "
            f"classes, need >= {min_usable:.0%}"
        )
    return ""


def _checked(probabilities: Sequence[float], targets: Sequence[int]) -> tuple[np.ndarray, ...]:
    """``[N]`` float64 probabilities and int64 targets; raises on a length or class mismatch."""
    p = np.asarray(probabilities, dtype=np.float64).reshape(-1)
    t = np.asarray(targets, dtype=np.float64).reshape(-1)
    if len(p) != len(t):
        raise ValueError(f"Expected as many probabilities as targets, got {len(p)} and {len(t)}")
    if not np.isin(t, (0, 1)).all():
        bad = sorted(set(t[~np.isin(t, (0, 1))].tolist()))[:5]
        raise ValueError(f"Expected binary targets 0 or 1, got {bad}")
    return p, t.astype(np.int64)


def _auroc(p: np.ndarray, t: np.ndarray) -> float:
    return float(binary_auroc(torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(t)))


def auroc_ci(
    probabilities: Sequence[float],
    targets: Sequence[int],
    n_bootstrap: int = 1000,
    seed: int = 0,
    *,
    min_per_class: int = MIN_PER_CLASS,
    min_usable: float = MIN_USABLE,
) -> AurocCI:
    """AUROC of slide probabilities and its 95% percentile-bootstrap interval over slides.

    The interval is withheld (NaN bounds, ``note`` says why) with fewer than ``min_per_class``
    slides of either class, when under ``min_usable`` of the resamples hold both classes, or when
    it has no width (classes that do not overlap give AUROC 1 in every resample): two slides
    ranked right by 0.0002 give ``[1.000, 1.000]``, which only looks certain.

    Args:
        probabilities: ``[N]`` probability of the positive class per slide.
        targets: ``[N]`` 0 or 1 per slide.
        n_bootstrap: Resamples of the slides (with replacement); 0 turns the interval off.
        seed: Seed of the resampling.
        min_per_class: Slides of each class needed for an interval.
        min_usable: Share of resamples that must hold both classes.

    Example:
        >>> auroc_ci([0.4990, 0.4992], [0, 1]).note
        '2 slides (1 positive, 1 negative): too few for a bootstrap interval, need >= 5 per class'
    """
    if n_bootstrap < 0:
        raise ValueError(f"Expected `n_bootstrap` >= 0 resamples, but got {n_bootstrap}")
    p, t = _checked(probabilities, targets)
    if t.size == 0 or t.min() == t.max():
        kind = "no slides" if t.size == 0 else f"{t.size} slides, all of class {t[0]}"
        return AurocCI(math.nan, note=f"{kind}: AUROC needs both classes")
    if not np.isfinite(p).all():
        bad = int((~np.isfinite(p)).sum())
        return AurocCI(math.nan, note=f"{bad} of {p.size} probabilities are not finite")
    value = _auroc(p, t)
    idx, usable = _bootstrap(t, n_bootstrap, seed)
    note = _withheld_because(t, usable, n_bootstrap, min_per_class, min_usable)
    if note:
        return AurocCI(value, note=note)
    scores = [_auroc(p[i], t[i]) for i in idx[usable]]
    return AurocCI.from_resamples(value, scores, "AUROC")  # no overlap: 1 in every resample


def auroc_with_ci(
    probabilities: Sequence[float], targets: Sequence[int], n_bootstrap: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """``(auroc, low, high)`` of :func:`auroc_ci`: NaN bounds where the interval is withheld.

    Example:
        >>> auroc_with_ci([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], n_bootstrap=200)[0]
        0.75
    """
    ci = auroc_ci(probabilities, targets, n_bootstrap, seed)
    return ci.auroc, ci.low, ci.high


def format_auroc(ci: AurocCI, name: str = "val/auroc") -> str:
    """The line the train command prints for ``ci``.

    Example:
        >>> format_auroc(AurocCI(0.8734, 0.712, 0.968, resamples=1000))
        'val/auroc 0.873 [0.71, 0.97]  (95% bootstrap CI, 1000 resamples)'
    """
    return format_interval(ci, name)


def _roc_band(p: np.ndarray, t: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    """``[2, 101]`` 2.5% and 97.5% true-positive rate at each false-positive rate of the grid,
    over the same resamples as :func:`auroc_ci` (same seed)."""
    idx, usable = _bootstrap(t, n_bootstrap, seed)
    curves = []
    for i in idx[usable]:
        f, r, _ = binary_roc(torch.as_tensor(p[i]), torch.as_tensor(t[i]))
        curves.append(np.interp(_FPR_GRID, f.numpy(), r.numpy()))
    return np.percentile(np.stack(curves), [2.5, 97.5], axis=0)


def _roc_figure(
    probabilities: Sequence[float], targets: Sequence[int], n_bootstrap: int, seed: int, title: str
) -> tuple[plt.Figure, AurocCI]:
    """The ROC figure of :func:`plot_roc` and the :class:`AurocCI` it shows."""
    p, t = _checked(probabilities, targets)
    ci = auroc_ci(p, t, n_bootstrap, seed)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if ci.has_interval:
        band = _roc_band(p, t, n_bootstrap, seed)
        ax.fill_between(_FPR_GRID, band[0], band[1], alpha=0.25, label="95% bootstrap band")
    fpr, tpr = ([], [])
    if not math.isnan(ci.auroc):
        fpr, tpr, _ = (v.numpy() for v in binary_roc(torch.as_tensor(p), torch.as_tensor(t)))
    ax.plot(fpr, tpr, lw=2, label=textwrap.fill(format_auroc(ci, "AUROC"), 48))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(f"{title} ({len(t)} slides)")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    return fig, ci


def plot_roc(
    probabilities: Sequence[float],
    targets: Sequence[int],
    path: Path,
    n_bootstrap: int = 1000,
    seed: int = 0,
    title: str = "Validation ROC",
) -> AurocCI:
    """ROC curve, with the bootstrapped 95% band only where :func:`auroc_ci` gives an interval
    (the legend says why not otherwise).

    Returns:
        The :class:`AurocCI` the legend shows (the same as ``auroc_ci`` with these arguments).
    """
    fig, ci = _roc_figure(probabilities, targets, n_bootstrap, seed, title)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return ci


def _read_metrics(metrics_csv: Path) -> list[dict[str, str]]:
    with open(metrics_csv, newline="") as f:
        return list(csv.DictReader(f))


def epoch_series(metrics_csv: Path, key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of one logged metric from Lightning's ``CSVLogger`` file, in file
    order; rows whose epoch or value is missing or not a number are left out."""
    series = []
    for row in _read_metrics(metrics_csv):
        try:
            epoch, value = int(float(row.get("epoch") or "")), float(row.get(key) or "")
        except (ValueError, OverflowError):
            continue
        series.append((epoch, value))
    return series


def loss_series(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """``{"train": ..., "validation": ...}`` ``(epoch, loss)`` pairs as the loss curve shows them.

    One value per epoch (the first logged). A validation row whose epoch has no training row is
    left out: ``trainer.validate`` after ``fit`` logs one at the epoch after the last.
    """
    train = dict(reversed(epoch_series(metrics_csv, "train/loss_epoch")))
    val = dict(reversed(epoch_series(metrics_csv, "val/loss")))
    return {
        "train": sorted(train.items()),
        "validation": sorted((e, v) for e, v in val.items() if e in train),
    }


def _loss_figure(series: Mapping[str, Sequence[tuple[int, float]]]) -> plt.Figure:
    """Loss per epoch (1-based, integer ticks) for each named series."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in series.items():
        if points:
            ax.plot([e + 1 for e, _ in points], [v for _, v in points], marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Slide-level loss")
    if any(series.values()):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_loss_curve(metrics_csv: Path, path: Path) -> dict[str, list[tuple[int, float]]]:
    """Training and validation loss per epoch, from Lightning's ``CSVLogger`` file.

    Returns:
        The plotted series, as :func:`loss_series` gives them.
    """
    series = loss_series(metrics_csv)
    fig = _loss_figure(series)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return series


_PREDICTION_KEYS = ("probabilities", "prediction", "risk")  # what each task predicts


def write_predictions_csv(
    path: Path,
    predictions: Sequence[Mapping[str, Any]],
    bin_edges: Sequence[float] | None = None,
) -> None:
    """One row per slide: id, status, target, prediction (probabilities, value or risk), tiles
    used, and why there is no prediction.

    ``status`` is ``ok``, or what a record without a prediction says (``dropped`` while reading,
    ``bad`` at setup) with its ``reason``; such rows have empty cells and 0 tiles. A survival
    model's rows also hold its survival curve, one column per time bin: ``survival_to_<t>`` is
    the probability of surviving past ``t`` (a bin's upper edge, from ``bin_edges``), and the last,
    open-ended bin is ``survival_to_end``; without ``bin_edges`` the columns are
    ``survival_bin<j>``.
    """
    bins = max(
        (len(p["survival"]) for p in predictions if p.get("survival") is not None), default=0
    )
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([
            "slide_id", "status", "target", "prediction", "n_tiles", "reason",
            *_survival_columns(bins, bin_edges),
        ])  # fmt: skip
        for p in predictions:
            value = next((p[k] for k in _PREDICTION_KEYS if p.get(k) is not None), None)
            value = value.tolist() if isinstance(value, torch.Tensor) else value
            target = p.get("target")
            target = target.tolist() if isinstance(target, torch.Tensor) else target
            coords = p.get("coords")
            curve = p.get("survival")
            curve = [] if curve is None else [f"{float(v):.6g}" for v in curve]
            writer.writerow([
                p["slide_id"], p.get("status", "ok"), target, value,
                0 if coords is None else len(coords), p.get("reason", ""),
                *curve, *[""] * (bins - len(curve)),
            ])  # fmt: skip


def _survival_columns(bins: int, edges: Sequence[float] | None) -> list[str]:
    """Headers of a survival curve's ``bins`` columns, named by each bin's upper time edge."""
    if not bins:
        return []
    if edges is None or len(edges) != bins + 1:
        return [f"survival_bin{j}" for j in range(bins)]
    return [f"survival_to_{e:g}" for e in edges[1:-1]] + ["survival_to_end"]


def known_lesions(root: Path) -> dict[str, list[list[float]]]:
    """Known lesion boxes (level-0 ``[x, y, w, h]`` per slide id) of a synthetic dataset.

    Reads ``root/lesions.json`` only when it carries :data:`LESIONS_FORMAT` (as
    :func:`~lightning_wsi.data.make_synthetic_dataset` writes it). Anything else (absent,
    unreadable, another format) gives ``{}``; a marked file that is malformed gives ``{}`` and a
    warning. Never raises: boxes only decorate heatmaps.
    """
    path = Path(root) / "lesions.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("format") != LESIONS_FORMAT:
        return {}
    try:
        return lesion_boxes(data.get("lesions"))
    except ValueError as err:
        warnings.warn(f"{path}: {err}; heatmaps are drawn without lesion boxes", stacklevel=2)
        return {}
