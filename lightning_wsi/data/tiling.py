"""Tissue tiles of one slide: a non-overlapping grid at a target mpp, kept where tissue is.

The tissue mask comes from a low-resolution thumbnail
(:func:`~lightning_wsi.data.tissue.tissue_mask`) at about 1/16 of a tile per pixel; each grid
tile's tissue fraction is the exact area average of the mask over the tile's footprint. Tiles with
at least ``min_tissue_fraction`` tissue are kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lightning_wsi.data.cache import cache_file, load_entry, save_entry, slide_identity
from lightning_wsi.data.slide import Slide, level0_tile_size
from lightning_wsi.data.tissue import tissue_mask

__all__ = ["SlideTiles", "tile_slide", "TILING_VERSION"]

# Bump when the tiler's output changes for the same inputs: stale cache entries then re-tile.
TILING_VERSION = 1
# Thumbnail resolution: at most 8 µm/px, and at least 16 mask pixels across one tile.
_MASK_MAX_MPP = 8.0
_MASK_PIXELS_PER_TILE = 16


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
    """

    coords: np.ndarray
    tile_size_level0: int
    mpp: float
    tile_size: int
    slide_mpp: float
    dimensions: tuple[int, int]
    from_cache: bool = field(default=False, compare=False)

    def __len__(self) -> int:
        return len(self.coords)


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
) -> SlideTiles:
    """Tile one slide's tissue on a non-overlapping grid at ``mpp``.

    Args:
        path: a slide OpenSlide reads.
        mpp: target microns per pixel of the tiles (0.5 = 20x).
        tile_size: tile side in pixels at ``mpp``.
        min_tissue_fraction: keep a tile if at least this fraction of it is tissue.
        slide_mpp: the slide's level-0 mpp when its metadata lacks it or is wrong.
        cache_dir: folder of the coordinate cache (:mod:`lightning_wsi.data.cache`); ``None``
            tiles without caching.
        slide_id: name for error messages and the cache file (defaults to the file name).
        tissue_options: keyword arguments for :func:`~lightning_wsi.data.tissue.tissue_mask`.

    Returns:
        The slide's :class:`SlideTiles`; zero tiles when it has no tissue.

    Raises:
        SlideError: the slide is missing, unreadable or has no mpp.

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
    if not 0.0 <= min_tissue_fraction <= 1.0:
        raise ValueError(f"min_tissue_fraction must lie in [0, 1], got {min_tissue_fraction}")
    if mpp <= 0 or tile_size < 1:
        raise ValueError(
            f"mpp must be > 0 and tile_size >= 1, got mpp={mpp}, tile_size={tile_size}"
        )
    slide_id = slide_id or Path(path).name
    params = {
        "mpp": float(mpp),
        "tile_size": int(tile_size),
        "min_tissue_fraction": float(min_tissue_fraction),
        "slide_mpp": None if slide_mpp is None else float(slide_mpp),
        "tissue_options": dict(tissue_options or {}),
        "version": TILING_VERSION,
    }
    entry_file = identity = None
    if cache_dir is not None and Path(path).is_file():
        entry_file, identity = cache_file(cache_dir, path, slide_id), slide_identity(path)
        entry = load_entry(entry_file, identity, params)
        if entry is not None:
            return _from_entry(entry, mpp, tile_size)

    with Slide(path, mpp=slide_mpp, slide_id=slide_id) as slide:
        tiles = _tile(slide, mpp, tile_size, min_tissue_fraction, tissue_options or {})
    if entry_file is not None:
        save_entry(
            entry_file,
            {
                "slide": identity,
                "params": params,
                "slide_mpp": tiles.slide_mpp,
                "dimensions": list(tiles.dimensions),
                "tile_size_level0": tiles.tile_size_level0,
                "n_tiles": len(tiles),
                "coords": tiles.coords,
            },
        )
    return tiles


def _tile(
    slide: Slide, mpp: float, tile_size: int, min_fraction: float, tissue_options: dict[str, Any]
) -> SlideTiles:
    width, height = slide.dimensions
    size0 = level0_tile_size(tile_size, mpp, slide.mpp)
    tile_um = size0 * slide.mpp
    thumb, thumb_mpp = slide.thumbnail(min(_MASK_MAX_MPP, tile_um / _MASK_PIXELS_PER_TILE))
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
    return SlideTiles(
        coords=coords.reshape(-1, 2),
        tile_size_level0=size0,
        mpp=float(mpp),
        tile_size=int(tile_size),
        slide_mpp=slide.mpp,
        dimensions=(int(width), int(height)),
    )


def _from_entry(entry: dict[str, Any], mpp: float, tile_size: int) -> SlideTiles:
    return SlideTiles(
        coords=np.asarray(entry["coords"], dtype=np.int64).reshape(-1, 2),
        tile_size_level0=int(entry["tile_size_level0"]),
        mpp=float(mpp),
        tile_size=int(tile_size),
        slide_mpp=float(entry["slide_mpp"]),
        dimensions=tuple(entry["dimensions"]),
        from_cache=True,
    )
