"""Slide-level reports: AUROC with a bootstrapped 95% CI, ROC and loss curves, attention heatmaps.

Plots are written with matplotlib's Agg backend (no screen needed) as PNG files.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc, binary_roc

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = [
    "auroc_with_ci",
    "epoch_series",
    "known_lesions",
    "write_predictions_csv",
    "plot_attention_heatmap",
    "plot_loss_curve",
    "plot_roc",
]

_FPR_GRID = np.linspace(0.0, 1.0, 101)


def _resamples(targets: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """``n`` bootstrap index sets that each hold both classes (AUROC needs them)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n * 10):
        idx = rng.integers(0, len(targets), len(targets))
        if 0 < targets[idx].sum() < len(idx):
            out.append(idx)
            if len(out) == n:
                break
    return out


def auroc_with_ci(
    probabilities: Sequence[float], targets: Sequence[int], n_bootstrap: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """AUROC of slide probabilities and its 95% percentile-bootstrap interval over slides.

    Returns:
        ``(auroc, low, high)``; NaNs when the targets hold a single class.

    Example:
        >>> auroc_with_ci([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1], n_bootstrap=200)[0]
        0.75
    """
    p = torch.as_tensor(np.asarray(probabilities, dtype=np.float32))
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    if t.numel() == 0 or t.min() == t.max():
        return math.nan, math.nan, math.nan
    value = float(binary_auroc(p, t))
    scores = [float(binary_auroc(p[i], t[i])) for i in _resamples(t.numpy(), n_bootstrap, seed)]
    low, high = np.percentile(scores, [2.5, 97.5]) if scores else (math.nan, math.nan)
    return value, float(low), float(high)


def plot_roc(
    probabilities: Sequence[float],
    targets: Sequence[int],
    path: Path,
    n_bootstrap: int = 1000,
    seed: int = 0,
    title: str = "Validation ROC",
) -> None:
    """ROC curve with a bootstrapped 95% band (true-positive rate at each false-positive rate)."""
    p = torch.as_tensor(np.asarray(probabilities, dtype=np.float32))
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    auroc, low, high = auroc_with_ci(probabilities, targets, n_bootstrap, seed)
    fpr, tpr, _ = binary_roc(p, t)
    curves = []
    for idx in _resamples(t.numpy(), n_bootstrap, seed):
        f, r, _ = binary_roc(p[idx], t[idx])
        curves.append(np.interp(_FPR_GRID, f.numpy(), r.numpy()))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if curves:
        band = np.percentile(np.stack(curves), [2.5, 97.5], axis=0)
        ax.fill_between(_FPR_GRID, band[0], band[1], alpha=0.25, label="95% bootstrap band")
    ax.plot(fpr.numpy(), tpr.numpy(), lw=2, label=f"AUROC {auroc:.3f} [{low:.3f}, {high:.3f}]")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(f"{title} ({len(t)} slides)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_metrics(metrics_csv: Path) -> list[dict[str, str]]:
    with open(metrics_csv, newline="") as f:
        return list(csv.DictReader(f))


def epoch_series(metrics_csv: Path, key: str) -> list[tuple[int, float]]:
    """``(epoch, value)`` of one logged metric from Lightning's ``CSVLogger`` file."""
    series = []
    for row in _read_metrics(metrics_csv):
        if row.get(key) not in (None, ""):
            series.append((int(float(row["epoch"])), float(row[key])))
    return series


def plot_loss_curve(metrics_csv: Path, path: Path) -> None:
    """Training and validation loss per epoch, from Lightning's ``CSVLogger`` file."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("train/loss_epoch", "train"), ("val/loss", "validation")):
        series = epoch_series(metrics_csv, key)
        if series:
            ax.plot([e + 1 for e, _ in series], [v for _, v in series], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Slide-level loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention_heatmap(
    thumbnail: np.ndarray,
    thumb_mpp: float,
    slide_mpp: float,
    coords: np.ndarray,
    tile_size_level0: int,
    attention: np.ndarray,
    path: Path,
    title: str,
    boxes: Sequence[Sequence[float]] = (),
) -> None:
    """Per-tile attention painted over the slide thumbnail.

    Args:
        thumbnail: ``[h, w, 3]`` uint8 at ``thumb_mpp`` µm/px.
        thumb_mpp: The thumbnail's µm per pixel.
        slide_mpp: Level-0 µm per pixel.
        coords: ``[K, 2]`` level-0 top-left ``(x, y)`` of the tiles.
        tile_size_level0: A tile's side in level-0 pixels.
        attention: ``[K]`` weights; shown relative to the largest.
        path: PNG to write.
        title: Figure title.
        boxes: Level-0 ``[x, y, w, h]`` rectangles to outline (e.g. known lesions).
    """
    scale = slide_mpp / thumb_mpp
    heat = np.full(thumbnail.shape[:2], np.nan, dtype=np.float32)
    weights = np.asarray(attention, dtype=np.float32)
    weights = weights / weights.max() if weights.size and weights.max() > 0 else weights
    side = max(1, round(tile_size_level0 * scale))
    for (x, y), w in zip(np.asarray(coords), weights, strict=True):
        c, r = round(x * scale), round(y * scale)
        heat[r : r + side, c : c + side] = w
    aspect = thumbnail.shape[0] / thumbnail.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.0 * aspect + 0.6), layout="constrained")
    axes[0].imshow(thumbnail)
    axes[1].imshow(thumbnail)
    shown = axes[1].imshow(heat, cmap="inferno", alpha=0.6, vmin=0, vmax=1)
    for ax in axes:
        for x, y, w, h in boxes:
            ax.add_patch(
                plt.Rectangle(
                    (x * scale, y * scale), w * scale, h * scale, fill=False, ec="cyan", lw=1
                )
            )
        ax.set_axis_off()
    fig.colorbar(shown, ax=axes[1], fraction=0.04, label="attention / max")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def write_predictions_csv(path: Path, predictions: Sequence[Mapping[str, Any]]) -> None:
    """One row per slide: id, target, prediction (probabilities or value), tiles used."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "target", "prediction", "n_tiles"])
        for p in predictions:
            value = p.get("probabilities", p.get("prediction"))
            value = value.tolist() if isinstance(value, torch.Tensor) else value
            target = p.get("target")
            target = target.tolist() if isinstance(target, torch.Tensor) else target
            writer.writerow([p["slide_id"], target, value, len(p["coords"])])


def known_lesions(root: Path) -> dict[str, list]:
    """Known lesion boxes of synthetic slides (``lesions.json``), drawn on the heatmaps."""
    path = root / "lesions.json"
    return json.loads(path.read_text()) if path.is_file() else {}
