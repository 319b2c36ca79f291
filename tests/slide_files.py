"""Slides written as real TIFF/SVS files for tests: known geometry, corrupt tiles, odd metadata."""

from __future__ import annotations

import os
import resource
import signal
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tifffile

from lightning_wsi.data.synthetic import write_pyramidal_tiff
from lightning_wsi.data.tiling import SlideTiles, tile_slide

GLASS = (242, 241, 244)
TISSUE = (200, 110, 160)  # eosin pink, well above the saturation threshold


def write_grid_slide(
    path: Path,
    cells: list[tuple[int, int]],
    n_x: int,
    n_y: int,
    cell_px: int,
    mpp: float,
    flavour: str = "tiff",
    seed: int = 0,
) -> Path:
    """Write a slide whose tissue fills exactly the given ``(col, row)`` grid cells.

    ``grid_image`` paints it; zlib compression keeps pixels exact.
    """
    image = grid_image(cells, n_x, n_y, cell_px, seed)
    return write_pyramidal_tiff(path, image, mpp=mpp, flavour=flavour, compression="zlib")


def grid_image(
    cells: list[tuple[int, int]], n_x: int, n_y: int, cell_px: int, seed: int = 0
) -> np.ndarray:
    """Tissue (noise on pink, so texture survives) in the given cells of a glass background of
    ``n_x * cell_px`` by ``n_y * cell_px`` pixels; ``[H, W, 3]`` uint8."""
    rng = np.random.default_rng(seed)
    image = np.empty((n_y * cell_px, n_x * cell_px, 3), dtype=np.uint8)
    image[:] = GLASS
    for col, row in cells:
        noise = rng.integers(-25, 26, size=(cell_px, cell_px, 3))
        cell = np.clip(np.array(TISSUE) + noise, 0, 255).astype(np.uint8)
        image[row * cell_px : (row + 1) * cell_px, col * cell_px : (col + 1) * cell_px] = cell
    return image


def write_tiff_with_corrupt_tiles(
    path: Path,
    image: np.ndarray,
    mpp: float,
    corrupt: str | Iterable[tuple[int, int]] = "all",
    flavour: str = "tiff",
    tile_size: int = 256,
) -> Path:
    """Write a JPEG-compressed tiled pyramid whose chosen level-0 tiles are garbage.

    Every other tile and every lower level is intact, so the thumbnail and other tiles read
    while a read touching a corrupt tile fails inside OpenSlide ("Corrupt JPEG data: ...").
    Each chosen tile keeps its JPEG start marker and its byte count; the rest of its bytes are
    overwritten in place.

    Args:
        path: the file to write (``.tiff`` or ``.svs``).
        image: level-0 pixels, ``[H, W, 3]`` uint8.
        mpp: level-0 µm per pixel.
        corrupt: ``"all"`` or ``(col, row)`` indices of level-0 tiles in the TIFF's tile grid
            (tile ``(c, r)`` covers level-0 x in ``[c * tile_size, (c + 1) * tile_size)``).
        flavour: "tiff" (generic TIFF) or "svs" (Aperio).
        tile_size: the TIFF tile side, a multiple of 16.

    Returns:
        The path written.
    """
    path = write_pyramidal_tiff(path, image, mpp, flavour, tile_size, compression="jpeg")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        offsets, counts = page.dataoffsets, page.databytecounts
    n_cols = -(-image.shape[1] // tile_size)
    n_rows = -(-image.shape[0] // tile_size)
    cells = [(c, r) for r in range(n_rows) for c in range(n_cols)] if corrupt == "all" else corrupt
    rng = np.random.default_rng(0)
    with open(path, "r+b") as handle:
        for col, row in cells:
            if not (0 <= col < n_cols and 0 <= row < n_rows):
                raise ValueError(f"tile ({col}, {row}) is outside the {n_cols}x{n_rows} grid")
            index = row * n_cols + col
            handle.seek(offsets[index] + 2)  # after the JPEG start-of-image marker
            handle.write(rng.integers(0, 256, counts[index] - 2, dtype=np.uint8).tobytes())
    return path


def write_single_level_tiff(path: Path, image: np.ndarray, mpp: float) -> Path:
    """A tiled TIFF with level 0 only (no pyramid), resolution tags carrying ``mpp``."""
    tifffile.imwrite(
        path,
        image,
        tile=(256, 256),
        photometric="rgb" if image.ndim == 3 else "minisblack",
        compression="zlib",
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
    )
    return path


def write_svs_with_mpp_text(path: Path, image: np.ndarray, mpp_text: str) -> Path:
    """An Aperio SVS whose ImageDescription says ``MPP = <mpp_text>`` verbatim (e.g. "0")."""
    path = write_pyramidal_tiff(path, image, 0.5, "svs", compression="zlib")
    with tifffile.TiffFile(path) as tif:
        description = tif.pages[0].description
    tifffile.tiffcomment(path, description.replace("MPP = 0.5", f"MPP = {mpp_text}"), pageindex=0)
    return path


def tile_or_die(path: str, *, die_for: str, **kwargs) -> SlideTiles:
    """``tile_slide``, except that the process SIGKILLs itself (as the out-of-memory killer
    would) for slide id ``die_for``: a tiler for testing killed pool workers."""
    if kwargs.get("slide_id") == die_for:
        os.kill(os.getpid(), signal.SIGKILL)
    return tile_slide(path, **kwargs)


def tile_or_die_unseen(path: str, *, die_for: str, **kwargs) -> SlideTiles:
    """``tile_or_die``, except that first the worker stops its parent, the forkserver, so no
    one reports its death to the pool (as happened once under heavy load). It waits (up to 5 s)
    for the pool's second worker first: a pool that asks a stopped server for a worker hangs in
    ``submit``, before anything could watch it."""
    if kwargs.get("slide_id") == die_for:
        server = os.getppid()
        deadline = time.monotonic() + 5.0
        while len(_children(server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(server, signal.SIGSTOP)
        os.kill(os.getpid(), signal.SIGKILL)
    return tile_slide(path, **kwargs)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux ``/proc``)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def limit_address_space(margin: int) -> None:
    """Cap this process's address space at its current size plus ``margin`` bytes, so a larger
    allocation raises ``MemoryError`` (a pool initializer for a real out-of-memory)."""
    with open("/proc/self/status") as status:
        size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(
        resource.RLIMIT_AS, (size + margin, resource.getrlimit(resource.RLIMIT_AS)[1])
    )
