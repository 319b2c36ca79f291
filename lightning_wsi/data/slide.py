"""One whole-slide image read through OpenSlide at a physical resolution (microns per pixel).

Pathologists and models speak of magnification; files store pyramids of pixels. This module maps
one onto the other: the slide's true mpp comes from OpenSlide's properties (or an override), a
read at a target mpp picks the best pyramid level at or below the needed resolution and resizes
with antialiasing. A 0.25 mpp (40x) slide gives 224 px tiles at 0.5 mpp (20x) that cover 448
level-0 pixels; a 0.263 mpp scanner's "40x" gives 426.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

__all__ = ["Slide", "SlideError", "level0_tile_size"]

# Downsample factors in a pyramid are rarely exact (e.g. 4.0002); a level within this relative
# tolerance of the needed downsample still counts as "at or below" it.
_LEVEL_TOLERANCE = 1e-3


class SlideError(RuntimeError):
    """A slide cannot be used: missing, unreadable, or without the metadata a read needs."""


def level0_tile_size(tile_size: int, mpp: float, slide_mpp: float) -> int:
    """Side in level-0 pixels of a ``tile_size`` px tile at ``mpp`` on a ``slide_mpp`` slide."""
    return max(1, round(tile_size * mpp / slide_mpp))


class Slide:
    """An open slide with its physical pixel size.

    Args:
        path: any file OpenSlide reads (SVS, generic tiled TIFF, NDPI, MRXS, ...).
        mpp: microns per level-0 pixel; overrides the file's metadata (use when a scanner
            wrote none or a wrong one). ``None`` reads ``openslide.mpp-x``.
        slide_id: name used in error messages (defaults to the file name).

    Raises:
        SlideError: the file is missing or unreadable, or it has no mpp and none was given.

    Example:
        >>> from lightning_wsi.data.synthetic import make_synthetic_slide, write_pyramidal_tiff
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "s.tiff")
        >>> _ = write_pyramidal_tiff(path, make_synthetic_slide(0, positive=False).image, mpp=0.5)
        >>> slide = Slide(path)
        >>> slide.mpp, slide.read_tile(0, 0, size0=448, tile_size=224).shape
        (0.5, (224, 224, 3))
    """

    def __init__(
        self, path: str | os.PathLike, mpp: float | None = None, slide_id: str | None = None
    ) -> None:
        self.path = Path(path)
        self.slide_id = slide_id or self.path.name
        if not self.path.is_file():
            raise SlideError(f"slide {self.slide_id!r}: file not found: {self.path}")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except Exception as err:  # OpenSlideUnsupportedFormatError, OpenSlideError, PIL errors
            raise SlideError(
                f"slide {self.slide_id!r}: OpenSlide cannot read {self.path} "
                f"({type(err).__name__}: {err}); check that the file is complete and in a "
                "format OpenSlide supports"
            ) from err
        self.mpp = self._resolve_mpp(mpp)
        self.dimensions: tuple[int, int] = self._osr.dimensions
        self.level_downsamples: tuple[float, ...] = tuple(self._osr.level_downsamples)

    def _resolve_mpp(self, override: float | None) -> float:
        if override is not None and not (isinstance(override, float) and math.isnan(override)):
            if not override > 0:
                raise SlideError(f"slide {self.slide_id!r}: mpp must be > 0, got {override}")
            return float(override)
        props = self._osr.properties
        for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
            try:
                value = float(props[key])
            except (KeyError, ValueError):
                continue
            if value > 0:
                return value
        raise SlideError(
            f"slide {self.slide_id!r}: no microns-per-pixel in the file's metadata ({self.path}); "
            "give it in the manifest's `mpp` column or the `slide_mpp` argument"
        )

    def close(self) -> None:
        """Release the OpenSlide handle."""
        self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def best_level(self, downsample: float) -> int:
        """Coarsest pyramid level whose downsample is at most ``downsample`` (never upsample)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1 + _LEVEL_TOLERANCE):
                best = level
        return best

    def read_tile(self, x: int, y: int, size0: int, tile_size: int) -> np.ndarray:
        """Read the square at level-0 ``(x, y)`` of side ``size0`` as ``tile_size`` px RGB.

        Returns:
            ``[tile_size, tile_size, 3]`` uint8, possibly a non-contiguous view; transparent
            (out-of-scan) pixels become white.
        """
        level = self.best_level(size0 / tile_size)
        ds = self.level_downsamples[level]
        size_level = max(1, round(size0 / ds))
        region = self._osr.read_region((int(x), int(y)), level, (size_level, size_level))
        if size_level != tile_size:
            region = region.resize((tile_size, tile_size), Image.Resampling.BILINEAR)
        return _rgba_to_rgb(np.asarray(region))

    def thumbnail(self, mpp: float) -> tuple[np.ndarray, float]:
        """The whole slide at about ``mpp`` microns per pixel (never finer than level 0).

        Returns:
            ``([h, w, 3] uint8, the thumbnail's actual mpp along x)``.
        """
        width, height = self.dimensions
        scale = max(1.0, mpp / self.mpp)
        size = (max(1, round(width / scale)), max(1, round(height / scale)))
        level = self.best_level(scale)
        dims = self._osr.level_dimensions[level]
        try:
            region = self._osr.read_region((0, 0), level, dims)
        except Exception as err:
            raise SlideError(
                f"slide {self.slide_id!r}: cannot read pyramid level {level} of {self.path} "
                f"({type(err).__name__}: {err}); the file may be truncated or corrupt"
            ) from err
        if region.size != size:
            region = region.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.ascontiguousarray(_rgba_to_rgb(np.asarray(region))), self.mpp * width / size[0]


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide returns premultiplied RGBA; fully transparent pixels lie outside the scan.

    Returns a view of the RGB channels (no copy) unless some pixels are transparent: the caller
    copies the tile once, into its own buffer, which keeps reading as fast as a bare loop.
    """
    rgb = rgba[..., :3]
    if rgba.shape[-1] == 4:
        # One vectorised test on whole pixels (alpha is the high byte of a little-endian uint32)
        # instead of a strided pass over the alpha channel.
        packed = np.ascontiguousarray(rgba).view("<u4")
        if packed.min() < (1 << 24):
            transparent = rgba[..., 3] == 0
            rgb = rgb.copy()
            rgb[transparent] = 255
    return rgb
