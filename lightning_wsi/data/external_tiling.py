"""Bring your own tiling: a slide's tiles from a CLAM or TRIDENT coordinate file or an x,y CSV.

A manifest's ``coords`` column may point at a file that fixes where a slide's tiles are, instead of
our tissue detection (:func:`~lightning_wsi.data.tiling.tile_slide`). The tiles are read at
exactly the file's level-0 top-left corners, at the run's ``mpp`` and ``tile_size``; the file's
own tile size must agree with the run's within ``PATCH_SIZE_TOLERANCE`` (1%) unless the mismatch
is allowed. Three layouts are read, each as its writer stores it:

- CLAM (github.com/mahmoodlab/CLAM, commit 53e2409): ``wsi_core/WholeSlideImage.py``
  ``WholeSlideImage.process_contour`` builds ``coords`` (``[n, 2]`` int64 level-0 x, y, from
  ``np.arange`` over the contour's bounding box) and the attributes ``patch_size`` (side as read
  at ``patch_level``), ``patch_level``, ``downsample`` (that level's ``(ds_x, ds_y)`` floats),
  ``downsampled_level_dim``, ``level_dim``, ``name`` and ``save_path``; ``process_contours`` hands
  them to ``wsi_core/wsi_utils.py`` ``save_hdf5``, which writes a resizable dataset (chunks
  ``(1, 2)``) and sets the attributes on it. Its ``dataset_modules/dataset_h5.py``
  ``Whole_Slide_Bag_FP`` reads ``read_region(coord, patch_level, (patch_size, patch_size))``: a
  tile covers ``patch_size * downsample[patch_level]`` level-0 pixels. A legacy file's
  ``custom_downsample`` multiplies that, as TRIDENT's ``trident/IO.py`` ``read_coords_legacy`` and
  ``WSIPatcher.from_legacy_coords`` read it.
- TRIDENT (github.com/mahmoodlab/TRIDENT, commit a91fa84): ``trident/IO.py`` ``coords_to_h5``
  writes ``coords`` (int64 ``[n, 2]``, level 0; ``[0, 2]`` for a slide without tissue) through
  ``save_h5`` with ``patch_size`` (at the target magnification), ``patch_size_level0`` (``patch_size
  * level0_magnification // target_magnification``), ``level0_magnification``,
  ``target_magnification``, ``overlap``, ``name``, ``savetodir``, ``level0_width`` and
  ``level0_height``; ``None`` values are stored as the string ``'None'``.
- A CSV with a header naming columns ``x`` and ``y`` (other columns ignored) and one level-0 tile
  corner per row; it carries no tile size, so the run's is used.

Every file is hostile: an unreadable, empty or truncated file, a ``coords`` that is missing, a
link, stored outside the file, not ``[n, 2]`` integers or too large, an attribute that is not a
number, and a tile outside the slide are each a one-line :class:`SlideError` naming the slide, the
file and the fix. Duplicate corners are removed, with a warning that says how many. The tiles are
sorted row-major, as :class:`SlideTiles` promises, and one is read at the training resolution
(the probe of :func:`tile_slide`), so a slide whose full-resolution levels are corrupt fails here.

:func:`write_clam_h5` writes our tiling in CLAM's layout, so CLAM's and TRIDENT's tools open it.
"""

from __future__ import annotations

import csv
import os
import stat
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lightning_wsi.data.slide import Slide, SlideError, level0_tile_size, out_of_memory
from lightning_wsi.data.tiling import (
    SlideTiles,
    check_tiling_params,
    check_upsampling,
    probe_tiles,
)

__all__ = ["MAX_COORDS", "PATCH_SIZE_TOLERANCE", "read_external_tiling", "write_clam_h5"]

# The file's tile side at level 0 may differ from the run's by this fraction (rounding of nominal
# magnifications: TRIDENT floors `patch_size * 40 // 20`, CLAM stores estimated downsamples).
PATCH_SIZE_TOLERANCE = 0.01
# At most this many tiles per file (160 MB as int64): a 150,000 x 100,000 px slide holds 300,000
# tiles of 224 px; more is a hostile or corrupt file, refused before it is read into memory.
MAX_COORDS = 10_000_000
# Rows per HDF5 chunk in files we write: CLAM's (1, 2) chunks make a 300,000-tile file a B-tree
# of 300,000 chunks; resizable all the same, so CLAM's `save_hdf5(mode="a")` can append.
_CHUNK_ROWS = 4096
_H5_SUFFIXES = (".h5", ".hdf5", ".he5")


