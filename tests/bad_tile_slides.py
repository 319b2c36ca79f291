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


# Evaluation-in-parts slides: 1024 px at 0.5 mpp make 8 x 8 tiles of 128 px. TIFF tiles of 16
# px (0, 0) and (0, 28) break the tiles at level-0 (0, 0) and (0, 384), positions 0 and 24 of
# the evaluation order.
PART_SLIDES_BROKEN = {"one_bad": ((0, 0),), "two_bad": ((0, 0), (0, 28))}


def write_part_slides(folder: Path) -> Path:
    """intact (64 tiles), small (tissue in one corner: 16 tiles), one_bad (the tile at position
    0 unreadable), two_bad (positions 0 and 24 unreadable); their manifest ``slides.csv``, all
    in the val split."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, name in enumerate(("intact", "small", "one_bad", "two_bad")):
        path = folder / f"{name}.tiff"
        image = tissue(i)
        if name == "small":
            image[:, 512:] = image[512:] = 240  # glass: 16 tissue tiles
        if name in PART_SLIDES_BROKEN:
            corrupt = PART_SLIDES_BROKEN[name]
            write_tiff_with_corrupt_tiles(path, image, 0.5, corrupt, tile_size=16)
        else:
            write_pyramidal_tiff(path, image, 0.5, tile_size=16)
        rows.append({"slide_id": name, "path": path.name, "label": i % 2, "split": "val"})
    manifest = folder / "slides.csv"
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest
