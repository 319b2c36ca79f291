"""Synthetic H&E-like pyramidal slides that real OpenSlide reads: the embedded default dataset.

Slides are drawn in physical units (µm) on a 1 µm grid, coloured by Beer-Lambert mixing of
hematoxylin and eosin optical densities, then resampled to the requested mpp, so the same seed
gives the same tissue at 0.25 and 0.5 µm/px. Positive slides carry a few small lesions (dense
clusters of large, dark, hyperchromatic nuclei) covering a few percent of the tissue; negatives
differ from one another in stain strength, colour cast, tissue shape and amount, and cellularity.

Two task variants (``task=``), the pixels of a seed identical in their shared parts:

- ``"classic"`` (the default, the law above): 1-4 lesions, each 1-2 tiles of 112 µm across,
  1.5-5% of the tissue. A K-tile sample of a positive slide almost always holds lesion tiles, so
  training is easy at any K (the survival demo and the foundation study are recorded on it).
- ``"hard"`` (the demo's default): the paper's regime, where more tiles per slide help.
  Lesions are fewer and smaller: 1-3 of them, 1-1.7 tiles across (56-95 µm radius), 0.9-4.8%
  of the tissue (median 2.2%; measured over 20 seeds), so a positive slide of ~140 tissue tiles
  has 2-18 tiles touching a lesion (7.8% on average) and a K-tile sample misses them all with
  probability 0.73 (K=4), 0.55 (K=8), 0.34 (K=16), 0.16 (K=32), 0.05 (K=64), 0.01 (K=128): the
  slide label is then noise for that step. Every slide, negative or positive, also carries 1-2
  lymphoid aggregates, the distractors: dense clusters of small dark normal nuclei (3 µm, 2.6
  times the lesions' density) 0.5-1.3 tiles across, so "a dark cluster" does not give the label
  away; a model must learn the lesion's larger nuclei in a hyperchromatic haze with less eosin.
  Stain varies more from slide to slide (H strength 0.55-1.45x, E 0.3-1.3x, stain vectors
  +-0.09 OD, glass tint +-6 levels). A sparser law (1-2 lesions of 0.5-1.2 tiles, 3 aggregates)
  did not train in the demo's budget, even at K=128 (training loss still ln 2 after 7 epochs).
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing as mp
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

__all__ = [
    "LESIONS_FORMAT",
    "TASKS",
    "SyntheticSlide",
    "lesion_boxes",
    "make_synthetic_dataset",
    "make_synthetic_slide",
    "write_pyramidal_tiff",
]

Box = tuple[int, int, int, int]

_GRID_UM = 1.0  # µm per pixel of the grid the tissue is drawn on, whatever the output mpp
_MIN_LEVEL_SIDE = 512
_TILE_UM = 112.0  # a 224 px tile at 0.5 µm/px; lesion sizes and tissue amounts are set in tiles
# Macenko et al.'s reference H&E stain vectors (optical density per unit concentration).
_H_OD = np.array([0.5626, 0.7201, 0.4062])
_E_OD = np.array([0.2159, 0.8012, 0.5581])
_FORMAT_VERSION = 3  # bump when the output changes, so cached datasets are regenerated
# (2: survival columns time, event in the manifest; 3: a stronger survival signal)
TASKS = ("classic", "hard")  # the synthetic task variants (module docstring)
# Marks a lesions.json as ours: readers ignore any other lesions.json beside a manifest.
LESIONS_FORMAT = "lightning-wsi/synthetic-lesions-v1"


@dataclass
class SyntheticSlide:
    """One synthetic slide and its ground truth.

    Attributes:
        image: level-0 pixels, ``[H, W, 3]`` uint8.
        mpp: microns per pixel of ``image``.
        label: 1 if the slide has lesions, else 0.
        lesions: lesion bounding boxes ``(x, y, w, h)`` in level-0 pixels.
        tissue_fraction: fraction of the slide area covered by tissue (pale tissue included).
        lesion_fraction: fraction of the tissue area covered by lesions.
        tissue_mask: ``[h, w]`` bool ground truth, at ``mask_mpp`` µm per pixel.
        pale_mask: ``[h, w]`` bool, the pale (fatty, lightly stained) part of the tissue.
        lesion_mask: ``[h, w]`` bool, the lesions.
        specks: dust specks on the glass, ``(x, y, w, h)`` in level-0 pixels.
        mask_mpp: microns per pixel of the masks.
        distractors: lesion-like lymphoid aggregates (``task="hard"``, any label), ``(x, y, w,
            h)`` in level-0 pixels (touching aggregates share one box).
        distractor_mask: ``[h, w]`` bool, the aggregates, at ``mask_mpp`` (None for "classic").
        task: the variant the slide was drawn with.
    """

    image: np.ndarray
    mpp: float
    label: int
    lesions: list[Box]
    tissue_fraction: float
    lesion_fraction: float
    tissue_mask: np.ndarray = field(repr=False)
    pale_mask: np.ndarray = field(repr=False)
    lesion_mask: np.ndarray = field(repr=False)
    specks: list[Box] = field(default_factory=list)
    mask_mpp: float = _GRID_UM
    distractors: list[Box] = field(default_factory=list)
    distractor_mask: np.ndarray | None = field(default=None, repr=False)
    task: str = "classic"


def _resize(arr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a float32 ``[h, w]`` field to ``shape`` (rows, cols)."""
    out = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32)).resize(
        (shape[1], shape[0]), Image.Resampling.BILINEAR
    )
    return np.asarray(out)