@dataclass(frozen=True)
class _FileTiling:
    """What a coordinates file says: ``coords`` ``[n, 2]`` int64 level-0 top-left corners, the
    tile side at level 0 (``None`` when the file does not say) and where that side came from."""

    coords: np.ndarray
    size0: float | None
    source: str


def read_external_tiling(
    coords_file: str | os.PathLike,
    slide_path: str | os.PathLike,
    mpp: float,
    tile_size: int,
    *,
    slide_mpp: float | None = None,
    slide_id: str | None = None,
    allow_patch_size_mismatch: bool = False,
    allow_upsampling: bool = False,
) -> SlideTiles:
    """A slide's tiles at the places a CLAM/TRIDENT ``.h5`` or an ``x,y`` CSV gives.

    No tissue detection runs: each tile is the square of ``level0_tile_size(tile_size, mpp,
    slide_mpp)`` level-0 pixels at a corner of the file, read as ``tile_size`` px at ``mpp``.

    Args:
        coords_file: the slide's coordinate file (format told by content: HDF5 or CSV).
        slide_path: the slide OpenSlide reads.
        mpp: target microns per pixel of the tiles (0.5 = 20x).
        tile_size: tile side in pixels at ``mpp``.
        slide_mpp: the slide's level-0 mpp when its metadata lacks it or is wrong.
        slide_id: name for error messages (defaults to the slide's file name).
        allow_patch_size_mismatch: when the file's tile side at level 0 differs from the run's by
            more than ``PATCH_SIZE_TOLERANCE``, read the run's tile size at the file's top-left
            corners instead of refusing.
        allow_upsampling: accept a target ``mpp`` more than 10% finer than the slide's, as for
            :func:`~lightning_wsi.data.tiling.tile_slide`.

    Returns:
        :class:`SlideTiles` with the file's corners, duplicates removed, sorted row-major.

    Raises:
        ValueError: implausible ``mpp`` or ``tile_size``.
        SlideError: the slide cannot be used, the file is missing, empty, unreadable, lists no
            tile or tiles outside the slide, its ``coords`` are not ``[n, 2]`` integers, its tile
            size differs from the run's, or the probe tile cannot be read.
    """
    check_tiling_params(mpp, tile_size)
    slide_id = slide_id or Path(slide_path).name
    coords_file = Path(coords_file)
    with Slide(slide_path, mpp=slide_mpp, slide_id=slide_id) as slide:
        check_upsampling(slide, mpp, allow_upsampling)
        try:
            tiles = _external_tiles(slide, coords_file, mpp, tile_size, allow_patch_size_mismatch)
            probe_tiles(slide, tiles)
        except MemoryError as err:
            doing = f"its tiling from {coords_file}"
            raise SlideError(out_of_memory(slide_id, slide.path, doing)) from err
    return tiles


