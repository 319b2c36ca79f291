"""Attention heatmaps of predicted slides over their thumbnails.

Attention is shown relative to uniform: weight x K (1 = every tile weighted alike) on a log scale
clipped to ``[1/8, 8]``, with a diverging colour map centred on 1, so an untrained model's
near-uniform attention paints every tile the same neutral colour instead of bright. Each PNG is
named after its slide id through :func:`~lightning_wsi.data.names.inside`, so an id cannot write
outside the output folder, and a heatmap that fails is a warning and a returned failure, never
the end of a run.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib import patheffects
from matplotlib.colors import LogNorm

from lightning_wsi.data.dataset import BagEntry, SlideEntry, slides_of
from lightning_wsi.data.names import inside, safe_name
from lightning_wsi.data.slide import Slide

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = [
    "attention_colours",
    "heatmap_path",
    "heatmap_title",
    "plot_attention_heatmap",
    "relative_attention",
    "scale_bar",
    "write_heatmaps",
]

_THUMB_MAX_SIDE = 1024  # pixels of the thumbnail's longer side
ATTENTION_RANGE = 8.0  # relative attention is shown on [1 / 8, 8]
_CMAP = "RdBu_r"  # diverging: blue below uniform, white at uniform, red above
_BAR_FRACTION = 0.25  # a scale bar spans at most this share of the thumbnail's width


def relative_attention(attention: np.ndarray) -> np.ndarray:
    """``[K]`` attention as a multiple of uniform (weight x K, 1 = uniform), clipped to
    ``[1/8, 8]``. Weights need not sum to 1: they are divided by their mean.

    Raises:
        ValueError: A weight is not finite, or none is positive.
    """
    weights = np.asarray(attention, dtype=np.float64).reshape(-1)
    if not np.isfinite(weights).all():
        bad = int((~np.isfinite(weights)).sum())
        raise ValueError(f"{bad} of {weights.size} attention weights are not finite")
    weights = np.clip(weights, 0.0, None)
    if not weights.sum() > 0:
        raise ValueError(f"none of the {weights.size} attention weights is positive")
    return np.clip(weights / weights.mean(), 1 / ATTENTION_RANGE, ATTENTION_RANGE)


def _attention_norm() -> LogNorm:
    return LogNorm(vmin=1 / ATTENTION_RANGE, vmax=ATTENTION_RANGE)


def attention_colours(attention: np.ndarray) -> np.ndarray:
    """``[K]`` colour-map positions in ``[0, 1]`` of the tiles' attention; uniform is 0.5.

    Example:
        >>> attention_colours(np.full(4, 0.25)).tolist()
        [0.5, 0.5, 0.5, 0.5]
    """
    return np.asarray(_attention_norm()(relative_attention(attention)), dtype=np.float64)


def scale_bar(thumb_mpp: float, width_px: int) -> tuple[float, float]:
    """A round length (1, 2 or 5 x 10^n µm) at most a quarter of the thumbnail's width.

    Returns:
        ``(length in µm, length in thumbnail pixels)``.

    Example:
        >>> scale_bar(2.0, 1000)
        (500.0, 250.0)
    """
    if not (thumb_mpp > 0 and width_px > 0):
        raise ValueError(f"Expected thumb_mpp > 0 and width_px > 0, got {thumb_mpp}, {width_px}")
    limit = _BAR_FRACTION * width_px * thumb_mpp
    power = 10.0 ** math.floor(math.log10(limit))
    length = max(m * power for m in (1, 2, 5) if m * power <= limit)
    return float(length), length / thumb_mpp


def _length_label(um: float) -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} µm"


def heatmap_title(slide_id: str, prediction: Mapping[str, Any]) -> str:
    """``"<id>: P(positive) 0.873, target 1"`` (binary), class probabilities to 3 decimals
    (multiclass) or ``"prediction 2.310"`` (regression), with the target where known.

    Example:
        >>> heatmap_title("s1", {"probabilities": np.float32(0.8734), "target": 1})
        's1: P(positive) 0.873, target 1'
    """
    if prediction.get("probabilities") is not None:
        probs = np.asarray(prediction["probabilities"], dtype=np.float64).reshape(-1)
        text = (
            f"P(positive) {probs[0]:.3f}"
            if probs.size == 1
            else "P(class) [" + ", ".join(f"{v:.3f}" for v in probs) + "]"
        )
    else:
        value = np.asarray(prediction.get("prediction", math.nan), dtype=np.float64).reshape(-1)
        text = "prediction " + ", ".join(f"{v:.3f}" for v in value)
    target = prediction.get("target")
    if target is not None:
        text += ", target " + ", ".join(f"{v:g}" for v in np.asarray(target).reshape(-1).tolist())
    return f"{slide_id}: {text}"


def _heat(
    shape: tuple[int, int], coords: np.ndarray, side: int, scale: float, values: np.ndarray
) -> np.ndarray:
    """``[h, w]`` float32: each tile's value painted on its thumbnail square, NaN elsewhere."""
    heat = np.full(shape, np.nan, dtype=np.float32)
    for (x, y), v in zip(np.asarray(coords), values, strict=True):
        c, r = max(0, round(x * scale)), max(0, round(y * scale))
        heat[r : r + side, c : c + side] = v
    return heat


