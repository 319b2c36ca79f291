"""On-disk cache of a slide's tile coordinates, in plain JSON.

Tiling a gigapixel slide takes seconds; training reads its coordinates every epoch. One JSON file
per slide and tiling setting holds, side by side:

``format``
    ``"lightning-wsi/tiles-v2"``.
``slide``
    the slide's identity: absolute ``path``, file ``size`` in bytes, ``mtime_ns``.
``params``
    every tiling parameter (target ``mpp``, ``tile_size``, ``min_tissue_fraction``, the mpp
    override if any, the tissue detector's options and the tiler's version).
``slide_mpp``, ``dimensions``, ``tile_size_level0``, ``n_tiles``
    what the tiler found: the slide's true mpp, level-0 ``[width, height]``, the level-0 side of
    one tile and the number of tiles.
``coords``
    ``[[x, y], ...]`` level-0 top-left corners, row-major.
``note``
    why a slide has no tissue tile when the tiler knows (e.g. it is grayscale), else ``null``.

The file name is ``<slide id>-<path digest>-<params digest>.json``: a sweep over ``mpp`` or
``tile_size`` keeps one entry per setting instead of overwriting one. A change of the slide (path,
size or mtime) or of any parameter makes an entry stale and the slide is tiled again.

An entry is verified, not trusted: every key must be present and well typed, and it must agree
with the slide as opened now (dimensions, mpp, the level-0 tile size the parameters give, every
coordinate on that tile grid and inside the slide, ``n_tiles == len(coords)``). Anything else is
a stale entry, re-tiled and overwritten, never a bad slide. Files are written atomically (a
temporary file, then a rename), so concurrent ranks never read half an entry, and with the
permissions the umask gives a new file (``0o666 & ~umask``), so a cache shared by a group on a
cluster is readable by the group (``mkstemp`` alone would make it private, 0600).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lightning_wsi.data.names import inside, safe_name

__all__ = [
    "CACHE_FORMAT",
    "cache_file",
    "check_entry",
    "load_entry",
    "save_entry",
    "slide_identity",
]

CACHE_FORMAT = "lightning-wsi/tiles-v2"
# An entry larger than this is not one this package wrote for a slide (20 M tiles at ~25 bytes):
# it is not parsed, so a hostile file cannot exhaust memory.
_MAX_ENTRY_BYTES = 512 << 20
_ID_LENGTH = 56  # slide id part of a file name; with two digests it stays within safe_name's 80
# A stored slide mpp is a float that went through JSON; it must equal the slide's to this.
_MPP_TOLERANCE = 1e-9


def slide_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What makes a cached tiling belong to this exact file: path, size and modification time."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_file(
    cache_dir: str | os.PathLike, path: str | os.PathLike, slide_id: str, params: dict[str, Any]
) -> Path:
    """The cache entry of a slide for one tiling setting, inside ``cache_dir``.

    Its name is the sanitised slide id (:func:`~lightning_wsi.data.names.safe_name`), a digest
    of the resolved slide path (two slides with one id never clash) and a digest of ``params``
    (each setting of a sweep keeps its own entry).
    """
    path_digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:10]
    canonical = json.dumps(_jsonable(params), sort_keys=True, separators=(",", ":"))
    params_digest = hashlib.sha1(canonical.encode()).hexdigest()[:8]
    stem = f"{safe_name(slide_id, _ID_LENGTH)}-{path_digest}-{params_digest}"
    return inside(cache_dir, stem, ".json")


def load_entry(
    file: Path,
    identity: dict[str, Any],
    params: dict[str, Any],
    *,
    dimensions: tuple[int, int],
    slide_mpp: float,
    tile_size_level0: int,
) -> dict[str, Any] | None:
    """The cached entry if it exists, parses and passes :func:`check_entry`, else ``None``.

    Returns:
        The entry, its ``coords`` as an ``[n, 2]`` int64 array.
    """
    try:
        if file.stat().st_size > _MAX_ENTRY_BYTES:
            return None
        entry = json.loads(file.read_bytes())
    except (OSError, ValueError, RecursionError):  # missing, unreadable, not JSON, too deep
        return None
    expected = {"dimensions": dimensions, "slide_mpp": slide_mpp}
    problem = check_entry(entry, identity, params, tile_size_level0=tile_size_level0, **expected)
    return None if problem is not None else entry


def check_entry(
    entry: Any,
    identity: dict[str, Any],
    params: dict[str, Any],
    *,
    dimensions: tuple[int, int],
    slide_mpp: float,
    tile_size_level0: int,
) -> str | None:
    """Why a parsed entry cannot be used for this slide and these parameters, or ``None``.

    On success ``entry["coords"]`` is replaced by an ``[n, 2]`` int64 array (checked: on the
    grid of ``tile_size_level0``, each tile inside ``dimensions``, row-major, no duplicates).
    """
    if not isinstance(entry, dict):
        return f"not a JSON object but {type(entry).__name__}"
    if entry.get("format") != CACHE_FORMAT:
        return f"format {entry.get('format')!r} is not {CACHE_FORMAT!r}"
    if entry.get("slide") != identity:
        return "written for another file (path, size or modification time differ)"
    if entry.get("params") != _jsonable(params):
        return "written with other tiling parameters"
    problem = _field_problem(entry, dimensions, slide_mpp, tile_size_level0)
    if problem is not None:
        return problem
    coords, problem = _coords(entry["coords"], entry["n_tiles"])
    if problem is None:
        problem = _grid_problem(coords, dimensions, tile_size_level0)
    if problem is not None:
        return problem
    entry["coords"] = coords
    return None


def save_entry(file: Path, entry: dict[str, Any]) -> None:
    """Write an entry atomically (temporary file, then rename), readable as the umask allows.

    Raises:
        OSError: the folder cannot be made or written (read-only, full disk, a file in the way);
            nothing is left behind.
    """
    file.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"format": CACHE_FORMAT, **_jsonable(entry)}, separators=(",", ":"))
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as handle:
            handle.write(payload)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _field_problem(
    entry: dict[str, Any], dimensions: tuple[int, int], slide_mpp: float, size0: int
) -> str | None:
    """Why the scalar fields are missing, mistyped or disagree with the slide, or ``None``."""
    missing = {"slide_mpp", "dimensions", "tile_size_level0", "n_tiles", "coords", "note"}
    missing -= entry.keys()
    if missing:
        return f"lacks {sorted(missing)}"
    stored_mpp = entry["slide_mpp"]
    if not _is_number(stored_mpp) or not math.isclose(
        stored_mpp, slide_mpp, rel_tol=_MPP_TOLERANCE
    ):
        return f"slide_mpp {stored_mpp!r} is not the slide's {slide_mpp}"
    stored_dims = entry["dimensions"]
    if not (
        isinstance(stored_dims, list)
        and all(_is_int(d) for d in stored_dims)
        and stored_dims == [int(d) for d in dimensions]
    ):
        return f"dimensions {stored_dims!r} are not the slide's {list(dimensions)}"
    if not (_is_int(entry["tile_size_level0"]) and entry["tile_size_level0"] == size0):
        return f"tile_size_level0 {entry['tile_size_level0']!r} is not {size0}"
    if not (_is_int(entry["n_tiles"]) and entry["n_tiles"] >= 0):
        return f"n_tiles {entry['n_tiles']!r} is not a count"
    if not (entry["note"] is None or isinstance(entry["note"], str)):
        return f"note {entry['note']!r} is not text"
    return None


def _coords(raw: Any, n_tiles: int) -> tuple[np.ndarray, str | None]:
    """``raw`` as an ``[n, 2]`` int64 array, or why it is not ``n_tiles`` integer pairs."""
    empty = np.zeros((0, 2), dtype=np.int64)
    if not isinstance(raw, list):
        return empty, f"coords is {type(raw).__name__}, not a list"
    if not raw:
        return empty, None if n_tiles == 0 else f"n_tiles {n_tiles} but no coords"
    try:
        array = np.array(raw)
    except (ValueError, TypeError, OverflowError):
        return empty, "coords are not [x, y] pairs"
    # Python ints that fit int64 give int64; larger ones give uint64 or objects: refused.
    if array.dtype != np.int64 or array.ndim != 2 or array.shape[1] != 2:
        return empty, f"coords are not integer [x, y] pairs ({array.dtype}, {list(array.shape)})"
    if len(array) != n_tiles:
        return empty, f"n_tiles {n_tiles} but {len(array)} coords"
    return array, None


def _grid_problem(coords: np.ndarray, dimensions: tuple[int, int], size0: int) -> str | None:
    """Why ``coords`` are not distinct row-major tiles of side ``size0`` inside the slide."""
    if not len(coords):
        return None
    width, height = dimensions
    x, y = coords[:, 0], coords[:, 1]
    if (coords % size0).any():
        return f"coords off the grid of {size0} level-0 px"
    # Compared without adding to a coordinate, which could overflow int64 and wrap.
    if x.min() < 0 or y.min() < 0 or x.max() > width - size0 or y.max() > height - size0:
        return f"coords outside the {width}x{height} slide"
    order = y * (width + 1) + x  # row-major rank; strictly increasing means sorted, distinct
    if (np.diff(order) <= 0).any():
        return "coords are not distinct and row-major"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (thread safe)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: read it by setting it, then restore it at once
    os.umask(mask)
    return mask


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so tuples, numpy scalars and floats compare as stored."""
    return json.loads(json.dumps(value, default=_to_builtin))


def _to_builtin(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the tile cache: {value!r}")
