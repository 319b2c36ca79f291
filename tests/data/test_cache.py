"""The coordinate cache: verified against the slide, one entry per setting, written for a group,
and never a reason to lose a slide when it cannot be written."""

from __future__ import annotations

import copy
import json
import os
import resource
import stat

import numpy as np
import pytest

from lightning_wsi.data.cache import CACHE_FORMAT, check_entry, slide_identity
from lightning_wsi.data.manifest_tiling import SlideJob, tile_many
from lightning_wsi.data.tiling import TILING_VERSION, tile_slide

# 64 px cells at 2 µm/px, tiled 64 px at 2 µm/px: one tile per cell (128 µm), 9 + 4 tissue tiles.
CELLS = [(c, r) for c in range(1, 4) for r in range(1, 4)] + [(6, 2), (7, 2), (6, 3), (7, 3)]
TILE = {"mpp": 2.0, "tile_size": 64}


@pytest.fixture
def slide(grid_slide):
    return grid_slide(CELLS, 10, 6, 64, mpp=2.0)


def _entry_file(cache):
    (file,) = cache.glob("*.json")
    return file


def _tamper(cache, change):
    file = _entry_file(cache)
    entry = json.loads(file.read_text())
    change(entry)
    file.write_text(json.dumps(entry))


def test_entry_holds_what_the_docstring_says(slide, tmp_path):
    cache = tmp_path / "cache"
    tiles = tile_slide(slide, cache_dir=cache, slide_id="A", **TILE)
    entry = json.loads(_entry_file(cache).read_text())
    assert CACHE_FORMAT == "lightning-wsi/tiles-v2" and entry["format"] == CACHE_FORMAT
    assert entry["slide"] == slide_identity(slide)
    assert entry["params"] == {
        "mpp": 2.0,
        "tile_size": 64,
        "min_tissue_fraction": 0.5,
        "slide_mpp": None,
        "tissue_options": {},
        "version": TILING_VERSION,
    }
    assert entry["slide_mpp"] == 2.0 and entry["dimensions"] == [640, 384]
    assert entry["tile_size_level0"] == 64 and entry["n_tiles"] == len(CELLS) == len(tiles)
    assert entry["coords"] == tiles.coords.tolist() and entry["note"] is None
    assert tiles.cache_error is None and not tiles.from_cache