def _noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Smooth zero-mean, unit-variance float32 noise with features of about ``scale`` pixels."""
    cells = (max(2, int(shape[0] / scale) + 3), max(2, int(shape[1] / scale) + 3))
    low = ndimage.gaussian_filter(rng.standard_normal(cells, dtype=np.float32), 1.0)
    return _resize((low - low.mean()) / (low.std() + 1e-6), shape)


def _points(rng: np.random.Generator, shape: tuple[int, int], rate: float, p=None):
    """Poisson points (``rate`` per pixel) kept with probability ``p(ys, xs)``."""
    n = rng.poisson(rate * shape[0] * shape[1])
    ys, xs = rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)
    keep = rng.random(n) < (1.0 if p is None else p(ys, xs))
    return ys[keep], xs[keep]


def _splat(shape, ys, xs, weights, sigma: float) -> np.ndarray:
    """Gaussian blobs of peak ``weights`` and width ``sigma`` px at the points (nuclei, dust)."""
    w = np.asarray(weights, np.float32) * np.float32(2 * np.pi * sigma**2)
    imp = np.bincount(ys * shape[1] + xs, w, shape[0] * shape[1]).astype(np.float32)
    return ndimage.gaussian_filter(imp.reshape(shape), sigma, truncate=3.0)


def _membranes(rng: np.random.Generator, pale: np.ndarray, cell: float) -> np.ndarray:
    """Thin cell membranes of fat (Worley F2 - F1 edges) inside ``pale``, drawn on a 2 px grid."""
    sub = pale[::2, ::2]
    cell /= 2
    ny, nx = int(sub.shape[0] / cell) + 2, int(sub.shape[1] / cell) + 2
    seeds = rng.random((ny, nx, 2), dtype=np.float32)
    ys, xs = np.nonzero(sub)
    py, px = ys / np.float32(cell), xs / np.float32(cell)
    iy, ix = py.astype(np.int64), px.astype(np.int64)
    d1 = np.full(len(ys), np.inf, np.float32)
    d2 = d1.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            cy, cx = np.clip(iy + dy, 0, ny - 1), np.clip(ix + dx, 0, nx - 1)
            d = np.hypot(cy + seeds[cy, cx, 0] - py, cx + seeds[cy, cx, 1] - px)
            d2 = np.minimum(d2, np.maximum(d1, d))
            d1 = np.minimum(d1, d)
    edge = np.zeros(sub.shape, np.float32)
    edge[ys, xs] = np.exp(-(((d2 - d1) * cell / 0.8) ** 2))  # about 1.5 px wide
    return _resize(edge, pale.shape)


def _tissue(rng: np.random.Generator, shape: tuple[int, int], fraction: float) -> np.ndarray:
    """Irregular tissue pieces: elliptical bumps plus noise, cut at the ``fraction`` quantile."""
    h, w = shape
    step = 16.0  # px per cell of the coarse shape field
    ch, cw = int(h / step) + 1, int(w / step) + 1
    yy, xx = np.mgrid[0:ch, 0:cw] * step
    bumps = np.zeros((ch, cw))
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        ry, rx = rng.uniform(0.15, 0.4, 2) * min(h, w)
        th = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / rx
        v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / ry
        bumps = np.maximum(bumps, np.exp(-(u**2 + v**2)) * rng.uniform(0.7, 1.0))
    bumps += 0.3 * _noise(rng, (ch, cw), 12) + 0.1 * _noise(rng, (ch, cw), 3)
    margin = np.minimum(np.minimum(yy, h - yy), np.minimum(xx, w - xx))
    bumps -= 1.5 * np.clip(1 - margin / 200.0, 0, 1) ** 2  # keep pieces off the slide edge
    full = _resize(bumps, shape) + 0.05 * _noise(rng, shape, 10)  # ragged boundary
    return full > np.quantile(full[::4, ::4], 1 - fraction)


def _lesions(
    rng: np.random.Generator, tissue, pale, n: int, radius_tiles: tuple[float, float] = (0.45, 1.0)
) -> np.ndarray:
    """``n`` irregular round lesions of ``radius_tiles`` tiles (default 1-2 tiles across), well
    inside non-pale tissue."""
    inner = ndimage.distance_transform_edt((tissue & ~pale)[::8, ::8]) * 8
    mask = np.zeros_like(tissue)
    for _ in range(n):
        radius = rng.uniform(*radius_tiles) * _TILE_UM / _GRID_UM
        ys, xs = np.nonzero(inner >= min(radius * 0.8, inner.max()))
        i = rng.integers(len(ys))
        cy, cx = ys[i] * 8 + 4, xs[i] * 8 + 4
        r = int(radius * 1.5) + 2
        y0, x0 = max(cy - r, 0), max(cx - r, 0)
        yy, xx = np.mgrid[y0 : min(cy + r, tissue.shape[0]), x0 : min(cx + r, tissue.shape[1])]
        ang = np.arctan2(yy - cy, xx - cx)
        k, ph = np.arange(2, 6)[:, None, None], rng.uniform(0, 2 * np.pi, (4, 1, 1))
        wobble = 1 + (rng.uniform(-0.12, 0.12, (4, 1, 1)) * np.cos(k * ang + ph)).sum(0)
        mask[yy, xx] |= np.hypot(yy - cy, xx - cx) <= radius * wobble
    return mask & tissue


def _dust(rng: np.random.Generator, shape: tuple[int, int]):
    """A few dark specks of dust or debris on the glass, 4-12 µm across: optical density."""
    dust = np.zeros(shape, np.float32)
    boxes = []
    for _ in range(rng.integers(3, 12)):
        r = rng.uniform(2, 6) / _GRID_UM
        cy, cx = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        sl = tuple(slice(max(int(c - r - 2), 0), int(c + r + 3)) for c in (cy, cx))
        yy, xx = np.ogrid[sl]
        disc = np.clip(r + 0.5 - np.hypot(yy - cy, xx - cx), 0, 1) * rng.uniform(1.0, 2.5)
        dust[sl] = np.maximum(dust[sl], disc[: dust[sl].shape[0], : dust[sl].shape[1]])
        boxes.append(sl)
    return dust, boxes


def _box_px(sl: tuple[slice, slice], mpp: float, size: tuple[int, int]) -> Box:
    """A grid slice pair as a level-0 pixel box ``(x, y, w, h)`` at ``mpp``, clipped to ``size``."""
    x0, y0 = int(sl[1].start * _GRID_UM / mpp), int(sl[0].start * _GRID_UM / mpp)
    x1 = min(int(np.ceil(sl[1].stop * _GRID_UM / mpp)), size[1])
    y1 = min(int(np.ceil(sl[0].stop * _GRID_UM / mpp)), size[0])
    return (x0, y0, x1 - x0, y1 - y0)


def make_synthetic_slide(
    seed: int,
    *,
    positive: bool = False,
    mpp: float = 0.5,
    size_um: tuple[float, float] | None = None,
    tissue_fraction: float | None = None,
    n_lesions: int | None = None,
    task: str = "classic",
) -> SyntheticSlide:
    """Draw one H&E-like slide: tissue pieces on glass, nuclei, pale fat, dust, and lesions.

    Everything is drawn on a 1 µm grid, so a seed gives the same tissue at any ``mpp``; the
    tissue, stain and dust of a seed are also the same whether ``positive`` is set or not.

    Args:
        seed: seed of the slide; the same seed gives identical pixels.
        positive: draw lesions (dense clusters of large hyperchromatic nuclei, each 1-2 tiles
            of 112 µm across) covering about 1.5-5% of the tissue area.
        mpp: microns per pixel of the returned level-0 image.
        size_um: slide ``(width, height)`` in µm; default drawn per seed, 1.2-2.0 mm a side.
        tissue_fraction: fraction of the slide covered by tissue; default drawn per seed in
            0.2-0.8 and kept to about 70-250 tiles of 112 µm (80-200 tiles at 25% tissue).
        n_lesions: number of lesions of a positive slide; default 1-4, by tissue amount
            ("classic"), or 1-3 ("hard").
        task: "classic" or "hard" (module docstring). "hard": 1-3 lesions 1-1.7 tiles across
            (0.9-4.8% of the tissue), 1-2 lymphoid aggregates (dense small dark nuclei, 0.5-1.3
            tiles across) on every slide, and stronger stain variation; the tissue and nuclei
            of a seed are those of "classic", whose pixels this option leaves unchanged.

    Returns:
        The slide with its ``[H, W, 3]`` uint8 image and ground truth.

    Example:
        >>> slide = make_synthetic_slide(0, positive=True, size_um=(600, 400))
        >>> slide.image.shape, slide.label
        ((800, 1200, 3), 1)
    """
    if mpp <= 0:
        raise ValueError(f"Expected `mpp` > 0 µm per pixel, but got {mpp}")
    if tissue_fraction is not None and not 0 < tissue_fraction < 1:
        raise ValueError(f"Expected `tissue_fraction` in (0, 1), but got {tissue_fraction}")
    if n_lesions is not None and n_lesions < 1:
        raise ValueError(f"Expected `n_lesions` >= 1, but got {n_lesions}")
    if task not in TASKS:
        raise ValueError(f"Expected `task` in {TASKS}, but got {task!r}")
    hard = task == "hard"
    # A 6th stream only "hard" draws from, so "classic" pixels stay those of every release.
    r_hard = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(5,)))
    r_geo, r_stain, r_nuc, r_les, r_dust = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(5)
    )
    w_um, h_um = size_um if size_um is not None else r_geo.uniform(1200, 2000, 2)
    shape = (max(16, round(h_um / _GRID_UM)), max(16, round(w_um / _GRID_UM)))
    area_tiles = shape[0] * shape[1] * _GRID_UM**2 / _TILE_UM**2
    frac = r_geo.uniform(0.2, 0.8)
    if tissue_fraction is None:  # couple the amount to the slide size: ~70-250 tissue tiles
        tissue_fraction = float(np.clip(frac, 70 / area_tiles, min(0.8, 250 / area_tiles)))
    tissue = _tissue(r_geo, shape, tissue_fraction)
    t = tissue.astype(np.float32)
    low, mid, fine = (_noise(r_geo, shape, s / _GRID_UM) for s in (150, 40, 5))
    pale_n = _noise(r_geo, shape, 200 / _GRID_UM)
    pale_q = np.quantile(pale_n[tissue][::16], 1 - r_geo.uniform(0.05, 0.3)) if tissue.any() else 0
    pale = tissue & (pale_n > pale_q)
    membranes = _membranes(r_geo, pale, r_geo.uniform(35, 60) / _GRID_UM)

    # Per-slide stain and scanner: H and E strength and hue, glass tint, cellularity.
    h_vec = np.abs(_H_OD + r_stain.normal(0, 0.06, 3)).astype(np.float32)
    e_vec = np.abs(_E_OD + r_stain.normal(0, 0.06, 3)).astype(np.float32)
    h_s, e_s = float(r_stain.uniform(0.7, 1.3)), float(r_stain.uniform(0.4, 1.2))
    glass = r_stain.uniform(238, 247) + r_stain.uniform(-3, 3, 3)
    density = r_stain.uniform(1 / 450, 1 / 180) * _GRID_UM**2  # nuclei per grid pixel
    theta, lam = r_stain.uniform(0, np.pi), r_stain.uniform(8, 16) / _GRID_UM
    if hard:  # stronger stain variation: colour and intensity say less about the label
        h_vec = np.abs(_H_OD + r_hard.normal(0, 0.09, 3)).astype(np.float32)
        e_vec = np.abs(_E_OD + r_hard.normal(0, 0.09, 3)).astype(np.float32)
        h_s, e_s = float(r_hard.uniform(0.55, 1.45)), float(r_hard.uniform(0.3, 1.3))
        glass = r_hard.uniform(236, 249) + r_hard.uniform(-6, 6, 3)

    # Eosin: stroma with slow variation, mottling and wavy collagen fibres; fat is near white.
    k = 2 * np.pi / lam
    ys = np.arange(shape[0], dtype=np.float32)[:, None] * np.float32(k * np.sin(theta))
    xs = np.arange(shape[1], dtype=np.float32)[None, :] * np.float32(k * np.cos(theta))
    fibre = np.sin(xs + ys + 6 * mid)
    e = t * (e_s * (0.65 + 0.12 * low + 0.1 * fibre + 0.1 * fine))
    e = np.where(pale, e_s * (0.08 + 0.02 * fine + 0.6 * membranes), e)

    # Hematoxylin: nuclei (4-7 µm) where the stroma is cellular, few in fat.
    def cellular(y, x):
        return np.where(pale[y, x], 0.05, tissue[y, x]) * np.minimum(np.exp(0.5 * low[y, x]), 2.2)

    ys, xs = _points(r_nuc, shape, density, cellular)
    nuc = _splat(shape, ys, xs, r_nuc.uniform(0.5, 1.3, len(ys)), 2.0 / _GRID_UM)
    nuc = np.clip((nuc - 0.3) * 3, 0, 1)
    h = 0.06 * t + 1.4 * nuc
    e *= 1 - 0.5 * nuc

    aggregates = _aggregates(r_hard, tissue, pale) if hard else None
    if aggregates is not None:
        h, e = _paint_aggregates(r_hard, aggregates, h, e)

    lesion = np.zeros_like(tissue)
    if positive and hard:
        n_lesions = int(r_les.integers(1, 4)) if n_lesions is None else n_lesions
        lesion = _lesions(r_les, tissue, pale | aggregates, n_lesions, _HARD_LESION_RADIUS)
        h, e = _paint_lesions(r_les, lesion, h, e)
    elif positive:
        if n_lesions is None:  # lesions cover about 1.5-5% of the tissue area
            tissue_tiles = tissue.sum() * _GRID_UM**2 / _TILE_UM**2
            n_lesions = int(np.clip(round(r_les.uniform(0.015, 0.05) * tissue_tiles / 1.65), 1, 4))
        lesion = _lesions(r_les, tissue, pale, n_lesions)
        h, e = _paint_lesions(r_les, lesion, h, e)

    dust, specks = _dust(r_dust, shape)

    illum = 1 + 0.006 * low  # uneven illumination
    grain = r_dust.standard_normal(shape, dtype=np.float32)
    rgb = np.empty((*shape, 3), np.uint8)
    for c in range(3):
        v = np.exp(-(h * np.float32(h_s * h_vec[c]) + e * e_vec[c] + dust))
        rgb[..., c] = np.clip(v * illum * np.float32(glass[c]) + grain, 0, 255)
    out = (max(1, round(shape[0] * _GRID_UM / mpp)), max(1, round(shape[1] * _GRID_UM / mpp)))
    resample = Image.Resampling.BILINEAR if mpp <= _GRID_UM else Image.Resampling.BOX
    image = np.asarray(Image.fromarray(rgb).resize(out[::-1], resample))

    boxes = [_box_px(s, mpp, out) for s in ndimage.find_objects(ndimage.label(lesion)[0])]
    specks = [_box_px(s, mpp, out) for s in specks]
    distractors = []
    if aggregates is not None:
        objects = ndimage.find_objects(ndimage.label(aggregates)[0])
        distractors = [_box_px(s, mpp, out) for s in objects]
    n_t = int(tissue.sum())
    return SyntheticSlide(
        image=image,
        mpp=float(mpp),
        label=int(positive),
        lesions=boxes,
        tissue_fraction=n_t / tissue.size,
        lesion_fraction=float(lesion.sum()) / max(n_t, 1),
        tissue_mask=tissue,
        pale_mask=pale,
        lesion_mask=lesion,
        specks=specks,
        distractors=distractors,
        distractor_mask=aggregates,
        task=task,
    )


_HARD_LESION_RADIUS = (0.5, 0.85)  # tiles: 1-1.7 tiles of 112 µm across
_AGGREGATE_RADIUS = (0.25, 0.65)  # tiles: lymphoid aggregates as large as the lesions


def _aggregates(rng: np.random.Generator, tissue, pale) -> np.ndarray:
    """1-2 lymphoid aggregates (the "hard" distractors) in non-pale tissue, on any slide."""
    return _lesions(rng, tissue, pale, int(rng.integers(1, 3)), _AGGREGATE_RADIUS)


def _paint_aggregates(rng: np.random.Generator, mask, h, e):
    """Dense small dark nuclei (3 µm, ~1 per 35 µm²) in ``mask``: returns new ``(h, e)``."""
    return _paint_nuclei(rng, mask, h, e, per_um2=35, sizes=(0.8, 1.2), radius_um=1.5,
                         haze=0.1, stain=1.6, eosin_loss=0.3)  # fmt: skip


def _paint_lesions(rng: np.random.Generator, mask, h, e):
    """Large hyperchromatic nuclei (5.4 µm, ~1 per 90 µm²) in a dark haze with less eosin."""
    return _paint_nuclei(rng, mask, h, e, per_um2=90, sizes=(0.9, 1.4), radius_um=2.7,
                         haze=0.35, stain=2.2, eosin_loss=0.6)  # fmt: skip


def _paint_nuclei(
    rng: np.random.Generator, mask, h, e, *, per_um2: float, sizes: tuple[float, float],
    radius_um: float, haze: float, stain: float, eosin_loss: float,
):  # fmt: skip
    """Nuclei in ``mask`` (one per ``per_um2`` µm², of ``radius_um`` times a size drawn from
    ``sizes``) over a haematoxylin ``haze``, with ``stain`` their darkness and eosin reduced by
    ``eosin_loss`` under the soft mask: returns new ``(h, e)``."""
    soft = ndimage.gaussian_filter(mask.astype(np.float32), 4.0 / _GRID_UM)
    ys, xs = _points(rng, mask.shape, _GRID_UM**2 / per_um2, lambda y, x: mask[y, x])
    nuclei = _splat(mask.shape, ys, xs, rng.uniform(*sizes, len(ys)), radius_um / _GRID_UM)
    h = h * (1 - soft) + soft * (haze + stain * np.clip((nuclei - 0.3) * 3, 0, 1))
    return h, e * (1 - eosin_loss * soft)


def write_pyramidal_tiff(
    path: str | os.PathLike,
    image: np.ndarray,
    mpp: float,
    flavour: str = "tiff",
    tile_size: int = 256,
    compression: str | None = "jpeg",
    quality: int = 90,
) -> Path:
    """Write ``image`` as a tiled pyramidal TIFF that OpenSlide reads, atomically.

    Level 0 is ``image``; each further level halves it (2x2 area average) until its smaller side
    is at most 512 px. Every level is a tiled top-level IFD (reduced levels have subfiletype 1).

    Args:
        path: file to write; written to a temporary file in the same folder, then renamed.
        image: level-0 pixels, ``[H, W, 3]`` uint8.
        mpp: microns per pixel of level 0.
        flavour: "tiff" for a generic tiled TIFF whose resolution tags (pixels per cm) carry the
            mpp (OpenSlide "generic-tiff"), or "svs" for an Aperio-style ImageDescription with
            ``|AppMag = round(10 / mpp)|MPP = mpp`` (OpenSlide "aperio").
        tile_size: tile side in pixels, a multiple of 16.
        compression: "jpeg" (as scanners write), "zlib" (lossless) or None.
        quality: JPEG quality.

    Returns:
        The path written.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"Expected `image` [H, W, 3] uint8, but got {image.shape} {image.dtype}")
    if flavour not in ("tiff", "svs"):
        raise ValueError(f"Expected `flavour` in ('tiff', 'svs'), but got {flavour!r}")
    if compression not in ("jpeg", "zlib", None):
        raise ValueError(
            f"Expected `compression` in ('jpeg', 'zlib', None), but got {compression!r}"
        )
    if tile_size <= 0 or tile_size % 16:
        raise ValueError(f"Expected `tile_size` a positive multiple of 16, but got {tile_size}")
    if mpp <= 0:
        raise ValueError(f"Expected `mpp` > 0 µm per pixel, but got {mpp}")
    path = Path(path)
    h, w = image.shape[:2]
    codec = {
        "jpeg": ("jpeg", {"level": quality}),
        "zlib": ("zlib", {"level": 6}),
        None: (None, None),
    }[compression]
    desc_codec = {"jpeg": f"JPEG/RGB Q={quality}", "zlib": "ZLIB/RGB", None: "RAW/RGB"}[compression]
    head = f"Aperio Image Library v12.0.0\r\n{w}x{h} [0,0 {w}x{h}] ({tile_size}x{tile_size})"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        with tifffile.TiffWriter(tmp, bigtiff=image.nbytes > 2**31) as tif:
            level, i = image, 0
            while True:
                kw: dict = {}
                if flavour == "svs":
                    kw["description"] = (
                        f"{head} {desc_codec}|AppMag = {round(10 / mpp)}|MPP = {mpp:g}"
                        if i == 0
                        else f"{head} -> {level.shape[1]}x{level.shape[0]} {desc_codec}"
                    )
                else:
                    kw["resolution"] = (1e4 / (mpp * 2**i),) * 2
                    kw["resolutionunit"] = "CENTIMETER"
                tif.write(
                    level,
                    tile=(tile_size, tile_size),
                    photometric="rgb",
                    compression=codec[0],
                    compressionargs=codec[1],
                    subfiletype=1 if i else 0,
                    metadata=None,
                    maxworkers=1,
                    **kw,
                )
                if min(level.shape[:2]) <= _MIN_LEVEL_SIDE:
                    break
                lh, lw = level.shape[0] // 2 * 2, level.shape[1] // 2 * 2
                level = np.asarray(Image.fromarray(level[:lh, :lw]).reduce(2))
                i += 1
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a slide is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_one(task: dict) -> tuple[str, list[Box]]:
    slide = make_synthetic_slide(
        task["seed"], positive=bool(task["label"]), mpp=task["mpp"], task=task["task"]
    )
    write_pyramidal_tiff(task["path"], slide.image, slide.mpp, flavour=task["flavour"])
    return task["slide_id"], slide.lesions


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text)
    os.replace(tmp, path)