def write_clam_h5(
    path: str | os.PathLike, tiles: SlideTiles, slide: Slide | str | os.PathLike
) -> Path:
    """Write ``tiles`` as CLAM's ``create_patches_fp.py`` does, atomically.

    Dataset ``coords`` int64 ``[n, 2]`` (resizable, as CLAM's ``save_hdf5``) with CLAM's attributes
    at ``patch_level`` 0: ``patch_size`` is our level-0 tile side, so CLAM's
    ``Whole_Slide_Bag_FP`` reads the same squares (``read_region(coord, 0, (patch_size,) * 2)``)
    and resizes them as its feature extractor is told.

    Args:
        path: the ``.h5`` file to write (CLAM names it ``<slide file stem>.h5``).
        tiles: our tiling of the slide, at least one tile.
        slide: the slide or its file path; CLAM's ``name`` attribute is its file stem.

    Returns:
        The path written.

    Raises:
        ValueError: ``tiles`` is empty (CLAM writes no file for a slide without tissue).
    """
    path = Path(path)
    slide_path = slide.path if isinstance(slide, Slide) else Path(slide)
    if not len(tiles):
        raise ValueError(
            f"slide {slide_path.name!r} has no tile to write to {path}; CLAM writes no "
            "coordinates file for a slide without tissue: skip this slide"
        )
    coords = np.ascontiguousarray(tiles.coords, dtype=np.int64).reshape(-1, 2)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as h5:
            chunks = (min(len(coords), _CHUNK_ROWS), 2)
            dset = h5.create_dataset("coords", data=coords, maxshape=(None, 2), chunks=chunks)
            dset.attrs.update(_clam_attributes(tiles, slide_path.stem, path.parent))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; coordinates are as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _clam_attributes(tiles: SlideTiles, name: str, folder: Path) -> dict[str, Any]:
    """The attributes CLAM's ``process_contour`` sets on ``coords``, for ``patch_level`` 0."""
    width, height = (int(v) for v in tiles.dimensions)
    return {
        "patch_size": int(tiles.tile_size_level0),
        "patch_level": 0,
        "downsample": np.array([1.0, 1.0]),
        "downsampled_level_dim": np.array([width, height], dtype=np.int64),
        "level_dim": np.array([width, height], dtype=np.int64),
        "name": name,
        "save_path": str(folder),
    }


def _external_tiles(
    slide: Slide, file: Path, mpp: float, tile_size: int, allow_mismatch: bool
) -> SlideTiles:
    """The file's tiles checked against ``slide`` and the run's tile size (no probe)."""
    read = _read_file(slide, file)
    if not len(read.coords):
        raise _error(
            slide,
            file,
            "lists no tile (0 coordinates; TRIDENT writes this for a slide without tissue)",
            "remove the slide from the manifest or give it a coordinates file with tiles",
        )
    size0 = level0_tile_size(tile_size, mpp, slide.mpp)
    if not allow_mismatch:
        _check_patch_size(slide, file, read, size0, mpp, tile_size)
    _check_inside(slide, file, read.coords, size0)
    return SlideTiles(
        coords=_unique_row_major(slide, file, read.coords),
        tile_size_level0=size0,
        mpp=float(mpp),
        tile_size=int(tile_size),
        slide_mpp=slide.mpp,
        dimensions=(int(slide.dimensions[0]), int(slide.dimensions[1])),
    )


def _error(slide: Slide, file: Path, problem: str, fix: str) -> SlideError:
    """A one-line error naming the slide, the coordinates file, the problem and the fix."""
    problem = " ".join(problem.split())
    return SlideError(f"slide {slide.slide_id!r}: coordinates file {file} {problem}; {fix}")


