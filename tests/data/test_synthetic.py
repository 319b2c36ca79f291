"""Synthetic slides: real OpenSlide reads what we write, and the content carries the signal."""

from __future__ import annotations

import csv
import json

import numpy as np
import openslide
import pytest
import tifffile
from scipy import ndimage

from lightning_wsi.data.synthetic import (
    LESIONS_FORMAT,
    make_synthetic_dataset,
    make_synthetic_slide,
    synthetic_survival,
    write_pyramidal_tiff,
)

SMALL_UM = (700.0, 500.0)  # 1400 x 1000 px at 0.5 µm/px: two pyramid levels


@pytest.fixture(scope="module")
def small():
    return make_synthetic_slide(3, positive=True, size_um=SMALL_UM, mpp=0.5)


@pytest.fixture(scope="module")
def default_positive():
    """One slide at the real default geometry and training resolution."""
    return make_synthetic_slide(11, positive=True, mpp=0.5)


def _read_all(path, level=0) -> np.ndarray:
    with openslide.OpenSlide(path) as slide:
        w, h = slide.level_dimensions[level]
        region = slide.read_region((0, 0), level, (w, h))
    return np.asarray(region.convert("RGB"))


def _bin2(image: np.ndarray) -> np.ndarray:
    """2x2 area average, as a pyramid level or a lower-mpp render."""
    h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    return image[:h, :w].reshape(h // 2, 2, w // 2, 2, -1).astype(np.float64).mean((1, 3))


@pytest.mark.parametrize(
    ("flavour", "mpp", "vendor"),
    [
        ("tiff", 0.5, "generic-tiff"),
        ("svs", 0.25, "aperio"),
        ("tiff", 0.263, "generic-tiff"),
        ("svs", 0.263, "aperio"),
    ],
)
def test_openslide_reads_format_mpp_and_pyramid(tmp_path, small, flavour, mpp, vendor):
    path = write_pyramidal_tiff(tmp_path / f"s.{flavour}", small.image, mpp, flavour=flavour)
    h, w = small.image.shape[:2]
    assert openslide.OpenSlide.detect_format(path) == vendor
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == 2
        assert slide.level_dimensions == ((w, h), (w // 2, h // 2))
        assert slide.level_downsamples == pytest.approx([1.0, 2.0], rel=1e-3)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(mpp)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(mpp)
        if flavour == "svs":
            power = slide.properties[openslide.PROPERTY_NAME_OBJECTIVE_POWER]
            assert float(power) == round(10 / mpp)


def test_pyramid_halves_until_small_side_is_512(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (2100, 4400, 3), dtype=np.uint8)
    path = write_pyramidal_tiff(tmp_path / "big.tiff", image, 0.5, compression="zlib")
    with openslide.OpenSlide(path) as slide:
        assert slide.level_dimensions == ((4400, 2100), (2200, 1050), (1100, 525), (550, 262))
        assert slide.level_downsamples == pytest.approx([1, 2, 4, 8], rel=1e-2)
    with tifffile.TiffFile(path) as tif:
        assert all(page.is_tiled and page.tilewidth == 256 for page in tif.pages)
        assert [page.subfiletype for page in tif.pages] == [0, 1, 1, 1]
    assert path.stat().st_mode & 0o777 == 0o644  # readable by all, not a private temp file


def test_zlib_round_trips_exactly_and_levels_are_area_averages(tmp_path, small):
    path = write_pyramidal_tiff(tmp_path / "s.tiff", small.image, 0.5, compression="zlib")
    np.testing.assert_array_equal(_read_all(path), small.image)
    level1 = _read_all(path, level=1).astype(np.float64)
    assert np.abs(level1 - _bin2(small.image)).max() <= 1.0


@pytest.mark.parametrize("flavour", ["tiff", "svs"])
def test_jpeg_content_matches_within_tolerance(tmp_path, small, flavour):
    path = write_pyramidal_tiff(tmp_path / f"s.{flavour}", small.image, 0.5, flavour=flavour)
    diff = np.abs(_read_all(path).astype(np.int16) - small.image)
    assert diff.mean() < 2.0
    assert np.percentile(diff, 99) < 12


def test_interrupted_write_leaves_nothing(tmp_path, small, monkeypatch):
    calls = []

    def fail_on_second_level(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    original = tifffile.TiffWriter.write
    monkeypatch.setattr(tifffile.TiffWriter, "write", fail_on_second_level)
    with pytest.raises(KeyboardInterrupt):
        write_pyramidal_tiff(tmp_path / "s.svs", small.image, 0.25, flavour="svs")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"flavour": "ndpi"}, {"compression": "lzw"}, {"tile_size": 100}, {"mpp": 0.0}],
)
def test_writer_rejects_bad_arguments(tmp_path, small, kwargs):
    args = {"mpp": 0.5, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        write_pyramidal_tiff(tmp_path / "s.tiff", small.image, **args)


def test_same_seed_same_pixels_other_seed_other_slide():
    a = make_synthetic_slide(5, size_um=SMALL_UM, mpp=1.0)
    b = make_synthetic_slide(5, size_um=SMALL_UM, mpp=1.0)
    c = make_synthetic_slide(6, size_um=SMALL_UM, mpp=1.0)
    np.testing.assert_array_equal(a.image, b.image)
    assert np.abs(a.image.astype(np.int16) - c.image).mean() > 10


def test_positive_adds_lesions_to_the_same_tissue():
    neg = make_synthetic_slide(5, positive=False, size_um=SMALL_UM, mpp=1.0)
    pos = make_synthetic_slide(5, positive=True, size_um=SMALL_UM, mpp=1.0)
    assert (neg.label, pos.label) == (0, 1)
    assert neg.lesions == [] and not neg.lesion_mask.any()
    assert pos.lesions and pos.lesion_mask.any()
    np.testing.assert_array_equal(neg.tissue_mask, pos.tissue_mask)
    outside = ~pos.lesion_mask  # 1 µm masks, image at 1 µm/px
    assert (neg.image[outside] == pos.image[outside]).mean() > 0.95


def test_same_tissue_at_any_mpp(small):
    fine = make_synthetic_slide(3, positive=True, size_um=SMALL_UM, mpp=0.25)
    other = make_synthetic_slide(4, positive=True, size_um=SMALL_UM, mpp=0.5)
    assert fine.image.shape[:2] == (2 * small.image.shape[0], 2 * small.image.shape[1])
    same = np.abs(_bin2(fine.image) - small.image).mean()
    assert same < 2.0
    assert np.abs(other.image.astype(np.float64) - small.image).mean() > 10 * same
    scale = 0.5 / 0.25
    assert fine.lesions == [tuple(round(v * scale) for v in box) for box in small.lesions]


def test_default_slide_geometry_lesions_and_stains(default_positive):
    s = default_positive
    h, w = s.image.shape[:2]
    assert 1200 <= w * s.mpp <= 2000 and 1200 <= h * s.mpp <= 2000
    assert s.tissue_mask.shape == (round(h * s.mpp / s.mask_mpp), round(w * s.mpp / s.mask_mpp))
    # Tissue tiles (>= 25% tissue) of 224 px at 0.5 µm/px, i.e. 112 x 112 mask pixels.
    t = 112
    cells = s.tissue_mask[: h // 2 // t * t, : w // 2 // t * t]
    frac = cells.reshape(cells.shape[0] // t, t, cells.shape[1] // t, t).mean((1, 3))
    les = s.lesion_mask[: cells.shape[0], : cells.shape[1]]
    les = les.reshape(frac.shape[0], t, frac.shape[1], t).mean((1, 3))
    n_tiles = int((frac >= 0.25).sum())
    assert 60 <= n_tiles <= 300
    assert 0 < ((les > 0.1) & (frac >= 0.25)).sum() / n_tiles <= 0.15
    assert 1 <= len(s.lesions) <= 4
    for x, y, bw, bh in s.lesions:
        assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h
        assert 60 <= bw * s.mpp <= 260 and 60 <= bh * s.mpp <= 260  # about 1-2 tiles across
    assert (s.lesion_mask <= s.tissue_mask).all()

    grid = _bin2(s.image)  # back on the 1 µm mask grid
    stroma = s.tissue_mask & ~s.pale_mask & ~s.lesion_mask
    lesion_rgb, stroma_rgb = grid[s.lesion_mask].mean(0), grid[stroma].mean(0)
    assert stroma_rgb.mean() - lesion_rgb.mean() > 40  # lesions are much darker
    assert stroma_rgb[1] - stroma_rgb[2] < 0 < stroma_rgb[0] - stroma_rgb[1]  # pink stroma
    glass = ndimage.distance_transform_edt(~s.tissue_mask) > 20
    assert s.specks
    for box in s.specks:  # dust: small dark dots
        x, y, bw, bh = box
        assert s.image[y : y + bh, x : x + bw].min() < 150
    glass_rgb = grid[glass]
    assert glass_rgb.mean() > 225 and np.ptp(glass_rgb.mean(0)) < 12
    pale_rgb = grid[s.pale_mask].mean(0)
    assert stroma_rgb.mean() < pale_rgb.mean() < glass_rgb.mean()


def test_negatives_differ_in_stain_and_tissue():
    slides = [make_synthetic_slide(seed, mpp=4.0) for seed in range(6)]
    colours = np.array([s.image[s.tissue_mask[2::4, 2::4]].mean(0) for s in slides])
    spread = np.abs(colours[:, None] - colours[None]).max(-1)
    assert np.median(spread[np.triu_indices(6, 1)]) > 8
    fractions = [s.tissue_fraction for s in slides]
    assert max(fractions) - min(fractions) > 0.15


def _mtimes(root):
    return {p.name: p.stat().st_mtime_ns for p in (root / "slides").iterdir()}


def test_dataset_manifest_lesions_and_idempotence(tmp_path):
    mpps = {"tiff": 2.0, "svs": 1.0}
    kwargs = {"seed": 1, "mpps": mpps, "num_workers": 2, "progress": False}
    manifest = make_synthetic_dataset(tmp_path, 6, **kwargs)
    assert manifest == tmp_path / "manifest.csv"
    with manifest.open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["slide_id", "path", "label", "time", "event"]
        rows = list(reader)
    assert len(rows) == 6 and len({r["slide_id"] for r in rows}) == 6
    assert sorted(int(r["label"]) for r in rows) == [0, 0, 0, 1, 1, 1]
    flavours = {r["path"].rsplit(".", 1)[1] for r in rows}
    assert flavours == {"tiff", "svs"}
    for flavour in flavours:  # stratified: each flavour has both labels
        assert {r["label"] for r in rows if r["path"].endswith(flavour)} == {"0", "1"}

    data = json.loads((tmp_path / "lesions.json").read_text())
    assert data["format"] == LESIONS_FORMAT
    lesions = data["lesions"]
    assert set(lesions) == {r["slide_id"] for r in rows if r["label"] == "1"}
    for r in rows:
        assert not r["path"].startswith("/") and r["path"].startswith("slides/")
        path = tmp_path / r["path"]
        flavour = path.suffix[1:]
        assert (
            openslide.OpenSlide.detect_format(path)
            == {"tiff": "generic-tiff", "svs": "aperio"}[flavour]
        )
        with openslide.OpenSlide(path) as slide:
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(mpps[flavour])
            w, h = slide.level_dimensions[0]
        for x, y, bw, bh in lesions.get(r["slide_id"], []):
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
        if r["label"] == "1":
            assert lesions[r["slide_id"]]
        # survival: the time and event drawn from the slide's lesion burden
        index = int(r["slide_id"].split("_")[1])
        n_lesions = len(lesions.get(r["slide_id"], []))
        assert (float(r["time"]), int(r["event"])) == synthetic_survival(1, index, n_lesions)
        assert float(r["time"]) > 0

    before, text = _mtimes(tmp_path), manifest.read_text()
    assert make_synthetic_dataset(tmp_path, 6, **kwargs) == manifest
    assert _mtimes(tmp_path) == before and manifest.read_text() == text

    make_synthetic_dataset(tmp_path, 6, overwrite=True, **kwargs)
    after = _mtimes(tmp_path)
    assert after.keys() == before.keys()
    assert all(after[name] != before[name] for name in before)
    assert manifest.read_text() == text  # same seed, same dataset

    make_synthetic_dataset(tmp_path, 6, **{**kwargs, "seed": 2, "num_workers": 0})
    assert _mtimes(tmp_path) != after


def test_dataset_regenerates_when_a_slide_is_missing(tmp_path):
    kwargs = {"mpps": {"tiff": 4.0}, "flavours": ("tiff",), "num_workers": 0, "progress": False}
    manifest = make_synthetic_dataset(tmp_path, 2, **kwargs)
    (tmp_path / "slides" / "syn_001.tiff").unlink()
    assert make_synthetic_dataset(tmp_path, 2, **kwargs) == manifest
    assert (tmp_path / "slides" / "syn_001.tiff").exists()


def test_survival_time_shortens_with_lesion_burden_and_some_are_censored():
    draws = {n: [synthetic_survival(0, i, n) for i in range(300)] for n in (0, 2, 4)}
    medians = [float(np.median([t for t, _ in draws[n]])) for n in (0, 2, 4)]
    assert medians[0] > 1.5 * medians[1] > 1.5 * medians[2] > 0
    events = [float(np.mean([e for _, e in draws[n]])) for n in (0, 2, 4)]
    assert 0.3 < events[0] < 0.9 and events[0] < events[2]  # censoring at random follow-up