def lesion_boxes(lesions: object) -> dict[str, list[list[float]]]:
    """Check the ``"lesions"`` entry of a ``lesions.json``: slide id -> ``[[x, y, w, h], ...]``.

    Raises:
        ValueError: Not a mapping of lists of 4 finite numbers; names the slide and the value.

    Example:
        >>> lesion_boxes({"syn_001": [[10, 20, 30.5, 40]]})
        {'syn_001': [[10, 20, 30.5, 40]]}
    """
    if not isinstance(lesions, dict):
        raise ValueError(f"expected a mapping of slide id to boxes, got {type(lesions).__name__}")
    for slide_id, boxes in lesions.items():
        if not isinstance(boxes, list) or not all(_is_box(b) for b in boxes):
            raise ValueError(
                f"slide {slide_id!r}: expected a list of [x, y, w, h] boxes of 4 finite numbers, "
                f"got {str(boxes)[:80]}"
            )
    return {str(slide_id): [list(b) for b in boxes] for slide_id, boxes in lesions.items()}


def _is_box(box: object) -> bool:
    """4 finite numbers (JSON's ``true`` is a bool, not a number)."""
    return (
        isinstance(box, list)
        and len(box) == 4
        and all(
            isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in box
        )
    )


def _write_lesions(root: Path, lesions: dict[str, list]) -> None:
    """``root/lesions.json`` with the format marker that readers of the boxes require."""
    payload = {"format": LESIONS_FORMAT, "lesions": lesions}
    _write_atomic(root / "lesions.json", json.dumps(payload, indent=1))