def _draw_scale_bar(ax: plt.Axes, thumb_mpp: float, shape: tuple[int, int]) -> None:
    """A black line of a round length in µm with its label, bottom left, outlined in white."""
    um, px = scale_bar(thumb_mpp, shape[1])
    x0, y = 0.04 * shape[1], 0.95 * shape[0]
    outline = [patheffects.withStroke(linewidth=4, foreground="white")]
    ax.plot([x0, x0 + px], [y, y], c="black", lw=2.5, solid_capstyle="butt", path_effects=outline)
    ax.text(x0 + px / 2, y - 0.015 * shape[0], _length_label(um), ha="center", va="bottom",
            fontsize=7, path_effects=outline)  # fmt: skip


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
    """Per-tile attention, relative to uniform, painted over the slide thumbnail.

    Args:
        thumbnail: ``[h, w, 3]`` uint8 at ``thumb_mpp`` µm/px.
        thumb_mpp: The thumbnail's µm per pixel (sets the scale bar).
        slide_mpp: Level-0 µm per pixel.
        coords: ``[K, 2]`` level-0 top-left ``(x, y)`` of the tiles.
        tile_size_level0: A tile's side in level-0 pixels.
        attention: ``[K]`` weights; shown as :func:`relative_attention` on a log scale.
        path: PNG to write.
        title: Figure title, shown as plain text (no mathtext).
        boxes: Level-0 ``[x, y, w, h]`` rectangles to outline (e.g. known lesions).
    """
    scale = slide_mpp / thumb_mpp
    side = max(1, round(tile_size_level0 * scale))
    heat = _heat(thumbnail.shape[:2], coords, side, scale, relative_attention(attention))
    aspect = thumbnail.shape[0] / thumbnail.shape[1]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.0 * aspect + 0.6), layout="constrained")
    try:
        axes[0].imshow(thumbnail)
        axes[1].imshow(thumbnail)
        shown = axes[1].imshow(heat, cmap=_CMAP, norm=_attention_norm(), alpha=0.6)
        for ax in axes:
            for x, y, w, h in boxes:
                ax.add_patch(plt.Rectangle((x * scale, y * scale), w * scale, h * scale,
                                           fill=False, ec="cyan", lw=1))  # fmt: skip
            _draw_scale_bar(ax, thumb_mpp, thumbnail.shape[:2])
            ax.set_axis_off()
        bar = fig.colorbar(shown, ax=axes[1], fraction=0.04)
        ticks = [2.0**i for i in range(-3, 4)]
        bar.set_ticks(ticks, labels=[f"{t:g}" if t >= 1 else f"1/{1 / t:g}" for t in ticks])
        bar.minorticks_off()
        bar.set_label("attention × K (1 = uniform, log scale)")
        fig.suptitle(title, fontsize=9, parse_math=False)
        fig.savefig(path, dpi=110, bbox_inches="tight")
    finally:
        plt.close(fig)


def heatmap_path(out_dir: Path, slide_id: str) -> Path:
    """``out_dir/<slide_id>.png`` for an id that is already a safe file name; otherwise the
    sanitised id plus a digest of it, so distinct ids never share a file and none leaves
    ``out_dir``."""
    slide_id = str(slide_id)
    return inside(out_dir, slide_id, ".png", unique=safe_name(slide_id) != slide_id)


