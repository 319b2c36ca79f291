"""One whole-slide image read through OpenSlide at a physical resolution (microns per pixel).

Pathologists and models speak of magnification; files store pyramids of pixels. This module maps
one onto the other: the slide's true mpp comes from OpenSlide's properties (or an override), a
read at a target mpp picks the best pyramid level at or below the needed resolution and resizes
with antialiasing. A 0.25 mpp (40x) slide gives 224 px tiles at 0.5 mpp (20x) that cover 448
level-0 pixels; a 0.263 mpp scanner's "40x" gives 426.

Every file is treated as hostile: an mpp outside [``MIN_MPP``, ``MAX_MPP``] µm/px is refused with
the metadata key it came from (a TIFF's 72-dpi default reads as 352.8 µm/px), a directory or a
FIFO is named as such, running out of memory is reported as that (not as a corrupt file), and a
thumbnail of a single-level slide is read in bands of rows so its memory stays bounded.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import openslide
from PIL import Image

__all__ = [
    "MAX_MPP",
    "MIN_MPP",
    "Slide",
    "SlideError",
    "level0_tile_size",
    "mpp_problem",
    "out_of_memory",
]

# The physical range of a level-0 pixel, in µm. Below 0.05 µm/px is beyond what any light
# microscope resolves (a 100x oil objective scans at ~0.1 µm/px); above 20 µm/px is coarser than
# any scanner's level 0 (a 1.25x overview is ~8 µm/px). Outside it, the value is a metadata error
# (a TIFF's 72-dpi default, 352.8 µm/px; an Aperio `MPP = 1000`), and using it would tile a slide
# into millions of one-pixel tiles or a handful of giant ones.
MIN_MPP = 0.05
MAX_MPP = 20.0

# Downsample factors in a pyramid are rarely exact (e.g. 4.0002); a level within this relative
# tolerance of the needed downsample still counts as "at or below" it.
_LEVEL_TOLERANCE = 1e-3
# A thumbnail reads its pyramid level in bands of at most this many pixels (4 bytes each in
# OpenSlide's RGBA): 32 MiB per read, whatever the level's size (a single-level 30,000^2 TIFF
# would otherwise be read whole, 3.6 GB before any copy).
_BAND_PIXELS = 1 << 23
# Before bilinear resampling, a thumbnail is box-averaged by an integer factor of up to a third
# of the downsample (PIL's reducing_gap=3): 3-4x faster on a 28x reduction, as sharp.
_REDUCING_GAP = 3
# 25,400 µm per inch / 72 dots per inch: what OpenSlide reads from a TIFF whose resolution tags
# hold the 72-dpi default that image tools write.
_DPI72_MPP = 25_400 / 72
_FIX = "give the true value in the manifest's `mpp` column or the `slide_mpp` argument"


class SlideError(RuntimeError):
    """A slide cannot be used: missing, unreadable, or without the metadata a read needs."""


def level0_tile_size(tile_size: int, mpp: float, slide_mpp: float) -> int:
    """Side in level-0 pixels of a ``tile_size`` px tile at ``mpp`` on a ``slide_mpp`` slide."""
    return max(1, round(tile_size * mpp / slide_mpp))


def mpp_problem(value: object) -> str | None:
    """Why ``value`` is not a plausible mpp (µm per pixel), or ``None`` if it lies in
    [``MIN_MPP``, ``MAX_MPP``].

    Example:
        >>> mpp_problem(0.25), mpp_problem(0), mpp_problem(float("inf"))
        (None, 'is zero', 'is infinite')
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return f"is not a number ({type(value).__name__})"
    value = float(value)
    if math.isnan(value):
        return "is NaN (not a number)"
    if math.isinf(value):
        return "is infinite"
    if value == 0:
        return "is zero"
    if value < 0:
        return "is negative"
    if value < MIN_MPP:
        return f"is finer than {MIN_MPP} µm/px, beyond what a light microscope resolves"
    if value > MAX_MPP:
        return f"is coarser than {MAX_MPP} µm/px, coarser than any scanner's full resolution"
    return None


def out_of_memory(slide_id: str, path: str | os.PathLike, doing: str) -> str:
    """The reason for a ``MemoryError``: the machine ran short, the file is not (known) corrupt."""
    return (
        f"slide {slide_id!r}: out of memory while reading {path} ({doing}); the file is not "
        "known to be corrupt: free memory or use fewer tiling workers, then retry"
    )


