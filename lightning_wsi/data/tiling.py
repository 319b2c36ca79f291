"""Tissue tiles of one slide: a non-overlapping grid at a target mpp, kept where tissue is.

The tissue mask comes from a low-resolution thumbnail
(:func:`~lightning_wsi.data.tissue.tissue_mask`) at about 1/16 of a tile per pixel; each grid
tile's tissue fraction is the exact area average of the mask over the tile's footprint. Tiles with
at least ``min_tissue_fraction`` tissue are kept.

Nothing about a slide or its cache entry is trusted: the run's parameters are checked once
(:func:`check_tiling_params`), a slide's mpp must be physical, a target finer than the slide is
refused unless asked for, one tile is read at the training resolution so a corrupt full-resolution
level fails here rather than mid-training, a cache entry is verified against the slide, and a
cache that cannot be written costs the cache, not the slide.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lightning_wsi.data.cache import cache_file, load_entry, save_entry, slide_identity
from lightning_wsi.data.slide import (
    MAX_MPP,
    MIN_MPP,
    Slide,
    SlideError,
    level0_tile_size,
    mpp_problem,
    out_of_memory,
)
from lightning_wsi.data.tissue import GRAYSCALE_NOTE, is_grayscale, tissue_mask

__all__ = [
    "MAX_TILE_SIZE",
    "MIN_TILE_SIZE",
    "TILING_VERSION",
    "UPSAMPLING_TOLERANCE",
    "SlideTiles",
    "check_tiling_params",
    "tile_slide",
]

# Bump when the tiler's output changes for the same inputs: stale cache entries then re-tile.
# 2: thumbnails read in bands (box average, then bilinear), mask size capped, `note` stored.
TILING_VERSION = 2
# Tile side in pixels: below 16 px no encoder sees tissue structure; above 4096 px one tile is
# 48 MiB of uint8 and a K-tile batch does not fit any device.
MIN_TILE_SIZE = 16
MAX_TILE_SIZE = 4096
# A target mpp up to 10% finer than the slide's is read at the slide's resolution, stretched a
# little (0.25 from a 0.263 mpp "40x" scanner is 5%): scanners' nominal 20x/40x differ that much.
# Finer than that, tiles would be invented detail and are refused unless allow_upsampling=True.
UPSAMPLING_TOLERANCE = 0.10
# Thumbnail resolution: at most 8 µm/px, and at least 16 mask pixels across one tile, but never
# more than 2**24 pixels (16.8 Mpx: the thumbnail and mask arrays stay within a few hundred MB).
_MASK_MAX_MPP = 8.0
_MASK_PIXELS_PER_TILE = 16
_MASK_MAX_PIXELS = 1 << 24


@dataclass(frozen=True)
class SlideTiles:
    """The tissue tiles of one slide.

    Attributes:
        coords: ``[n, 2]`` int64 level-0 top-left ``(x, y)`` of each tile, row-major.
        tile_size_level0: side of one tile in level-0 pixels.
        mpp: microns per pixel of the tiles as read (the target).
        tile_size: side of one tile in pixels as read.
        slide_mpp: the slide's true level-0 microns per pixel.
        dimensions: level-0 ``(width, height)``.
        from_cache: whether the coordinates came from the on-disk cache.
        cache_error: why the coordinates could not be written to the cache (read-only folder,
            full disk), or ``None``; the tiles are valid either way, only uncached.
        note: why the slide has no tissue tile when the tiler can tell (a grayscale slide), or
            ``None``.
    """

    coords: np.ndarray
    tile_size_level0: int
    mpp: float
    tile_size: int
    slide_mpp: float
    dimensions: tuple[int, int]
    from_cache: bool = field(default=False, compare=False)
    cache_error: str | None = field(default=None, compare=False)
    note: str | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.coords)


def check_tiling_params(mpp: float, tile_size: int, min_tissue_fraction: float = 0.5) -> None:
    """Refuse implausible tiling parameters of a run, once, before any slide is opened.

    Args:
        mpp: target µm per pixel of the tiles, in [``MIN_MPP``, ``MAX_MPP``] = [0.05, 20].
        tile_size: tile side in pixels, a whole number in [``MIN_TILE_SIZE``,
            ``MAX_TILE_SIZE``] = [16, 4096].
        min_tissue_fraction: in [0, 1].

    Raises:
        ValueError: naming the key (``mpp``, ``tile_size``, ``min_tissue_fraction``), the value
            and the plausible range.
    """
    problem = mpp_problem(mpp)
    if problem is not None:
        raise ValueError(
            f"`mpp` (target µm per pixel of the tiles) {mpp!r} {problem}; use a value in "
            f"[{MIN_MPP}, {MAX_MPP}]: 0.5 is 20x, 0.25 is 40x"
        )
    whole = isinstance(tile_size, numbers.Integral) or (
        isinstance(tile_size, float) and tile_size.is_integer()
    )
    if isinstance(tile_size, bool) or not whole:
        raise ValueError(f"`tile_size` must be a whole number of pixels, got {tile_size!r}")
    if not MIN_TILE_SIZE <= tile_size <= MAX_TILE_SIZE:
        raise ValueError(
            f"`tile_size` {tile_size} px is outside [{MIN_TILE_SIZE}, {MAX_TILE_SIZE}]; "
            "224 is usual"
        )
    if isinstance(min_tissue_fraction, bool) or not (
        isinstance(min_tissue_fraction, numbers.Real) and 0.0 <= min_tissue_fraction <= 1.0
    ):
        raise ValueError(
            f"min_tissue_fraction must lie in [0, 1], got {min_tissue_fraction!r} "
            "(key `min_tissue_fraction`)"
        )


def tile_slide(
    path: str | os.PathLike,
    mpp: float = 0.5,
    tile_size: int = 224,
    *,
    min_tissue_fraction: float = 0.5,
    slide_mpp: float | None = None,
    cache_dir: str | os.PathLike | None = None,
    slide_id: str | None = None,
    tissue_options: dict[str, Any] | None = None,
    allow_upsampling: bool = False,
    probe: bool = True,
) -> SlideTiles:
    """Tile one slide's tissue on a non-overlapping grid at ``mpp``.

    Args:
        path: a slide OpenSlide reads.
        mpp: target microns per pixel of the tiles (0.5 = 20x).
        tile_size: tile side in pixels at ``mpp``.
        min_tissue_fraction: keep a tile if at least this fraction of it is tissue.
        slide_mpp: the slide's level-0 mpp when its metadata lacks it or is wrong.
        cache_dir: folder of the coordinate cache (:mod:`lightning_wsi.data.cache`); ``None``
            tiles without caching. An entry is verified against the slide before use; one that
            cannot be written leaves the tiles uncached with ``cache_error`` set.
        slide_id: name for error messages and the cache file (defaults to the file name).
        tissue_options: keyword arguments for :func:`~lightning_wsi.data.tissue.tissue_mask`.
        allow_upsampling: accept a target ``mpp`` more than ``UPSAMPLING_TOLERANCE`` (10%) finer
            than the slide's: tiles are then UPSAMPLED from level 0 (interpolated, no real
            detail). Off by default, as it is usually a wrong ``mpp`` or slide metadata.
        probe: read one tissue tile (the middle one of ``coords``) at ``mpp`` through
            :meth:`Slide.read_tile`, on a fresh tiling and on a cache hit alike, so a slide
            whose full-resolution levels are corrupt under an intact thumbnail fails here, not
            during training.

    Returns:
        The slide's :class:`SlideTiles`; zero tiles when it has no tissue (with ``note`` set
        when the reason is known).

    Raises:
        ValueError: implausible ``mpp``, ``tile_size`` or ``min_tissue_fraction``
            (:func:`check_tiling_params`).
        SlideError: the slide is missing, unreadable, has no or an implausible mpp, would be
            upsampled, its probe tile cannot be read, or memory ran out reading it.

    Example:
        >>> from lightning_wsi.data import make_synthetic_dataset, tile_slide
        >>> import tempfile, csv, os
        >>> root = tempfile.mkdtemp()
        >>> manifest = make_synthetic_dataset(root, n_slides=2, progress=False)
        >>> row = next(csv.DictReader(open(manifest)))
        >>> tiles = tile_slide(os.path.join(root, row["path"]), mpp=0.5, tile_size=224)
        >>> tiles.coords.shape[1], tiles.tile_size_level0 in (224, 448)
        (2, True)
    """
    check_tiling_params(mpp, tile_size, min_tissue_fraction)
    slide_id = slide_id or Path(path).name
    with Slide(path, mpp=slide_mpp, slide_id=slide_id) as slide:  # checks the override too
        check_upsampling(slide, mpp, allow_upsampling)
        params = _params(mpp, tile_size, min_tissue_fraction, slide_mpp, tissue_options)
        try:
            tiles, target = _cached_or_tiled(slide, params, cache_dir, tissue_options or {})
            if probe:
                probe_tiles(slide, tiles)
        except MemoryError as err:
            raise SlideError(out_of_memory(slide_id, path, "tiling it")) from err
    return _save(tiles, *target) if target is not None else tiles


def _params(
    mpp: float,
    tile_size: int,
    min_tissue_fraction: float,
    slide_mpp: float | None,
    tissue_options: dict[str, Any] | None,
) -> dict[str, Any]:
    """Every parameter the tiling depends on, as stored in (and keying) the cache entry."""
    no_override = slide_mpp is None or math.isnan(slide_mpp)  # NaN means none, as in Slide
    return {
        "mpp": float(mpp),
        "tile_size": int(tile_size),
        "min_tissue_fraction": float(min_tissue_fraction),
        "slide_mpp": None if no_override else float(slide_mpp),
        "tissue_options": dict(tissue_options or {}),
        "version": TILING_VERSION,
    }


def _cached_or_tiled(
    slide: Slide,
    params: dict[str, Any],
    cache_dir: str | os.PathLike | None,
    tissue_options: dict[str, Any],
) -> tuple[SlideTiles, tuple[Path, dict[str, Any], dict[str, Any]] | None]:
    """The slide's tiles from a verified cache entry, or tiled now; with the cache entry to
    write them to (file, slide identity, params) when they are new and a cache is in use."""
    mpp, tile_size = params["mpp"], params["tile_size"]

    def fresh() -> SlideTiles:
        return _tile(slide, mpp, tile_size, params["min_tissue_fraction"], tissue_options)

    if cache_dir is None:
        return fresh(), None
    entry_file = cache_file(cache_dir, slide.path, slide.slide_id, params)
    identity = slide_identity(slide.path)
    entry = load_entry(
        entry_file,
        identity,
        params,
        dimensions=slide.dimensions,
        slide_mpp=slide.mpp,
        tile_size_level0=level0_tile_size(tile_size, mpp, slide.mpp),
    )
    if entry is not None:
        return _from_entry(entry, mpp, tile_size), None
    return fresh(), (entry_file, identity, params)


def _save(
    tiles: SlideTiles, file: Path, identity: dict[str, Any], params: dict[str, Any]
) -> SlideTiles:
    """Write ``tiles`` to the cache; on failure return them with ``cache_error`` saying why."""
    entry = {
        "slide": identity,
        "params": params,
        "slide_mpp": tiles.slide_mpp,
        "dimensions": list(tiles.dimensions),
        "tile_size_level0": tiles.tile_size_level0,
        "n_tiles": len(tiles),
        "coords": tiles.coords,
        "note": tiles.note,
    }
    try:
        save_entry(file, entry)
    except OSError as err:
        reason = f"cannot write the tile cache entry {file} ({type(err).__name__}: {err})"
        return replace(tiles, cache_error=reason)
    return tiles


def check_upsampling(slide: Slide, mpp: float, allow: bool) -> None:
    """Refuse a target mpp more than ``UPSAMPLING_TOLERANCE`` finer than the slide's."""
    ratio = slide.mpp / mpp
    if ratio > 1 + UPSAMPLING_TOLERANCE and not allow:
        raise SlideError(
            f"slide {slide.slide_id!r}: the target mpp {mpp:g} is finer than the slide's "
            f"{slide.mpp:g} µm/px, so tiles would be upsampled {ratio:.2f}x (interpolated, no "
            f"real detail); use an mpp of at least {slide.mpp:g}, check the slide's mpp, or pass "
            "allow_upsampling=True (SlideDataModule, tile_slide) to upsample on purpose"
        )


