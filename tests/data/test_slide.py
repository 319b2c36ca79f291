"""Reading tiles at a target mpp from real OpenSlide files (generic TIFF and Aperio SVS)."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from lightning_wsi.data.slide import Slide, SlideError, level0_tile_size
from lightning_wsi.data.synthetic import write_pyramidal_tiff


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random image with structure at several scales, so a wrong level or offset shows."""
    small = rng.integers(0, 256, size=(height // 16, width // 16, 3), dtype=np.uint8)
    coarse = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))
    fine = rng.integers(-20, 21, size=(height, width, 3))
    return np.clip(coarse.astype(int) + fine, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("flavour", ["tiff", "svs"])
def test_mpp_comes_from_openslide_properties(tmp_path, flavour):
    image = np.full((1024, 1024, 3), 240, dtype=np.uint8)
    path = write_pyramidal_tiff(tmp_path / f"s.{flavour}", image, mpp=0.263, flavour=flavour)
    assert openslide.OpenSlide.detect_format(str(path)) == (
        "aperio" if flavour == "svs" else "generic-tiff"
    )
    with Slide(path) as slide:
        assert slide.mpp == pytest.approx(0.263)
    with Slide(path, mpp=0.3) as slide:  # a manifest or config value overrides the file
        assert slide.mpp == 0.3


def test_level0_tile_size_uses_true_mpp():
    assert level0_tile_size(224, 0.5, 0.25) == 448
    assert level0_tile_size(224, 0.5, 0.263) == 426  # a "40x" scanner that is not exactly 40x
    assert level0_tile_size(224, 0.5, 0.5) == 224


@pytest.mark.parametrize("flavour", ["tiff", "svs"])
def test_tile_content_at_025_and_05_mpp(tmp_path, flavour):
    rng = np.random.default_rng()
    image = _smooth_image(rng, 2048, 2048)
    path = write_pyramidal_tiff(tmp_path / f"s.{flavour}", image, 0.25, flavour, compression="zlib")
    x, y = (int(v) * 2 for v in rng.integers(0, 400, size=2))  # even: level-1 aligned
    with Slide(path) as slide:
        native = slide.read_tile(x, y, size0=448, tile_size=448)
        assert native.shape == (448, 448, 3)
        np.testing.assert_array_equal(native, image[y : y + 448, x : x + 448])
        half = slide.read_tile(x, y, size0=level0_tile_size(224, 0.5, slide.mpp), tile_size=224)
        assert slide.best_level(2.0) == 1
    # 0.5 mpp reads pyramid level 1 as is: the 2x2 area average of level 0, within rounding.
    expected = image[y : y + 448, x : x + 448].reshape(224, 2, 224, 2, 3).astype(float).mean((1, 3))
    assert half.shape == (224, 224, 3)
    assert np.abs(half.astype(float) - expected).max() <= 1.0


def test_tile_content_at_non_integer_downsample(tmp_path):
    """0.263 mpp to 0.5 mpp: level 0 read (426 px) and resized with antialiasing to 224 px."""
    rng = np.random.default_rng()
    image = _smooth_image(rng, 1536, 1536)
    path = write_pyramidal_tiff(tmp_path / "s.svs", image, 0.263, "svs", compression="zlib")
    with Slide(path) as slide:
        size0 = level0_tile_size(224, 0.5, slide.mpp)
        tile = slide.read_tile(100, 200, size0=size0, tile_size=224)
        assert slide.best_level(size0 / 224) == 0
    crop = Image.fromarray(image[200 : 200 + 426, 100 : 100 + 426])
    expected = np.asarray(crop.resize((224, 224), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(tile, expected)


def test_coarse_mpp_reads_coarser_level(tmp_path):
    image = np.full((4096, 4096, 3), 200, dtype=np.uint8)
    path = write_pyramidal_tiff(tmp_path / "s.tiff", image, mpp=0.25)
    with Slide(path) as slide:
        assert slide.level_downsamples[:4] == pytest.approx((1, 2, 4, 8))
        assert slide.best_level(4.0) == 2  # 1.0 mpp from a 0.25 mpp slide
        assert slide.best_level(3.9) == 1  # never upsample: 3.9 needs level 1
        assert slide.best_level(100.0) == len(slide.level_downsamples) - 1


def test_missing_mpp_is_an_error_naming_the_slide(tmp_path):
    path = tmp_path / "nompp.tiff"
    tifffile.imwrite(
        path, np.full((512, 512, 3), 230, np.uint8), tile=(256, 256), photometric="rgb"
    )
    with pytest.raises(SlideError, match=r"slide 'S-17'.*no microns-per-pixel.*`mpp` column"):
        Slide(path, slide_id="S-17")
    with Slide(path, mpp=0.5) as slide:
        assert slide.mpp == 0.5


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(SlideError, match=r"slide 'gone'.*file not found"):
        Slide(tmp_path / "gone.svs", slide_id="gone")
    junk = tmp_path / "junk.svs"
    junk.write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    with pytest.raises(SlideError, match=r"slide 'junk'.*OpenSlide cannot read"):
        Slide(junk, slide_id="junk")


def test_pixels_outside_the_scan_are_white(tmp_path):
    rng = np.random.default_rng()
    image = rng.integers(0, 200, size=(512, 512, 3), dtype=np.uint8)  # no pure white inside
    path = write_pyramidal_tiff(tmp_path / "s.tiff", image, 0.5, compression="zlib")
    with Slide(path) as slide:
        inside = slide.read_tile(64, 64, size0=128, tile_size=128)
        edge = slide.read_tile(448, 400, size0=128, tile_size=128)  # crosses both edges
    np.testing.assert_array_equal(inside, image[64:192, 64:192])
    np.testing.assert_array_equal(edge[:112, :64], image[400:, 448:])
    assert (edge[112:] == 255).all() and (edge[:, 64:] == 255).all()