def _reason(err: BaseException) -> str:
    """An exception as ``Type: message`` on one line."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _read_file(slide: Slide, file: Path) -> _FileTiling:
    """Read ``file`` as HDF5 (CLAM, TRIDENT) or, when it is not HDF5, as an ``x,y`` CSV."""
    _check_regular_file(slide, file)
    try:
        is_hdf5 = h5py.is_hdf5(str(file))
    except Exception as err:  # noqa: BLE001 - any failure to open it is an unreadable file
        raise _unreadable(slide, file, err) from err
    if is_hdf5:
        return _read_h5(slide, file)
    if file.suffix.lower() in _H5_SUFFIXES:
        raise _error(
            slide,
            file,
            "is not an HDF5 file (no HDF5 signature: truncated, or not written by CLAM/TRIDENT)",
            "copy the file again or re-run the tool that wrote it",
        )
    return _FileTiling(_read_csv(slide, file), None, "a CSV, which gives no tile size")


def _check_regular_file(slide: Slide, file: Path) -> None:
    """Refuse a missing, empty, special or unreadable coordinates file."""
    fix = "correct the manifest's `coords` column"
    try:
        info = file.stat()
    except FileNotFoundError:
        raise _error(slide, file, "does not exist", fix) from None
    except OSError as err:
        raise _error(slide, file, f"cannot be inspected ({err.strerror or err})", fix) from err
    if stat.S_ISDIR(info.st_mode):
        raise _error(slide, file, "is a directory", f"{fix} to name the slide's .h5 or .csv file")
    if not stat.S_ISREG(info.st_mode):
        raise _error(slide, file, "is not a regular file (a FIFO, socket or device)", fix)
    if info.st_size == 0:
        raise _error(slide, file, "is empty (0 bytes)", "copy it again or re-run its tiling")
    if not os.access(file, os.R_OK):
        raise _error(slide, file, "cannot be read (permission denied)", "grant read access")


def _unreadable(slide: Slide, file: Path, err: BaseException) -> SlideError:
    return _error(
        slide,
        file,
        f"cannot be read ({_reason(err)})",
        "the file may be truncated or corrupt: copy it again or re-run the tool that wrote it",
    )


def _read_h5(slide: Slide, file: Path) -> _FileTiling:
    """``coords`` and its attributes from a CLAM or TRIDENT file."""
    try:
        with h5py.File(file, "r") as h5:
            dset = _coords_dataset(slide, file, h5)
            coords = _h5_coords(slide, file, dset)
            attrs = dict(dset.attrs)
    except (SlideError, MemoryError):
        raise
    except Exception as err:  # noqa: BLE001 - h5py raises OSError, KeyError, ValueError, ...
        raise _unreadable(slide, file, err) from err
    size0, source = _h5_tile_side(slide, file, attrs)
    return _FileTiling(coords, size0, source)


def _coords_dataset(slide: Slide, file: Path, h5: h5py.File) -> h5py.Dataset:
    """The file's own ``coords`` dataset: not a link, not stored in other files."""
    link = h5.get("coords", getlink=True)
    if link is None:
        keys = ", ".join(sorted(h5.keys())[:10]) or "nothing"
        raise _error(
            slide,
            file,
            f"has no `coords` dataset (it holds {keys})",
            "give the coordinates file CLAM's create_patches_fp.py or TRIDENT writes (its "
            "patches folder), not a features file",
        )
    fix = "write `coords` as a plain [n, 2] integer dataset, as CLAM and TRIDENT do"
    if not isinstance(link, h5py.HardLink):
        raise _error(slide, file, f"has `coords` as a {type(link).__name__}, not a dataset", fix)
    dset = h5["coords"]
    if not isinstance(dset, h5py.Dataset):
        raise _error(slide, file, "has `coords` as a group, not a dataset", fix)
    if dset.is_virtual or dset.external:
        raise _error(slide, file, "stores `coords` in other files (virtual or external)", fix)
    return dset


def _h5_coords(slide: Slide, file: Path, dset: h5py.Dataset) -> np.ndarray:
    """``coords`` as ``[n, 2]`` int64, checked before it is read."""
    fix = "coordinates are [n, 2] whole level-0 pixels (x, y): re-run the tool that wrote it"
    if dset.ndim != 2 or dset.shape[1] != 2:
        raise _error(slide, file, f"has `coords` of shape {dset.shape}, not [n, 2]", fix)
    if dset.dtype.kind not in "iu":
        raise _error(slide, file, f"has `coords` of dtype {dset.dtype}, not integers", fix)
    if dset.shape[0] > MAX_COORDS:
        raise _error(slide, file, f"has {dset.shape[0]} coordinates, more than {MAX_COORDS}", fix)
    return _as_int64(slide, file, np.asarray(dset[()]))


def _as_int64(slide: Slide, file: Path, coords: np.ndarray) -> np.ndarray:
    """Integer ``coords`` as int64; an unsigned value beyond int64 is outside any slide."""
    if coords.dtype.kind == "u" and coords.size and int(coords.max()) > np.iinfo(np.int64).max:
        raise _error(
            slide,
            file,
            f"has a coordinate of {int(coords.max())}, outside the {_size(slide)} px slide",
            "check that the file was made for this slide",
        )
    return coords.astype(np.int64).reshape(-1, 2)


