"""Attention heatmaps of predicted slides over their thumbnails."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_wsi.data.dataset import SlideEntry
from lightning_wsi.data.slide import Slide
from lightning_wsi.reports import plot_attention_heatmap

__all__ = ["write_heatmaps"]

_THUMB_MAX_SIDE = 1024  # pixels of the thumbnail's longer side


def write_heatmaps(
    predictions: Sequence[Mapping[str, Any]],
    entries: Mapping[str, SlideEntry],
    out_dir: Path,
    boxes: Mapping[str, Sequence[Sequence[float]]] | None = None,
) -> list[Path]:
    """One PNG per prediction: the slide's thumbnail and its per-tile attention beside it.

    Args:
        predictions: ``SlideModule.predict_step`` outputs (``slide_id``, ``attention`` ``[k]``,
            ``coords`` ``[k, 2]``, a probability or value, optionally ``target``).
        entries: The slides by id (path, mpp and tile geometry).
        out_dir: Where the PNGs go (``<slide_id>.png``).
        boxes: Level-0 ``[x, y, w, h]`` regions to outline per slide (known lesions).

    Returns:
        The written paths.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for pred in predictions:
        if pred.get("attention") is None:
            continue
        entry = entries[pred["slide_id"]]
        with Slide(entry.path, mpp=entry.tiles.slide_mpp, slide_id=entry.slide_id) as slide:
            side_um = max(slide.dimensions) * slide.mpp
            thumbnail, thumb_mpp = slide.thumbnail(side_um / _THUMB_MAX_SIDE)
            slide_mpp = slide.mpp
        score = pred.get("probabilities", pred.get("prediction"))
        score_text = np.array2string(np.asarray(score, dtype=float), precision=3)
        target = pred.get("target")
        title = f"{entry.slide_id}: prediction {score_text}"
        if target is not None:
            title += f", target {np.asarray(target).tolist()}"
        path = out_dir / f"{entry.slide_id}.png"
        plot_attention_heatmap(
            thumbnail,
            thumb_mpp,
            slide_mpp,
            np.asarray(pred["coords"]),
            entry.tiles.tile_size_level0,
            np.asarray(pred["attention"]),
            path,
            title,
            (boxes or {}).get(entry.slide_id, ()),
        )
        written.append(path)
    return written