def probe_tiles(slide: Slide, tiles: SlideTiles) -> None:
    """Read the middle tile as training will, so corrupt fine pyramid levels fail now."""
    if not len(tiles):
        return
    x, y = (int(v) for v in tiles.coords[len(tiles) // 2])
    try:
        slide.read_tile(x, y, tiles.tile_size_level0, tiles.tile_size)
    except MemoryError:
        raise
    except Exception as err:
        raise SlideError(
            f"slide {slide.slide_id!r}: reading a tile at the training resolution "
            f"({tiles.tile_size} px at {tiles.mpp:g} µm/px, level-0 x={x}, y={y}) of "
            f"{slide.path} failed ({type(err).__name__}: {err}); its full-resolution pyramid "
            "levels are likely corrupt although the thumbnail reads: re-export or re-scan the "
            "slide, or remove it from the manifest"
        ) from err


def _mask_mpp(slide: Slide, tile_um: float) -> float:
    """Thumbnail mpp: ~1/16 tile per pixel, at most 8 µm/px, at most ``_MASK_MAX_PIXELS``."""
    width, height = slide.dimensions
    wanted = min(_MASK_MAX_MPP, tile_um / _MASK_PIXELS_PER_TILE)
    return max(wanted, slide.mpp * math.sqrt(width * height / _MASK_MAX_PIXELS))


def _tile(
    slide: Slide, mpp: float, tile_size: int, min_fraction: float, tissue_options: dict[str, Any]
) -> SlideTiles:
    width, height = slide.dimensions
    size0 = level0_tile_size(tile_size, mpp, slide.mpp)
    thumb, thumb_mpp = slide.thumbnail(_mask_mpp(slide, size0 * slide.mpp))
    mask = tissue_mask(thumb, thumb_mpp, **tissue_options)
    n_x, n_y = width // size0, height // size0
    if n_x == 0 or n_y == 0:
        coords = np.zeros((0, 2), dtype=np.int64)
    else:
        # Exact area average of the mask over each tile's footprint: PIL's BOX filter with a
        # fractional source box covering the grid (thumbnail px per level-0 px differ in x, y).
        scale_x, scale_y = mask.shape[1] / width, mask.shape[0] / height
        fraction = Image.fromarray(mask.astype(np.float32)).resize(
            (n_x, n_y),
            Image.Resampling.BOX,
            box=(0.0, 0.0, n_x * size0 * scale_x, n_y * size0 * scale_y),
        )
        keep_y, keep_x = np.nonzero(np.asarray(fraction) >= min_fraction - 1e-6)
        coords = np.stack([keep_x, keep_y], axis=1).astype(np.int64) * size0
    note = GRAYSCALE_NOTE if len(coords) == 0 and is_grayscale(thumb) else None
    return SlideTiles(
        coords=coords.reshape(-1, 2),
        tile_size_level0=size0,
        mpp=float(mpp),
        tile_size=int(tile_size),
        slide_mpp=slide.mpp,
        dimensions=(int(width), int(height)),
        note=note,
    )


def _from_entry(entry: dict[str, Any], mpp: float, tile_size: int) -> SlideTiles:
    """Tiles from an entry :func:`~lightning_wsi.data.cache.load_entry` verified."""
    return SlideTiles(
        coords=entry["coords"],
        tile_size_level0=int(entry["tile_size_level0"]),
        mpp=float(mpp),
        tile_size=int(tile_size),
        slide_mpp=float(entry["slide_mpp"]),
        dimensions=(int(entry["dimensions"][0]), int(entry["dimensions"][1])),
        from_cache=True,
        note=entry["note"],
    )
