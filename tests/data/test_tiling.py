"""Tissue tiling on a known geometry, the coordinate cache, and parallel manifest tiling."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lightning_wsi.data.cache import CACHE_FORMAT, cache_file
from lightning_wsi.data.manifest_tiling import SlideJob, tile_many
from lightning_wsi.data.slide import SlideError
from lightning_wsi.data.tiling import tile_slide

# Two tissue pieces of 3x3 and 2x4 cells (big enough to be tissue, not specks), one cell apart.
BLOCKS = [(c, r) for c in range(1, 4) for r in range(1, 4)] + [
    (c, r) for c in range(6, 8) for r in range(2, 6)
]


@pytest.mark.parametrize(("flavour", "slide_mpp"), [("tiff", 0.5), ("svs", 0.25)])
def test_tile_counts_on_known_geometry(grid_slide, flavour, slide_mpp):
    cell = round(224 * 0.5 / slide_mpp)  # one 224 px tile at 0.5 mpp
    path = grid_slide(BLOCKS, n_x=10, n_y=7, cell_px=cell, mpp=slide_mpp, flavour=flavour)
    tiles = tile_slide(path, mpp=0.5, tile_size=224)
    assert tiles.tile_size_level0 == cell
    assert tiles.slide_mpp == pytest.approx(slide_mpp)
    assert tiles.dimensions == (10 * cell, 7 * cell)
    assert tiles.coords.dtype == np.int64 and tiles.coords.shape == (len(BLOCKS), 2)
    found = {(int(x) // cell, int(y) // cell) for x, y in tiles.coords}
    assert found == set(BLOCKS)
    assert np.all(tiles.coords % cell == 0)
    order = [(y, x) for x, y in tiles.coords.tolist()]
    assert order == sorted(order)  # row-major


def test_true_mpp_sets_the_grid(grid_slide):
    """A 0.263 mpp slide: tiles of 426 level-0 px, so a 2982 px wide slide holds 7 across."""
    path = grid_slide([(c, r) for c in range(7) for r in range(5)], 7, 5, 426, mpp=0.263)
    tiles = tile_slide(path, mpp=0.5, tile_size=224)
    assert tiles.tile_size_level0 == 426
    assert len(tiles) == 35


def test_min_tissue_fraction_threshold(grid_slide):
    # Cells of 112 px are half a 224 px tile. Tissue fills half-cells 1..5 on both axes, so per
    # axis the tiles are covered [0.5, 1, 1, 0]: 4 full tiles, 4 half tiles, 1 quarter corner.
    path = grid_slide([(c, r) for c in range(1, 6) for r in range(1, 6)], 8, 8, 112, mpp=0.5)
    counts = [
        len(tile_slide(path, mpp=0.5, tile_size=224, min_tissue_fraction=f))
        for f in (0.9, 0.45, 0.2, 0.0)
    ]
    assert counts == [4, 8, 9, 16]


def test_slide_without_tissue_has_no_tiles(grid_slide):
    path = grid_slide([], 6, 6, 224, mpp=0.5)
    assert len(tile_slide(path)) == 0


def test_cache_reuse_and_invalidation(grid_slide, tmp_path):
    cache = tmp_path / "cache"
    path = grid_slide(BLOCKS, 10, 7, 224, mpp=0.5)
    first = tile_slide(path, cache_dir=cache, slide_id="A")
    assert not first.from_cache
    entry_file = cache_file(cache, path, "A")
    entry = json.loads(entry_file.read_text())
    assert entry["format"] == CACHE_FORMAT
    assert entry["slide"]["path"] == str(path.resolve())
    assert entry["params"]["mpp"] == 0.5 and entry["params"]["tile_size"] == 224
    assert entry["n_tiles"] == len(first) and entry["tile_size_level0"] == 224

    second = tile_slide(path, cache_dir=cache, slide_id="A")
    assert second.from_cache
    np.testing.assert_array_equal(second.coords, first.coords)
    assert second.slide_mpp == first.slide_mpp and second.dimensions == first.dimensions

    # A change of any tiling parameter re-tiles ...
    assert not tile_slide(path, cache_dir=cache, slide_id="A", min_tissue_fraction=0.6).from_cache
    assert not tile_slide(path, cache_dir=cache, slide_id="A", tile_size=112).from_cache
    # ... and so does a change of the slide file (here: its modification time).
    tile_slide(path, cache_dir=cache, slide_id="A")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert not tile_slide(path, cache_dir=cache, slide_id="A").from_cache
    assert tile_slide(path, cache_dir=cache, slide_id="A").from_cache


def test_corrupt_cache_entry_is_retiled(grid_slide, tmp_path):
    cache = tmp_path / "cache"
    path = grid_slide(BLOCKS, 10, 7, 224, mpp=0.5)
    tiles = tile_slide(path, cache_dir=cache, slide_id="A")
    cache_file(cache, path, "A").write_text("{not json")
    again = tile_slide(path, cache_dir=cache, slide_id="A")
    assert not again.from_cache
    np.testing.assert_array_equal(again.coords, tiles.coords)


def test_tile_many_in_parallel_keeps_order_and_names_failures(grid_slide, tmp_path):
    pieces = [BLOCKS[:9], BLOCKS, BLOCKS[9:]]  # 9, 17 and 8 tissue tiles
    good = [grid_slide(cells, 10, 7, 224, mpp=0.5) for cells in pieces]
    jobs = [SlideJob(f"s{i}", str(p)) for i, p in enumerate(good)]
    jobs.insert(1, SlideJob("missing", str(tmp_path / "missing.svs")))
    summary = tile_many(jobs, num_workers=2, progress=False, cache_dir=tmp_path / "c")
    lengths = [None if isinstance(r, SlideError) else len(r) for r in summary.results]
    assert lengths == [9, None, 17, 8]
    assert "missing" in str(summary.results[1])
    assert summary.n_tiles == 34 and summary.n_failed == 1 and summary.n_cached == 0
    assert "tiled 4 slides" in str(summary) and "1 unreadable" in str(summary)
    again = tile_many(jobs, num_workers=0, progress=False, cache_dir=tmp_path / "c")
    assert again.n_cached == 3
