"""Slides with unreadable tiles at the training level, for the runs that must survive them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from slide_files import write_tiff_with_corrupt_tiles

from lightning_wsi.data.synthetic import write_pyramidal_tiff

SIDE = 1024  # level 0: 16 x 16 tiles of 64 px at 0.5 mpp; level 1 (the thumbnail's) intact
TIFF_TILE = 16  # one TIFF tile lies inside exactly one 64 px training tile
BROKEN = ((0, 0), (4, 0))  # TIFF tiles -> the training tiles at level-0 (0, 0) and (64, 0)
BROKEN_XY = {(0, 0), (64, 0)}


def tissue(seed: int) -> np.ndarray:
    """``[SIDE, SIDE, 3]`` H&E-like pink and purple texture: tissue everywhere."""
    rng = np.random.default_rng(seed)
    base = np.array([200, 120, 170], dtype=np.float32)
    cells = rng.normal(0, 35, (SIDE // 8, SIDE // 8, 3)).repeat(8, 0).repeat(8, 1)
    return np.clip(base + cells, 0, 255).astype(np.uint8)


def write_bad_tile_slides(folder: Path) -> Path:
    """Two intact slides, one with two broken training tiles, one whose level 0 is all broken;
    their manifest ``bad_tiles.csv`` (labels 0, 1, 0, 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(("intact_a", "intact_b", "broken_tiles", "broken_level")):
        path = folder / f"{name}.tiff"
        if name.startswith("intact"):
            write_pyramidal_tiff(path, tissue(i), 0.5, tile_size=TIFF_TILE)
        else:
            corrupt = BROKEN if name == "broken_tiles" else "all"
            write_tiff_with_corrupt_tiles(path, tissue(i), 0.5, corrupt, tile_size=TIFF_TILE)
        rows.append({"slide_id": name, "path": path.name, "label": i % 2})
    manifest = folder / "bad_tiles.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "path", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest
