"""Slides that lie or break: implausible mpp, upsampling, corrupt fine levels, odd paths,
grayscale scans, memory, and tiling workers that get killed. Every slide is a real file."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import openslide
import pytest
import tifffile
from slide_files import (
    grid_image,
    limit_address_space,
    tile_or_die,
    tile_or_die_unseen,
    write_single_level_tiff,
    write_svs_with_mpp_text,
    write_tiff_with_corrupt_tiles,
)

import lightning_wsi.data.manifest_tiling as manifest_tiling
import lightning_wsi.data.slide as slide_module
from lightning_wsi.data.manifest_tiling import (
    WORKER_MEMORY_BYTES,
    SlideJob,
    _pool_size,
    available_memory,
    tile_many,
)
from lightning_wsi.data.processes import worker_context
from lightning_wsi.data.slide import MAX_MPP, MIN_MPP, Slide, SlideError, mpp_problem
from lightning_wsi.data.tiling import tile_slide
from lightning_wsi.data.tissue import GRAYSCALE_NOTE

FIX = r"manifest's `mpp` column or the `slide_mpp` argument"
# 3x3 tissue cells of 224 px in a 5x5 grid: 9 tiles of 224 px at 0.5 mpp on a 0.5 mpp slide.
BLOCK = [(c, r) for c in range(1, 4) for r in range(1, 4)]


# --- 1. mpp from the file or an override must be physical ------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (
            "1000",
            r"'1000' µm/px as `openslide.mpp-x` \(from the Aperio ImageDescription's "
            r"`MPP = 1000`\), which is coarser than 20.0 µm/px",
        ),
        ("0", r"'0' µm/px as `openslide.mpp-x` .*`MPP = 0`\), which is zero"),
        ("-1", r"'-1' µm/px as `openslide.mpp-x` .*which is negative"),
        ("inf", r"'inf' µm/px as `openslide.mpp-x` .*which is infinite"),
        ("1e-9", r"as `openslide.mpp-x` .*`MPP = 1e-9`\), which is finer than 0.05 µm/px"),
        ("nan", r"no microns-per-pixel .*`MPP = nan`, which is not a number of microns"),
    ],
    ids=["1000", "0", "-1", "inf", "1e-9", "nan"],
)
def test_implausible_svs_mpp_is_refused_naming_the_key(tmp_path, text, reason):
    path = write_svs_with_mpp_text(tmp_path / "s.svs", grid_image(BLOCK, 5, 5, 112), text)
    with pytest.raises(SlideError, match=rf"^slide 'S-1': .*{reason}.*; .*{FIX}$"):
        tile_slide(path, mpp=0.5, slide_id="S-1")
    # The fix the message names works: an override replaces the file's value.
    assert tile_slide(path, mpp=0.5, slide_mpp=0.5).slide_mpp == 0.5


def test_tiff_72_dpi_default_is_refused_naming_the_resolution_tags(tmp_path):
    path = tmp_path / "photo.tiff"
    tifffile.imwrite(
        path,
        grid_image(BLOCK, 5, 5, 224),
        tile=(256, 256),
        photometric="rgb",
        resolution=(72, 72),
        resolutionunit="INCH",
    )
    assert float(openslide.OpenSlide(str(path)).properties["openslide.mpp-x"]) == pytest.approx(
        352.78, abs=0.01
    )
    expected = (
        r"^slide 'photo': the file's metadata gives '352.7\d+' µm/px as `openslide.mpp-x` "
        r"\(from the TIFF resolution tags: tiff.XResolution = 72 per inch\), which is coarser "
        r"than 20.0 µm/px, coarser than any scanner's full resolution \(352.8 µm/px is 72 dpi, "
        r"the default resolution image tools write, not a scanner's pixel size\); plausible "
        rf"level-0 values lie in \[0.05, 20.0\] µm/px; give the true value in the {FIX}$"
    )
    with pytest.raises(SlideError, match=expected):
        Slide(path, slide_id="photo")
    assert len(tile_slide(path, mpp=0.5, slide_mpp=0.5)) == len(BLOCK)


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        (1000.0, "is coarser than 20.0"),
        (0.0, "is zero"),
        (-0.25, "is negative"),
        (float("inf"), "is infinite"),
        (1e-9, "is finer than 0.05"),
    ],
    ids=["1000", "0", "-0.25", "inf", "1e-9"],
)
def test_implausible_override_is_refused_naming_where_it_came_from(grid_slide, override, reason):
    path = grid_slide(BLOCK, 5, 5, 224, mpp=0.5)
    expected = (
        rf"^slide 'S-2': the mpp override {override!r} µm/px \(from the {FIX}\) {reason}.*"
        r"\[0.05, 20.0\] µm/px"
    )
    with pytest.raises(SlideError, match=expected):
        tile_slide(path, mpp=0.5, slide_mpp=override, slide_id="S-2")


def test_plausible_mpp_range_is_inclusive():
    assert (MIN_MPP, MAX_MPP) == (0.05, 20.0)
    assert mpp_problem(0.05) is None and mpp_problem(20.0) is None and mpp_problem(1) is None
    assert (
        mpp_problem(0.0499) == "is finer than 0.05 µm/px, beyond what a light microscope resolves"
    )
    assert (
        mpp_problem(20.01)
        == "is coarser than 20.0 µm/px, coarser than any scanner's full resolution"
    )
    assert mpp_problem(float("nan")) == "is NaN (not a number)"
    assert mpp_problem(True) == "is not a number (bool)"
    assert mpp_problem("0.5") == "is not a number (str)"


# --- 3. upsampling ------------------------------------------------------------------------------


def test_target_finer_than_the_slide_is_refused_unless_allowed(grid_slide):
    path = grid_slide(BLOCK, 5, 5, 224, mpp=0.5)
    with pytest.raises(
        SlideError,
        match=r"^slide 'U': the target mpp 0.25 is finer than the slide's 0.5 µm/px, so tiles "
        r"would be upsampled 2.00x .*allow_upsampling=True",
    ):
        tile_slide(path, mpp=0.25, slide_id="U")
    upsampled = tile_slide(path, mpp=0.25, allow_upsampling=True)
    assert upsampled.tile_size_level0 == 112 and len(upsampled) == 4 * len(BLOCK)
    # Within the 10% tolerance (scanners' nominal magnifications differ that much): accepted.
    assert tile_slide(path, mpp=0.46).tile_size_level0 == round(224 * 0.46 / 0.5)
    with pytest.raises(SlideError, match=r"upsampled 1.11x"):
        tile_slide(path, mpp=0.45)


def test_a_0263_scanner_read_at_025_is_within_tolerance(grid_slide):
    path = grid_slide(BLOCK, 5, 5, 426, mpp=0.263)
    tiles = tile_slide(path, mpp=0.25, tile_size=448)  # 5% finer than the slide
    assert tiles.tile_size_level0 == 426 and len(tiles) == len(BLOCK)


# --- 4. corrupt full-resolution levels under an intact thumbnail -------------------------------


@pytest.fixture
def corrupt_slide(tmp_path):
    """A 0.5 mpp JPEG pyramid, tissue everywhere, every level-0 tile garbage."""
    image = grid_image([(c, r) for c in range(4) for r in range(4)], 4, 4, 256)
    return write_tiff_with_corrupt_tiles(tmp_path / "c.tiff", image, mpp=0.5)


def test_corrupt_level0_fails_at_setup_naming_slide_and_tile(corrupt_slide, tmp_path):
    cache = tmp_path / "cache"
    expected = (
        r"^slide 'C': reading a tile at the training resolution \(224 px at 0.5 µm/px, level-0 "
        r"x=\d+, y=\d+\) of .*c.tiff failed \(OpenSlideError: Corrupt JPEG data.*\); its "
        r"full-resolution pyramid levels are likely corrupt"
    )
    with pytest.raises(SlideError, match=expected):
        tile_slide(corrupt_slide, mpp=0.5, slide_id="C", cache_dir=cache)
    # Without the probe the thumbnail (an intact coarse level) tiles it and the cache keeps it;
    # the probe then fails on the cache hit too.
    tiles = tile_slide(corrupt_slide, mpp=0.5, slide_id="C", cache_dir=cache, probe=False)
    assert len(tiles) == 16 and not tiles.from_cache
    with pytest.raises(SlideError, match=expected):
        tile_slide(corrupt_slide, mpp=0.5, slide_id="C", cache_dir=cache)
    # Training at 2 mpp reads level 2, which is intact: nothing to refuse.
    assert len(tile_slide(corrupt_slide, mpp=2.0, tile_size=56, cache_dir=cache)) == 16


def test_one_corrupt_tile_is_only_that_tile(tmp_path):
    image = grid_image([(c, r) for c in range(4) for r in range(4)], 4, 4, 256)
    path = write_tiff_with_corrupt_tiles(tmp_path / "one.svs", image, 0.5, [(3, 3)], "svs")
    tiles = tile_slide(path, mpp=0.5, tile_size=256)  # the probe reads the middle tile: intact
    assert len(tiles) == 16
    with Slide(path) as slide:
        np.testing.assert_array_equal(slide.read_tile(0, 0, 256, 256).shape, (256, 256, 3))
    with Slide(path) as slide, pytest.raises(openslide.OpenSlideError, match="Corrupt JPEG"):
        slide.read_tile(768, 768, 256, 256)
    with pytest.raises(ValueError, match=r"tile \(4, 0\) is outside the 4x4 grid"):
        write_tiff_with_corrupt_tiles(tmp_path / "x.tiff", image, 0.5, [(4, 0)])


# --- 8. reasons that say what happened -----------------------------------------------------------


def test_directory_and_fifo_are_named_as_such(tmp_path):
    folder = tmp_path / "slide.mrxs.d"
    folder.mkdir()
    with pytest.raises(SlideError, match=r"^slide 'D': .*slide.mrxs.d is a directory, not a slide"):
        tile_slide(folder, slide_id="D")
    fifo = tmp_path / "pipe.svs"
    os.mkfifo(fifo)
    with pytest.raises(SlideError, match=r"^slide 'F': .*pipe.svs is not a regular file"):
        tile_slide(fifo, slide_id="F")
    with pytest.raises(SlideError, match=r"^slide 'G': file not found: .*gone.svs$"):
        tile_slide(tmp_path / "gone.svs", slide_id="G")


@pytest.mark.parametrize("channels", [1, 3])
def test_grayscale_slide_without_tissue_says_it_is_grayscale(tmp_path, channels):
    rgb = grid_image(BLOCK, 5, 5, 224)
    grey = rgb.mean(axis=2).astype(np.uint8)  # the same slide with its colour removed
    image = grey if channels == 1 else np.repeat(grey[..., None], 3, axis=2)
    path = write_single_level_tiff(tmp_path / "g.tiff", image, mpp=0.5)
    cache = tmp_path / "cache"
    tiles = tile_slide(path, cache_dir=cache)
    assert len(tiles) == 0 and tiles.note == GRAYSCALE_NOTE
    again = tile_slide(path, cache_dir=cache)
    assert again.from_cache and again.note == GRAYSCALE_NOTE
    assert "grayscale" in GRAYSCALE_NOTE and "colour (RGB) brightfield" in GRAYSCALE_NOTE
    # The colour original has its tissue and no note; blank glass has no tissue and no note.
    colour = tile_slide(write_single_level_tiff(tmp_path / "c.tiff", rgb, mpp=0.5))
    assert len(colour) == len(BLOCK) and colour.note is None
    glass = tile_slide(write_single_level_tiff(tmp_path / "e.tiff", grid_image([], 5, 5, 224), 0.5))
    assert len(glass) == 0 and glass.note is None


def test_out_of_memory_is_reported_as_such_not_as_corrupt(tmp_path):
    """A real MemoryError: the worker's address space is capped 16 MiB above its size, and the
    thumbnail of a single-level 3072^2 slide needs a 36 MiB buffer."""
    path = write_single_level_tiff(tmp_path / "big.tiff", grid_image(BLOCK, 6, 6, 512), mpp=0.5)
    context = worker_context(["lightning_wsi.data.tiling"])
    with ProcessPoolExecutor(
        1, context, initializer=limit_address_space, initargs=(16 << 20,)
    ) as pool:
        future = pool.submit(tile_slide, str(path), mpp=8.0, tile_size=64, slide_id="M")
        with pytest.raises(SlideError) as info:
            future.result()
    message = str(info.value)
    assert message.startswith("slide 'M': out of memory while reading ")
    assert "big.tiff" in message and "corrupt" not in message.replace("not known to be corrupt", "")


def test_memory_error_in_a_tiler_becomes_the_slides_error(grid_slide):
    def exhausting(path, **kwargs):
        return np.ones(1 << 62, dtype=np.uint8)  # numpy refuses at once: a real MemoryError

    path = grid_slide(BLOCK, 5, 5, 224, mpp=0.5)
    summary = tile_many(
        [SlideJob("M2", str(path))], num_workers=0, progress=False, tiler=exhausting
    )
    assert str(summary.results[0]).startswith("slide 'M2': out of memory while reading ")


# --- 7. bounded memory and killed workers --------------------------------------------------------


def test_single_level_thumbnail_is_read_in_bands(tmp_path, monkeypatch):
    image = grid_image(BLOCK + [(5, 4), (6, 4), (5, 5), (6, 5)], 8, 7, 256)  # 2048 x 1792
    path = write_single_level_tiff(tmp_path / "flat.tiff", image, mpp=0.5)  # 256 px TIFF tiles
    calls = []
    real = openslide.OpenSlide.read_region

    def recording(self, location, level, size):
        calls.append((location, size))
        return real(self, location, level, size)

    monkeypatch.setattr(openslide.OpenSlide, "read_region", recording)
    whole = tile_slide(path, probe=False)
    assert calls == [((0, 0), (2048, 1792))]  # fits the default band: read at once
    with Slide(path) as slide:
        reference, _ = slide.thumbnail(7.0)
    calls.clear()
    monkeypatch.setattr(slide_module, "_BAND_PIXELS", 2048 * 600)  # 600 rows: 2 tile rows
    banded = tile_slide(path, probe=False)
    # Every row read once, top to bottom, in bands of whole TIFF tile rows: no tile twice.
    assert calls == [((0, y), (2048, min(512, 1792 - y))) for y in range(0, 1792, 512)]
    np.testing.assert_array_equal(banded.coords, whole.coords)
    with Slide(path) as slide:
        thumb, _ = slide.thumbnail(7.0)
    # The bands join without seams: the same filter, off by float rounding at most.
    assert thumb.shape == reference.shape == (128, 146, 3)
    assert np.abs(thumb.astype(int) - reference).max() <= 1


def test_a_killed_worker_costs_only_its_slide(grid_slide, tmp_path):
    pieces = [BLOCK, BLOCK[:4] + BLOCK[5:], BLOCK, BLOCK[:7]]
    paths = [grid_slide(cells, 5, 5, 224, mpp=0.5, seed=i) for i, cells in enumerate(pieces)]
    jobs = [SlideJob(f"s{i}", str(p)) for i, p in enumerate(paths)]
    tiler = functools.partial(tile_or_die, die_for="s1")
    summary = tile_many(jobs, num_workers=2, progress=False, tiler=tiler, cache_dir=tmp_path / "c")
    lengths = [None if isinstance(r, SlideError) else len(r) for r in summary.results]
    assert lengths == [9, None, 9, 7]
    assert str(summary.results[1]).startswith(
        "slide 's1': the tiling worker process died while tiling "
    )
    assert paths[1].name in str(summary.results[1]) and summary.n_failed == 1


def test_a_worker_death_the_pool_never_hears_of_costs_only_its_slide(
    grid_slide, tmp_path, monkeypatch
):
    """The dying worker stops the forkserver first, so the exit code never reaches the pool:
    after ``DEATH_GRACE_S`` the watchdog kills the server, the pool breaks, and the slide is
    tried alone (where the same happens) and named, while the others are tiled."""
    monkeypatch.setattr(manifest_tiling, "DEATH_GRACE_S", 1.0)
    paths = [grid_slide(BLOCK, 5, 5, 224, mpp=0.5, seed=i) for i in range(3)]
    jobs = [SlideJob(f"s{i}", str(p)) for i, p in enumerate(paths)]
    tiler = functools.partial(tile_or_die_unseen, die_for="s1")
    summary = tile_many(jobs, num_workers=2, progress=False, tiler=tiler, cache_dir=tmp_path / "c")
    lengths = [None if isinstance(r, SlideError) else len(r) for r in summary.results]
    assert lengths == [9, None, 9]
    assert str(summary.results[1]).startswith("slide 's1': the tiling worker process died")
    again = tile_many(jobs[:1], num_workers=1, progress=False, cache_dir=tmp_path / "d")
    assert len(again.results[0]) == 9  # the next pool starts a new forkserver


def test_pool_size_respects_available_memory():
    gib = 1 << 30
    assert WORKER_MEMORY_BYTES == gib
    assert available_memory() > 0  # /proc/meminfo (and a cgroup limit) on Linux
    assert _pool_size(8, 10, 9 * gib // 2) == 4  # memory, not cores, sets the size
    assert _pool_size(8, 10, gib // 2) == 1  # not even one worker's worth: one at a time
    assert _pool_size(4, 2, 64 * gib) == 2 and _pool_size(2, 10, 64 * gib) == 2
    assert _pool_size(None, 10, None) == min(10, os.cpu_count())  # unknown memory: no cap
    assert _pool_size(0, 10, 64 * gib) == 0  # in this process