def _h5_tile_side(slide: Slide, file: Path, attrs: Mapping[str, Any]) -> tuple[float | None, str]:
    """The file's tile side in level-0 pixels and how it was found (``None``: not given)."""
    if "patch_size_level0" in attrs:  # TRIDENT's coords_to_h5
        size0 = _positive(slide, file, attrs, "patch_size_level0")
        return size0, f"TRIDENT patch_size_level0 = {size0:g}"
    if {"patch_size", "level0_magnification", "target_magnification"} <= attrs.keys():
        patch = _positive(slide, file, attrs, "patch_size")
        ratio = _positive(slide, file, attrs, "level0_magnification") / _positive(
            slide, file, attrs, "target_magnification"
        )
        size0 = float(round(patch * ratio))  # TRIDENT's WSIPatcher.patch_size_src
        return size0, f"TRIDENT patch_size {patch:g} at {ratio:g}x the level-0 pixel size"
    if {"patch_size", "patch_level"} <= attrs.keys():  # CLAM's process_contour
        return _clam_tile_side(slide, file, attrs)
    return None, "no tile size in its attributes"


def _clam_tile_side(slide: Slide, file: Path, attrs: Mapping[str, Any]) -> tuple[float, str]:
    """``patch_size * downsample[patch_level] * custom_downsample`` (CLAM, legacy files)."""
    patch = _positive(slide, file, attrs, "patch_size")
    level = _whole(slide, file, attrs, "patch_level")
    if "downsample" in attrs:
        downsample = _positive(slide, file, attrs, "downsample")  # (ds_x, ds_y): CLAM reads x
    elif level < len(slide.level_downsamples):
        downsample = float(slide.level_downsamples[level])
    else:
        raise _error(
            slide,
            file,
            f"reads tiles at patch_level {level}, but the slide has "
            f"{len(slide.level_downsamples)} pyramid levels",
            "check that the file was made for this slide",
        )
    custom = (
        _positive(slide, file, attrs, "custom_downsample") if "custom_downsample" in attrs else 1
    )
    size0 = patch * downsample * custom
    extra = f" x custom_downsample {custom:g}" if custom != 1 else ""
    source = f"CLAM patch_size {patch:g} at patch_level {level}, downsample {downsample:g}{extra}"
    return size0, source


def _attribute(slide: Slide, file: Path, attrs: Mapping[str, Any], key: str) -> float:
    """Attribute ``key`` as a finite number (the first of an array such as CLAM's
    ``downsample = (ds_x, ds_y)``)."""
    raw = attrs[key]
    value = np.asarray(raw)
    if value.dtype.kind in "iuf" and 1 <= value.size <= 2 and np.isfinite(value).all():
        return float(value.reshape(-1)[0])
    raise _error(
        slide,
        file,
        f"has the attribute `{key}` = {raw!r} on `coords`, not a number",
        "re-run the tool that wrote it, or give a CSV of x,y with the run's tile size",
    )


def _positive(slide: Slide, file: Path, attrs: Mapping[str, Any], key: str) -> float:
    value = _attribute(slide, file, attrs, key)
    if value <= 0:
        raise _error(
            slide,
            file,
            f"has the attribute `{key}` = {value:g} on `coords`, not positive",
            "re-run the tool that wrote it, or give a CSV of x,y with the run's tile size",
        )
    return value


def _whole(slide: Slide, file: Path, attrs: Mapping[str, Any], key: str) -> int:
    value = _attribute(slide, file, attrs, key)
    if value < 0 or not value.is_integer():
        raise _error(
            slide,
            file,
            f"has the attribute `{key}` = {value:g} on `coords`, not a pyramid level (0, 1, ...)",
            "re-run the tool that wrote it, or give a CSV of x,y with the run's tile size",
        )
    return int(value)


