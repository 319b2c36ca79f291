"""Tissue tiling on a known geometry, the coordinate cache, and parallel manifest tiling."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from lightning_wsi.data.cache import CACHE_FORMAT
from lightning_wsi.data.manifest_tiling import SlideJob, tile_many
from lightning_wsi.data.slide import SlideError
from lightning_wsi.data.tiling import check_tiling_params, tile_slide

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
    entry_file = next(cache.glob("A-*.json"))
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
    next(cache.glob("A-*.json")).write_text("{not json")
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


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mpp": 1e-9}, r"^`mpp` \(target µm per pixel of the tiles\) 1e-09 is finer than 0.05"),
        ({"mpp": 0}, r"^`mpp` .* 0 is zero; use a value in \[0.05, 20.0\]: 0.5 is 20x"),
        ({"mpp": -0.5}, r"^`mpp` .* -0.5 is negative"),
        ({"mpp": float("nan")}, r"^`mpp` .* nan is NaN"),
        ({"mpp": float("inf")}, r"^`mpp` .* inf is infinite"),
        ({"mpp": 352.8}, r"^`mpp` .* 352.8 is coarser than 20.0"),
        ({"mpp": "0.5"}, r"^`mpp` .* '0.5' is not a number \(str\)"),
        ({"tile_size": 1}, r"^`tile_size` 1 px is outside \[16, 4096\]; 224 is usual$"),
        ({"tile_size": 8192}, r"^`tile_size` 8192 px is outside \[16, 4096\]"),
        ({"tile_size": 224.5}, r"^`tile_size` must be a whole number of pixels, got 224.5$"),
        ({"tile_size": True}, r"^`tile_size` must be a whole number of pixels, got True$"),
        ({"min_tissue_fraction": 1.5}, r"^min_tissue_fraction must lie in \[0, 1\], got 1.5"),
        ({"min_tissue_fraction": float("nan")}, r"^min_tissue_fraction must lie in \[0, 1\]"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_implausible_tiling_params_are_refused_up_front(tmp_path, kwargs, message):
    params = {"mpp": 0.5, "tile_size": 224, "min_tissue_fraction": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        check_tiling_params(**params)
    # tile_slide checks them before it opens anything: no slide is needed to see the error.
    with pytest.raises(ValueError, match=message):
        tile_slide(tmp_path / "never-opened.svs", **params)


def test_plausible_tiling_params_pass():
    for mpp, size in [(0.05, 16), (20.0, 4096), (0.5, 224), (2, 56), (0.25, 224.0)]:
        check_tiling_params(mpp, size, 0.0)
        check_tiling_params(np.float32(mpp), np.int64(size), np.float32(1.0))