def _write_one(
    pred: Mapping[str, Any], entry: SlideEntry, path: Path, boxes: Sequence[Sequence[float]]
) -> None:
    """Read the slide's thumbnail and write its heatmap to ``path``."""
    with Slide(entry.path, mpp=entry.tiles.slide_mpp, slide_id=entry.slide_id) as slide:
        side_um = max(slide.dimensions) * slide.mpp
        thumbnail, thumb_mpp = slide.thumbnail(side_um / _THUMB_MAX_SIDE)
        slide_mpp = slide.mpp
    plot_attention_heatmap(
        thumbnail,
        thumb_mpp,
        slide_mpp,
        np.asarray(pred["coords"]).reshape(-1, 2),
        entry.tiles.tile_size_level0,
        np.asarray(pred["attention"]),
        path,
        heatmap_title(entry.slide_id, pred),
        boxes,
    )


def write_heatmaps(
    predictions: Sequence[Mapping[str, Any]],
    entries: Mapping[str, SlideEntry],
    out_dir: Path,
    boxes: Mapping[str, Sequence[Sequence[float]]] | None = None,
    failures: list[tuple[str, str]] | None = None,
) -> list[Path]:
    """One PNG per prediction: the slide's thumbnail and its per-tile attention beside it.

    A heatmap that cannot be written (unreadable slide, no entry for the id, a plotting error)
    is a warning naming the slide and the reason, and is appended to ``failures``; the others
    are still written. Predictions without attention (the "mean" aggregator) are skipped.

    Args:
        predictions: ``SlideModule.predict_step`` outputs (``slide_id``, ``attention`` ``[k]``,
            ``coords`` ``[k, 2]``, a probability or value, optionally ``target``).
        entries: The slides by id (path, mpp and tile geometry).
        out_dir: Where the PNGs go (:func:`heatmap_path`).
        boxes: Level-0 ``[x, y, w, h]`` regions to outline per slide (known lesions).
        failures: Receives ``(slide_id, reason)`` for each heatmap not written.

    Returns:
        The written paths.
    """
    written: list[Path] = []
    entries = {**entries, **{m.slide_id: m for e in entries.values() for m in slides_of(e)}}
    for pred in (one for p in predictions for one in per_slide(p, entries)):
        if pred.get("attention") is None:
            continue
        slide_id = str(pred.get("slide_id"))
        path, reason = _try_write(pred, entries.get(slide_id), out_dir, boxes or {})
        if path is not None:
            written.append(path)
            continue
        warnings.warn(f"heatmap of slide {slide_id!r} not written: {reason}", stacklevel=2)
        if failures is not None:
            failures.append((slide_id, reason))
    return written


def per_slide(prediction: Mapping[str, Any], entries: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """A patient bag's prediction as one prediction per slide (its tiles' coordinates and
    attention, the patient's score), so each slide gets its own heatmap; a slide's as is."""
    bag = entries.get(str(prediction.get("slide_id")))
    index = prediction.get("slide_index")
    if not isinstance(bag, BagEntry) or index is None or prediction.get("attention") is None:
        return [prediction]
    index = np.asarray(index)
    coords, attention = np.asarray(prediction["coords"]), np.asarray(prediction["attention"])
    return [
        {**prediction, "slide_id": m.slide_id, "coords": coords[index == i],
         "attention": attention[index == i]}
        for i, m in enumerate(bag.members)
        if (index == i).any()
    ]  # fmt: skip


def _try_write(
    pred: Mapping[str, Any],
    entry: SlideEntry | None,
    out_dir: Path,
    boxes: Mapping[str, Sequence[Sequence[float]]],
) -> tuple[Path | None, str]:
    """``(path, "")`` for a written heatmap, ``(None, reason)`` for one that was not."""
    if entry is None:
        return None, "no slide entry with this id among the slides given"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = heatmap_path(out_dir, entry.slide_id)
        _write_one(pred, entry, path, boxes.get(entry.slide_id, ()))
    except Exception as err:  # one bad slide or plot must not end the run
        return None, " ".join(f"{type(err).__name__}: {err}".split())
    return path, ""