def _upgrade_lesions(root: Path) -> None:
    """Rewrite a ``lesions.json`` from before the format marker (a bare slide id -> boxes
    mapping) with the marker. Anything else is left alone: a marked file is current, and a
    missing, foreign or malformed one means heatmaps draw no lesion boxes (the slides are fine)."""
    path = root / "lesions.json"
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, RecursionError):
        return
    if not isinstance(data, dict) or "format" in data:
        return
    try:
        _write_lesions(root, lesion_boxes(data))
    except (OSError, ValueError):  # malformed, or a read-only dataset folder: no boxes
        return


# Survival: months to the event follow an exponential law whose hazard is higher for a slide with
# lesions and grows with their number; follow-up ends at a uniform censoring time. The hazard
# ratio of a positive slide to a negative one is exp(1.5 + 0.5 n), 6.7x to 33x for 1-4 lesions:
# with the follow-up below, about 40% of negatives and nearly all positives have an event, and
# ranking by the true hazard gives a C-index of about 0.78 (0.74 by the label alone).
_BASE_HAZARD = 1 / 60  # per month, a slide without lesions: median survival about 42 months
_POSITIVE_LOG_HAZARD = 1.5  # log hazard ratio of having lesions at all
_HAZARD_PER_LESION = 0.5  # log hazard ratio per lesion
_MAX_FOLLOW_UP = 60.0  # months