class Slide:
    """An open slide with its physical pixel size.

    Args:
        path: any file OpenSlide reads (SVS, generic tiled TIFF, NDPI, MRXS, ...).
        mpp: microns per level-0 pixel; overrides the file's metadata (use when a scanner
            wrote none or a wrong one). ``None`` (or NaN) reads ``openslide.mpp-x``.
        slide_id: name used in error messages (defaults to the file name).

    Raises:
        SlideError: the path is missing, a directory or not a regular file; OpenSlide cannot
            read it; it has no mpp and none was given; or the mpp in use (from the file or the
            override) lies outside [``MIN_MPP``, ``MAX_MPP``] µm/px. The message names the
            metadata key the value came from and the fix.

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
        _check_regular_file(self.path, self.slide_id)
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except MemoryError as err:
            raise SlideError(out_of_memory(self.slide_id, self.path, "opening it")) from err
        except Exception as err:  # OpenSlideUnsupportedFormatError, OpenSlideError, PIL errors
            raise SlideError(
                f"slide {self.slide_id!r}: OpenSlide cannot read {self.path} "
                f"({type(err).__name__}: {err}); check that the file is complete and in a "
                "format OpenSlide supports"
            ) from err
        try:
            self.mpp = self._resolve_mpp(mpp)
        except BaseException:
            self._osr.close()
            raise
        self.dimensions: tuple[int, int] = self._osr.dimensions
        self.level_downsamples: tuple[float, ...] = tuple(self._osr.level_downsamples)

    def _resolve_mpp(self, override: float | None) -> float:
        if override is not None and not (isinstance(override, float) and math.isnan(override)):
            problem = mpp_problem(override)
            if problem is not None:
                raise SlideError(
                    f"slide {self.slide_id!r}: the mpp override {override!r} µm/px (from the "
                    f"manifest's `mpp` column or the `slide_mpp` argument) {problem}; plausible "
                    f"level-0 values lie in [{MIN_MPP}, {MAX_MPP}] µm/px: correct that value"
                )
            return float(override)
        props = self._osr.properties
        for key in (openslide.PROPERTY_NAME_MPP_X, openslide.PROPERTY_NAME_MPP_Y):
            if key in props:
                return self._checked_file_mpp(key, props[key])
        raise SlideError(
            f"slide {self.slide_id!r}: no microns-per-pixel in the file's metadata ({self.path}"
            f"{_missing_mpp_detail(props)}); {_FIX}"
        )

    def _checked_file_mpp(self, key: str, raw: str) -> float:
        """The file's mpp from property ``key``, refused (naming where it came from) if
        implausible."""
        try:
            value = float(raw)
        except ValueError:
            value = raw
        problem = mpp_problem(value)
        if problem is None:
            return float(value)
        raise SlideError(
            f"slide {self.slide_id!r}: the file's metadata gives {raw!r} µm/px as `{key}`"
            f"{_mpp_source(self._osr.properties)}, which {problem}{_mpp_hint(value)}; plausible "
            f"level-0 values lie in [{MIN_MPP}, {MAX_MPP}] µm/px; {_FIX}"
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

        A failed read (a corrupt tile) leaves OpenSlide's handle in an error state in which
        every later read fails too: close this slide and open it again before reading on.

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

        The pyramid level is read in bands of rows (``_BAND_PIXELS`` each), so peak memory is a
        few bands plus the thumbnail even for a single-level slide: about 230 MB above the
        interpreter for a 30,000 x 30,000 one (a whole-level read took 8.2 GB).

        Returns:
            ``([h, w, 3] uint8, the thumbnail's actual mpp along x)``.

        Raises:
            SlideError: the level cannot be read (truncated or corrupt file) or memory ran out.
        """
        width, height = self.dimensions
        scale = max(1.0, mpp / self.mpp)
        size = (max(1, round(width / scale)), max(1, round(height / scale)))
        level = self.best_level(scale)
        try:
            rgba = self._read_level(level, size)
        except MemoryError as err:
            doing = f"its thumbnail from pyramid level {level}"
            raise SlideError(out_of_memory(self.slide_id, self.path, doing)) from err
        except Exception as err:
            raise SlideError(
                f"slide {self.slide_id!r}: cannot read pyramid level {level} of {self.path} "
                f"({type(err).__name__}: {err}); the file may be truncated or corrupt"
            ) from err
        return np.ascontiguousarray(_rgba_to_rgb(rgba)), self.mpp * width / size[0]

    def _read_level(self, level: int, size: tuple[int, int]) -> np.ndarray:
        """Pyramid ``level`` resized to ``size`` (w, h): ``[h, w, 4]`` uint8 RGBA.

        As PIL's ``reducing_gap=3``: a box average by an integer factor (``Image.reduce``), then
        bilinear resampling of what is left. The reduced rows arrive band by band
        (:meth:`_reduced_bands`) and wait until every output row whose bilinear support they
        cover is resampled (PIL's ``box`` places it exactly), so the bands join without seams
        and memory stays at a few bands whatever the level's size.
        """
        level_w, level_h = self._osr.level_dimensions[level]
        out_w, out_h = size
        factor = max(1, int(min(level_w / out_w, level_h / out_h) / _REDUCING_GAP))
        step = level_h / factor / out_h  # reduced rows per output row
        margin = math.ceil(step) + 1  # bilinear support when downsampling: one step each side
        out = np.empty((out_h, out_w, 4), dtype=np.uint8)
        held, start, done = np.empty((0, out_w, 4), np.uint8), 0, 0  # reduced rows from `start`
        for reduced, final in self._reduced_bands(level, factor):
            held = np.concatenate([held, reduced]) if len(held) else reduced
            end = start + len(held)
            last = out_h if final else min(out_h, int((end - margin) / step))
            if last <= done:
                continue
            box = (0.0, done * step - start, level_w / factor, last * step - start)
            image = Image.fromarray(held, "RGBA")
            out[done:last] = np.asarray(
                image.resize((out_w, last - done), Image.Resampling.BILINEAR, box=box)
            )
            keep = max(start, math.floor(last * step) - margin)
            held, start, done = held[keep - start :], keep, last
        return out

    def _reduced_bands(self, level: int, factor: int) -> Iterator[tuple[np.ndarray, bool]]:
        """``level`` box-averaged by ``factor``, as ``([rows, w, 4] uint8 RGBA, is_last)`` bands.

        The level is read once, top to bottom, in bands of whole rows of about
        ``_BAND_PIXELS``, a multiple of the file's tile height (no tile decoded twice). Rows
        short of a whole block of ``factor`` wait for the next band, so the blocks are the whole
        level's.
        """
        level_w, level_h = self._osr.level_dimensions[level]
        tile_h = self._tile_height(level)
        band_rows = max(tile_h, _BAND_PIXELS // level_w // tile_h * tile_h)
        downsample = self.level_downsamples[level]
        raw = np.empty((0, level_w, 4), np.uint8)  # level rows short of a whole block
        for y in range(0, level_h, band_rows):
            rows = min(band_rows, level_h - y)
            final = y + rows == level_h
            band = self._osr.read_region((0, round(y * downsample)), level, (level_w, rows))
            raw = np.concatenate([raw, np.asarray(band)]) if len(raw) else np.asarray(band)
            usable = len(raw) if final else len(raw) // factor * factor
            if usable:
                block = Image.fromarray(np.ascontiguousarray(raw[:usable]), "RGBA")
                yield np.asarray(block.reduce(factor) if factor > 1 else block), final
                raw = raw[usable:]

    def _tile_height(self, level: int) -> int:
        """Rows of one tile of ``level`` in the file (OpenSlide 4 tells), else 256."""
        raw = self._osr.properties.get(f"openslide.level[{level}].tile-height", "")
        return int(raw) if raw.isdigit() and int(raw) > 0 else 256


def _check_regular_file(path: Path, slide_id: str) -> None:
    """Refuse, with a true reason, a path that is not a readable regular file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise SlideError(f"slide {slide_id!r}: file not found: {path}") from None
    except OSError as err:
        raise SlideError(
            f"slide {slide_id!r}: cannot inspect {path} ({err.strerror or err}); check the path "
            "and its permissions"
        ) from err
    if stat.S_ISDIR(mode):
        raise SlideError(
            f"slide {slide_id!r}: {path} is a directory, not a slide file; point the manifest's "
            "`path` at the slide file itself (for MRXS, the .mrxs file beside its folder)"
        )
    if not stat.S_ISREG(mode):
        raise SlideError(
            f"slide {slide_id!r}: {path} is not a regular file (a FIFO, socket or device); "
            "point the manifest's `path` at the slide file"
        )
    if not os.access(path, os.R_OK):
        raise SlideError(
            f"slide {slide_id!r}: {path} cannot be read (permission denied); grant read access"
        )


def _mpp_source(props: Mapping[str, str]) -> str:
    """Where OpenSlide took its mpp from, for an error message (empty when unknown)."""
    vendor = props.get(openslide.PROPERTY_NAME_VENDOR)
    if vendor == "aperio" and "aperio.MPP" in props:
        return f" (from the Aperio ImageDescription's `MPP = {props['aperio.MPP']}`)"
    if vendor == "generic-tiff" and "tiff.XResolution" in props:
        unit = props.get("tiff.ResolutionUnit", "?")
        return (
            f" (from the TIFF resolution tags: tiff.XResolution = {props['tiff.XResolution']} "
            f"per {unit})"
        )
    return ""


def _mpp_hint(value: object) -> str:
    """What a known bogus value means: 352.8 µm/px is a TIFF's 72-dpi default."""
    if isinstance(value, float) and math.isclose(value, _DPI72_MPP, rel_tol=1e-3):
        return (
            " (352.8 µm/px is 72 dpi, the default resolution image tools write, not a scanner's "
            "pixel size)"
        )
    return ""


def _missing_mpp_detail(props: Mapping[str, str]) -> str:
    """Why OpenSlide found no mpp, where a source property exists but could not be used."""
    if "aperio.MPP" in props:
        return (
            f"; its Aperio ImageDescription has `MPP = {props['aperio.MPP']}`, which is not a "
            "number of microns per pixel"
        )
    unit = props.get("tiff.ResolutionUnit")
    if unit is not None and unit not in ("centimeter", "inch"):
        return f"; its TIFF resolution unit is {unit!r}, which gives no physical size"
    return ""


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
