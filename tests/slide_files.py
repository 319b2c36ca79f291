"""Slides with a known geometry, written as real pyramidal TIFFs (helpers shared by tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lightning_wsi.data.synthetic import write_pyramidal_tiff

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