def synthetic_survival(seed: int, index: int, n_lesions: int) -> tuple[float, int]:
    """``(time, event)`` of synthetic slide ``index``: time depends on its lesion burden, and
    censoring at a random follow-up time. Deterministic in ``(seed, index, n_lesions)``."""
    rng = np.random.default_rng([seed, index, 17])
    log_ratio = (_POSITIVE_LOG_HAZARD if n_lesions else 0.0) + _HAZARD_PER_LESION * n_lesions
    event_time = rng.exponential(1 / (_BASE_HAZARD * math.exp(log_ratio)))
    follow_up = rng.uniform(0.2 * _MAX_FOLLOW_UP, _MAX_FOLLOW_UP)
    return round(float(min(event_time, follow_up)), 2), int(event_time <= follow_up)


def _manifest_text(tasks: list[dict], lesions: dict[str, list], seed: int) -> str:
    """``slide_id,path,label,time,event`` rows: the columns every built-in task reads."""
    rows = []
    for i, t in enumerate(tasks):
        time, event = synthetic_survival(seed, i, len(lesions.get(t["slide_id"], ())))
        rows.append(f"{t['slide_id']},{t['rel']},{t['label']},{time},{event}\n")
    return "slide_id,path,label,time,event\n" + "".join(rows)


def make_synthetic_dataset(
    root: str | os.PathLike,
    n_slides: int = 40,
    *,
    seed: int = 0,
    positive_fraction: float = 0.5,
    flavours: tuple[str, ...] = ("tiff", "svs"),
    mpps: dict[str, float] | None = None,
    num_workers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    task: str = "classic",
) -> Path:
    """Write a synthetic slide dataset and its manifest; reuse it when already there.

    Writes ``root/slides/syn_XXX.{tiff,svs}``, ``root/manifest.csv`` (``slide_id,path,label,
    time,event`` with paths relative to ``root``; ``time`` and ``event`` a survival target
    whose hazard grows with the slide's lesions, see :func:`synthetic_survival`),
    ``root/lesions.json`` (``{"format": LESIONS_FORMAT, "lesions": {slide_id: [[x, y, w, h],
    ...]}}``, level-0 pixels, positives only) and
    ``root/synthetic.json`` (the parameters, written last: a dataset whose parameters match and
    whose files all exist is returned as is, its ``lesions.json`` rewritten with the format
    marker if it was written before the marker existed).

    Args:
        root: output folder.
        n_slides: number of slides.
        seed: dataset seed; labels and every slide are deterministic in it.
        positive_fraction: fraction of positive slides, stratified over flavours.
        flavours: file flavours, assigned to slides in turn ("tiff" and/or "svs").
        mpps: level-0 mpp per flavour; default ``{"tiff": 0.5, "svs": 0.25}``.
        num_workers: processes; default ``min(os.cpu_count(), n_slides)``, 0 or 1 runs inline.
        overwrite: regenerate even when a matching dataset exists.
        progress: show a tqdm progress bar.
        task: "classic" or "hard" (module docstring); recorded in ``synthetic.json`` (for
            "hard" only, so classic datasets written before the option stay valid), so a cached
            dataset of the other variant is regenerated.

    Returns:
        Path of ``manifest.csv``.

    Example:
        >>> import tempfile
        >>> manifest = make_synthetic_dataset(tempfile.mkdtemp(), 40)  # doctest: +SKIP
    """
    if n_slides < 1:
        raise ValueError(f"Expected `n_slides` >= 1, but got {n_slides}")
    if not 0 <= positive_fraction <= 1:
        raise ValueError(f"Expected `positive_fraction` in [0, 1], but got {positive_fraction}")
    mpps = {"tiff": 0.5, "svs": 0.25, **(mpps or {})}
    if not flavours or any(f not in ("tiff", "svs") for f in flavours):
        raise ValueError(
            f"Expected `flavours` a non-empty subset of ('tiff', 'svs'), got {flavours}"
        )
    if task not in TASKS:
        raise ValueError(f"Expected `task` in {TASKS} (data.synthetic.task), but got {task!r}")
    root = Path(root)
    manifest, params_path = root / "manifest.csv", root / "synthetic.json"
    params = {
        "version": _FORMAT_VERSION,
        "n_slides": n_slides,
        "seed": seed,
        "positive_fraction": positive_fraction,
        "flavours": list(flavours),
        "mpps": {f: float(mpps[f]) for f in flavours},
    }
    if task != "classic":
        params["task"] = task
    if not overwrite and manifest.exists() and params_path.exists():
        if json.loads(params_path.read_text()) == params:
            with manifest.open() as f:
                if all((root / row["path"]).exists() for row in csv.DictReader(f)):
                    _upgrade_lesions(root)
                    return manifest
    params_path.unlink(missing_ok=True)
    (root / "slides").mkdir(parents=True, exist_ok=True)

    # Stratified labels: positives dealt round-robin over the flavour groups, shuffled in each.
    rng = np.random.default_rng(seed)
    group = np.arange(n_slides) % len(flavours)
    perms = [rng.permutation(np.flatnonzero(group == g)) for g in range(len(flavours))]
    dealt = [p[j] for j in range(len(perms[0])) for p in perms if j < len(p)]
    labels = np.zeros(n_slides, dtype=int)
    labels[dealt[: round(n_slides * positive_fraction)]] = 1
    width = max(3, len(str(n_slides - 1)))
    tasks = []
    for i in range(n_slides):
        flavour = flavours[group[i]]
        sid = f"syn_{i:0{width}d}"
        tasks.append(
            {
                "slide_id": sid,
                "rel": f"slides/{sid}.{flavour}",
                "path": str(root / "slides" / f"{sid}.{flavour}"),
                "label": int(labels[i]),
                "flavour": flavour,
                "mpp": mpps[flavour],
                "seed": int(np.random.SeedSequence([seed, i]).generate_state(1)[0]),
                "task": task,
            }
        )
    # Largest (finest mpp) first so the last slides to finish are small ones.
    order = sorted(tasks, key=lambda t: t["mpp"])
    workers = min(os.cpu_count() or 1, n_slides) if num_workers is None else num_workers
    bar = tqdm(total=n_slides, desc="synthetic slides", disable=not progress)
    results = {}
    if workers <= 1:
        for t in order:
            sid, boxes = _write_one(t)
            results[sid] = boxes
            bar.update()
    else:
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("fork" if "fork" in methods else "spawn")
        with ctx.Pool(workers) as pool:
            for sid, boxes in pool.imap_unordered(_write_one, order):
                results[sid] = boxes
                bar.update()
    bar.close()

    lesions = {
        t["slide_id"]: [list(b) for b in results[t["slide_id"]]] for t in tasks if t["label"]
    }
    _write_lesions(root, lesions)
    _write_atomic(manifest, _manifest_text(tasks, lesions, seed))
    _write_atomic(params_path, json.dumps(params, indent=1))
    return manifest