def _read_csv(slide: Slide, file: Path) -> np.ndarray:
    """Level-0 corners from a CSV whose header names ``x`` and ``y``: ``[n, 2]`` int64."""
    fix = (
        "give a CSV whose header is `x,y` and whose rows are whole level-0 pixels, or a "
        "CLAM/TRIDENT .h5"
    )
    rows: list[tuple[int, int]] = []
    try:
        with open(file, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            if "x" not in header or "y" not in header:
                shown = ",".join(header)[:80]
                raise _error(
                    slide,
                    file,
                    f"is neither HDF5 nor a CSV with columns x, y (header {shown!r})",
                    fix,
                )
            ix, iy = header.index("x"), header.index("y")
            for number, row in enumerate(reader, start=2):
                if any(cell.strip() for cell in row):
                    rows.append(_csv_corner(slide, file, row, ix, iy, number, fix))
                if len(rows) > MAX_COORDS:
                    raise _error(slide, file, f"has more than {MAX_COORDS} rows", fix)
    except (SlideError, MemoryError):
        raise
    except UnicodeDecodeError as err:
        raise _error(slide, file, f"is neither HDF5 nor UTF-8 text ({_reason(err)})", fix) from err
    except (OSError, csv.Error) as err:
        raise _unreadable(slide, file, err) from err
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def _csv_corner(
    slide: Slide, file: Path, row: list[str], ix: int, iy: int, number: int, fix: str
) -> tuple[int, int]:
    """Row ``number``'s ``(x, y)`` as whole numbers."""
    cells = [row[i].strip() if i < len(row) else "" for i in (ix, iy)]
    try:
        return int(cells[0]), int(cells[1])
    except ValueError:
        pass
    raise _error(
        slide,
        file,
        f"row {number} has x={cells[0][:40]!r}, y={cells[1][:40]!r}, not whole numbers",
        fix,
    )


def _check_patch_size(
    slide: Slide, file: Path, read: _FileTiling, size0: int, mpp: float, tile_size: int
) -> None:
    """Refuse a file whose tiles differ from the run's by more than ``PATCH_SIZE_TOLERANCE``."""
    if read.size0 is None or abs(read.size0 - size0) <= PATCH_SIZE_TOLERANCE * size0:
        return
    wanted_size = round(read.size0 * slide.mpp / mpp)
    wanted_mpp = read.size0 * slide.mpp / tile_size
    raise _error(
        slide,
        file,
        f"has tiles of {read.size0:g} level-0 px ({read.source}) but this run reads "
        f"{size0} level-0 px ({tile_size} px at {mpp:g} µm/px on a {slide.mpp:g} µm/px slide)",
        f"set tile_size={wanted_size} (at mpp={mpp:g}) or mpp={wanted_mpp:.4g} (at tile_size="
        f"{tile_size}) to read the file's tiles, or allow "
        f"the mismatch (allow_patch_size_mismatch=True) to read {size0} px squares at the "
        "file's top-left corners",
    )


def _check_inside(slide: Slide, file: Path, coords: np.ndarray, size0: int) -> None:
    """Refuse tiles whose top-left corner lies outside the slide. A tile may overhang the
    right or bottom edge, as CLAM (``use_padding``) and TRIDENT write them: OpenSlide reads the
    part outside as transparent, which ``Slide.read_tile`` makes white, as those tools read it."""
    width, height = slide.dimensions
    outside = (
        (coords[:, 0] < 0)
        | (coords[:, 1] < 0)
        | (coords[:, 0] > width - 1)
        | (coords[:, 1] > height - 1)
    )
    if not outside.any():
        return
    x, y = (int(v) for v in coords[np.argmax(outside)])
    raise _error(
        slide,
        file,
        f"has {int(outside.sum())} of {len(coords)} tiles outside the {_size(slide)} px slide "
        f"(first: x={x}, y={y}, a tile of {size0} level-0 px)",
        "coordinates are level-0 top-left x, y: check that the file was made for this slide",
    )


def _size(slide: Slide) -> str:
    return f"{slide.dimensions[0]}x{slide.dimensions[1]}"


def _unique_row_major(slide: Slide, file: Path, coords: np.ndarray) -> np.ndarray:
    """``coords`` without duplicates, sorted by ``(y, x)``; warns when duplicates went."""
    unique = np.unique(coords, axis=0)
    unique = unique[np.lexsort((unique[:, 0], unique[:, 1]))]
    removed = len(coords) - len(unique)
    if removed:
        warnings.warn(
            f"slide {slide.slide_id!r}: coordinates file {file} lists {removed} duplicate tile "
            f"corner(s); each tile is read once ({len(unique)} tiles)",
            stacklevel=4,
        )
    return np.ascontiguousarray(unique, dtype=np.int64)
