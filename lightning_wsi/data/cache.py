"""On-disk cache of a slide's tile coordinates, in plain JSON.

Tiling a gigapixel slide takes seconds; training reads its coordinates every epoch. One JSON file
per slide holds, side by side:

``format``
    ``"lightning-wsi/tiles-v1"``.
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

A change of the slide (path, size or mtime) or of any parameter makes the entry stale and the
slide is tiled again. Files are written atomically, so concurrent ranks never read half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["CACHE_FORMAT", "cache_file", "load_entry", "save_entry", "slide_identity"]

CACHE_FORMAT = "lightning-wsi/tiles-v1"


def slide_identity(path: str | os.PathLike) -> dict[str, Any]:
    """What makes a cached tiling belong to this exact file: path, size and modification time."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_file(cache_dir: str | os.PathLike, path: str | os.PathLike, slide_id: str) -> Path:
    """The cache entry of a slide: readable name plus a hash of the resolved path (no clashes)."""
    digest = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:10]
    safe_id = re.sub(r"[^A-Za-z0-9._-]+", "_", slide_id)[:80]
    return Path(cache_dir) / f"{safe_id}-{digest}.json"


def load_entry(
    file: Path, identity: dict[str, Any], params: dict[str, Any]
) -> dict[str, Any] | None:
    """The cached entry if it exists and matches the slide and the parameters, else ``None``."""
    try:
        entry = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    if entry.get("format") != CACHE_FORMAT:
        return None
    if entry.get("slide") != identity or entry.get("params") != _jsonable(params):
        return None
    return entry


def save_entry(file: Path, entry: dict[str, Any]) -> None:
    """Write an entry atomically (temporary file, then rename)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps({"format": CACHE_FORMAT, **_jsonable(entry)}, separators=(",", ":"))
    fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(payload)
        os.replace(tmp, file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so tuples, numpy scalars and floats compare as stored."""
    return json.loads(json.dumps(value, default=_to_builtin))


def _to_builtin(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the tile cache: {value!r}")