# (what is wrong with the entry, how to make it so, the reason check_entry gives)
BAD_ENTRIES = {
    "coords outside the slide": (
        lambda e: e["coords"].append([640, 0]) or e.update(n_tiles=e["n_tiles"] + 1),
        "coords outside the 640x384 slide",
    ),
    "coords off the grid": (
        lambda e: e["coords"].__setitem__(0, [65, 64]),
        "coords off the grid of 64 level-0 px",
    ),
    "negative coords": (
        lambda e: e["coords"].__setitem__(0, [-64, 64]),
        "coords outside the 640x384 slide",
    ),
    "coords that overflow int64 when a tile is added": (
        lambda e: e["coords"].__setitem__(0, [(2**63 - 1) // 64 * 64, 0]),
        "coords outside the 640x384 slide",
    ),
    "coords beyond int64": (
        lambda e: e["coords"].__setitem__(0, [2**64, 0]),
        "coords are not integer [x, y] pairs",
    ),
    "duplicate coords": (
        lambda e: e["coords"].__setitem__(1, e["coords"][0]),
        "coords are not distinct and row-major",
    ),
    "float coords": (
        lambda e: e["coords"].__setitem__(0, [64.0, 64.0]),
        "coords are not integer [x, y] pairs (float64",
    ),
    "ragged coords": (
        lambda e: e["coords"].__setitem__(0, [64]),
        "coords are not [x, y] pairs",
    ),
    "wrong tile size": (lambda e: e.update(tile_size_level0=32), "tile_size_level0 32 is not 64"),
    "tile size as text": (
        lambda e: e.update(tile_size_level0="64"),
        "tile_size_level0 '64' is not 64",
    ),
    "n_tiles != len(coords)": (lambda e: e.update(n_tiles=3), "n_tiles 3 but 13 coords"),
    "n_tiles a bool": (lambda e: e.update(n_tiles=True), "n_tiles True is not a count"),
    "wrong dimensions": (
        lambda e: e.update(dimensions=[64000, 384]),
        "dimensions [64000, 384] are not the slide's [640, 384]",
    ),
    "wrong slide mpp": (
        lambda e: e.update(slide_mpp=0.25),
        "slide_mpp 0.25 is not the slide's 2.0",
    ),
    "slide mpp as text": (
        lambda e: e.update(slide_mpp="2.0"),
        "slide_mpp '2.0' is not the slide's",
    ),
    "missing coords": (lambda e: e.pop("coords"), "lacks ['coords']"),
    "missing note and n_tiles": (
        lambda e: [e.pop("note"), e.pop("n_tiles")],
        "lacks ['n_tiles', 'note']",
    ),
    "note not text": (lambda e: e.update(note=7), "note 7 is not text"),
    "old format": (
        lambda e: e.update(format="lightning-wsi/tiles-v1"),
        "format 'lightning-wsi/tiles-v1'",
    ),
    "other parameters": (
        lambda e: e["params"].update(tile_size=128),
        "written with other tiling parameters",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_a_wrong_entry_is_named_by_check_entry(slide, tmp_path, case):
    cache = tmp_path / "cache"
    tiles = tile_slide(slide, cache_dir=cache, **TILE)
    good = json.loads(_entry_file(cache).read_text())
    params = good["params"]
    expected = {"dimensions": (640, 384), "slide_mpp": 2.0, "tile_size_level0": 64}
    ok = copy.deepcopy(good)
    assert check_entry(ok, slide_identity(slide), params, **expected) is None
    np.testing.assert_array_equal(ok["coords"], tiles.coords)
    change, reason = BAD_ENTRIES[case]
    bad = copy.deepcopy(good)
    change(bad)
    assert reason in check_entry(bad, slide_identity(slide), good["params"], **expected)


@pytest.mark.parametrize("case", ["coords outside the slide", "missing coords", "wrong tile size"])
def test_a_wrong_entry_is_retiled_and_rewritten_never_a_bad_slide(slide, tmp_path, case):
    cache = tmp_path / "cache"
    first = tile_slide(slide, cache_dir=cache, **TILE)
    _tamper(cache, BAD_ENTRIES[case][0])
    again = tile_slide(slide, cache_dir=cache, **TILE)
    assert not again.from_cache and again.tile_size_level0 == 64
    np.testing.assert_array_equal(again.coords, first.coords)
    third = tile_slide(slide, cache_dir=cache, **TILE)  # the rewritten entry is good again
    assert third.from_cache
    np.testing.assert_array_equal(third.coords, first.coords)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[" * 100_000, b'"a string"', b"\xff\xfe\x00garbage", b""],
    ids=["broken", "deeply nested", "not an object", "not utf-8", "empty"],
)
def test_hostile_entry_files_are_retiled(slide, tmp_path, content):
    cache = tmp_path / "cache"
    first = tile_slide(slide, cache_dir=cache, **TILE)
    _entry_file(cache).write_bytes(content)
    again = tile_slide(slide, cache_dir=cache, **TILE)
    assert not again.from_cache
    np.testing.assert_array_equal(again.coords, first.coords)


def test_a_sweep_keeps_one_entry_per_setting(slide, tmp_path):
    cache = tmp_path / "cache"
    settings = [TILE, {"mpp": 4.0, "tile_size": 32}, {**TILE, "min_tissue_fraction": 0.9}]
    first = [tile_slide(slide, cache_dir=cache, slide_id="A", **s) for s in settings]
    assert len(list(cache.glob("A-*.json"))) == 3 and not any(t.from_cache for t in first)
    again = [tile_slide(slide, cache_dir=cache, slide_id="A", **s) for s in settings]
    assert all(t.from_cache for t in again)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a.coords, b.coords)
    assert [t.tile_size_level0 for t in again] == [64, 64, 64]


def test_a_slide_id_cannot_leave_the_cache_folder(slide, tmp_path):
    cache = tmp_path / "deep" / "cache"
    tile_slide(slide, cache_dir=cache, slide_id="../../escape/x", **TILE)
    (file,) = cache.iterdir()
    assert file.name.startswith("escape_x-") and file.suffix == ".json"
    assert [p for p in tmp_path.rglob("*.json")] == [file]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_entries_get_the_permissions_the_umask_gives(slide, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        tile_slide(slide, cache_dir=tmp_path / "cache", **TILE)
    finally:
        os.umask(old)
    assert stat.S_IMODE(_entry_file(tmp_path / "cache").stat().st_mode) == mode


def _assert_uncached_but_good(tiles, reference, *names):
    assert not tiles.from_cache
    np.testing.assert_array_equal(tiles.coords, reference.coords)
    assert tiles.cache_error.startswith("cannot write the tile cache entry ")
    for name in names:
        assert name in tiles.cache_error


def test_a_cache_path_that_is_a_file_costs_the_cache_not_the_slide(slide, tmp_path):
    reference = tile_slide(slide, **TILE)
    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    tiles = tile_slide(slide, cache_dir=blocker, **TILE)
    _assert_uncached_but_good(tiles, reference, str(blocker), "FileExistsError")


def test_a_full_disk_costs_the_cache_not_the_slide(slide, tmp_path):
    """Writes past RLIMIT_FSIZE fail with EFBIG ("File too large") as on a full disk (ENOSPC):
    the same OSError at the same write, raised by the kernel."""
    reference = tile_slide(slide, **TILE)
    cache = tmp_path / "cache"
    cache.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
    try:
        tiles = tile_slide(slide, cache_dir=cache, **TILE)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    _assert_uncached_but_good(tiles, reference, "File too large")
    assert list(cache.iterdir()) == []  # no half-written or temporary file left behind


def _permissions_ignored(folder) -> bool:
    """Whether this process writes into a 0o555 folder anyway (root, CAP_DAC_OVERRIDE)."""
    try:
        (folder / "probe").touch()
    except PermissionError:
        return False
    (folder / "probe").unlink()
    return True


def test_a_read_only_cache_folder_costs_the_cache_not_the_slide(slide, tmp_path):
    reference = tile_slide(slide, **TILE)
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    try:
        if _permissions_ignored(cache):
            pytest.skip(f"euid {os.geteuid()} ignores folder permissions (root)")
        tiles = tile_slide(slide, cache_dir=cache, **TILE)
    finally:
        cache.chmod(0o755)
    _assert_uncached_but_good(tiles, reference, "PermissionError")
    assert list(cache.iterdir()) == []


def test_tile_many_reports_each_unwritable_entry_once(grid_slide, tmp_path):
    paths = [grid_slide(cells, 10, 6, 64, mpp=2.0) for cells in (CELLS[:9], CELLS)]
    blocker = tmp_path / "cache"
    blocker.write_text("")
    jobs = [SlideJob(f"s{i}", str(p)) for i, p in enumerate(paths)]
    summary = tile_many(jobs, num_workers=0, progress=False, cache_dir=blocker, **TILE)
    assert [len(r) for r in summary.results] == [9, 13] and summary.n_failed == 0
    assert len(summary.cache_errors) == 2 and all(str(blocker) in e for e in summary.cache_errors)
    assert "(0 from cache, 2 not cached)" in str(summary)
