"""Bring your own tiling: CLAM/TRIDENT .h5 and x,y CSV coordinates on a real pyramidal TIFF.

The .h5 files are written by copies of CLAM's and TRIDENT's own writers (below), so a change in
how we read them is tested against the layout those tools produce, not against our idea of it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import h5py
import numpy as np
import openslide
import pytest
from slide_files import grid_image, write_grid_slide, write_tiff_with_corrupt_tiles

from lightning_wsi.data.dataset import SlideDataset, SlideEntry
from lightning_wsi.data.external_tiling import read_external_tiling, write_clam_h5
from lightning_wsi.data.slide import SlideError
from lightning_wsi.data.tiling import tile_slide

# 8 x 5 cells of 128 px at 0.5 µm/px: a 1024 x 640 slide with pyramid levels 0 and 1 (ds 2).
CELL, N_X, N_Y, MPP = 128, 8, 5, 0.5
TISSUE = [(c, r) for c in range(1, 4) for r in range(1, 4)] + [(6, 2), (6, 3)]
# CLAM's process_contour order: np.meshgrid(x_range, y_range, indexing="ij"), x outer.
CLAM_COORDS = np.array([(x, y) for x in (128, 384, 768) for y in (128, 256)], dtype=np.int64)
ROW_MAJOR = CLAM_COORDS[np.lexsort((CLAM_COORDS[:, 0], CLAM_COORDS[:, 1]))]


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slide") / "case-1.tiff"
    return write_grid_slide(path, TISSUE, N_X, N_Y, CELL, mpp=MPP)


def clam_save_hdf5(output_path, asset_dict, attr_dict=None, mode="a"):
    """CLAM's ``wsi_core/wsi_utils.py`` ``save_hdf5`` (mahmoodlab/CLAM 53e2409), verbatim."""
    file = h5py.File(output_path, mode)
    for key, val in asset_dict.items():
        data_shape = val.shape
        if key not in file:
            data_type = val.dtype
            chunk_shape = (1,) + data_shape[1:]
            maxshape = (None,) + data_shape[1:]
            dset = file.create_dataset(
                key, shape=data_shape, maxshape=maxshape, chunks=chunk_shape, dtype=data_type
            )
            dset[:] = val
            if attr_dict is not None:
                if key in attr_dict.keys():
                    for attr_key, attr_val in attr_dict[key].items():
                        dset.attrs[attr_key] = attr_val
        else:
            dset = file[key]
            dset.resize(len(dset) + data_shape[0], axis=0)
            dset[-data_shape[0] :] = val
    file.close()
    return output_path


def write_clam(path: Path, coords, patch_size=128, patch_level=0, downsample=True, **extra):
    """A file as CLAM's ``WholeSlideImage.process_contours`` writes it (attributes of
    ``process_contour``; ``level_downsamples`` entries are ``(ds_x, ds_y)`` tuples)."""
    ds = float(2**patch_level)
    level_dim = (N_X * CELL // 2**patch_level, N_Y * CELL // 2**patch_level)
    attr = {
        "patch_size": patch_size,
        "patch_level": patch_level,
        "downsample": (ds, ds),
        "downsampled_level_dim": tuple(np.array(level_dim)),
        "level_dim": level_dim,
        "name": "case-1",
        "save_path": str(path.parent),
    }
    if not downsample:
        del attr["downsample"]
    attr.update(extra)
    return Path(clam_save_hdf5(path, {"coords": np.asarray(coords)}, {"coords": attr}, mode="w"))


def trident_save_h5(save_path, assets, attributes=None, mode="w"):
    """TRIDENT's ``trident/IO.py`` ``save_h5`` (mahmoodlab/TRIDENT a91fa84), verbatim but for
    its bare ``except``."""
    with h5py.File(save_path, mode) as file:
        for key, val in assets.items():
            data_shape = val.shape
            if key not in file:
                data_type = val.dtype
                chunk_shape = (1,) + data_shape[1:]
                maxshape = (None,) + data_shape[1:]
                dset = file.create_dataset(
                    key, shape=data_shape, maxshape=maxshape, chunks=chunk_shape, dtype=data_type
                )
                dset[:] = val
                if attributes is not None:
                    if key in attributes.keys():
                        for attr_key, attr_val in attributes[key].items():
                            if isinstance(attr_val, dict):
                                attr_val = json.dumps(attr_val)
                            elif attr_val is None:
                                attr_val = "None"
                            dset.attrs[attr_key] = attr_val
            else:
                dset = file[key]
                dset.resize(len(dset) + data_shape[0], axis=0)
                dset[-data_shape[0] :] = val


def write_trident(path: Path, coords, patch_size=64, src_mag=20, target_mag=10, **override):
    """A file as TRIDENT's ``trident/IO.py`` ``coords_to_h5`` writes it."""
    coords_array = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    attributes = {
        "patch_size": patch_size,
        "patch_size_level0": patch_size * src_mag // target_mag,
        "level0_magnification": src_mag,
        "target_magnification": target_mag,
        "overlap": 0,
        "name": "case-1",
        "savetodir": str(path.parent),
        "level0_width": N_X * CELL,
        "level0_height": N_Y * CELL,
    }
    attributes.update(override)
    trident_save_h5(path, assets={"coords": coords_array}, attributes={"coords": attributes})
    return path


def dataset_tiles(slide: Path, tiles) -> np.ndarray:
    """All tiles of ``tiles`` read through SlideDataset: ``[n, H, W, 3]`` uint8."""
    dataset = SlideDataset([SlideEntry("case-1", str(slide), 0, tiles)], k=None)
    item = dataset[0]
    dataset.close()
    assert item["coords"].numpy().tolist() == tiles.coords.tolist()
    return item["tiles"].permute(0, 2, 3, 1).numpy()


def openslide_tiles(slide: Path, coords, level: int, size: int) -> np.ndarray:
    with openslide.OpenSlide(str(slide)) as osr:
        return np.stack(
            [
                np.asarray(osr.read_region((int(x), int(y)), level, (size, size)))[..., :3]
                for x, y in coords
            ]
        )


def test_clam_tiles_are_the_squares_clam_reads(slide, tmp_path):
    """CLAM's Whole_Slide_Bag_FP reads read_region(coord, patch_level, (patch_size,) * 2)."""
    coords_file = write_clam(tmp_path / "case-1.h5", CLAM_COORDS)
    tiles = read_external_tiling(coords_file, slide, mpp=0.5, tile_size=128, slide_id="case-1")
    assert tiles.coords.dtype == np.int64
    assert tiles.coords.tolist() == ROW_MAJOR.tolist()
    assert (tiles.tile_size_level0, tiles.tile_size, tiles.mpp) == (128, 128, 0.5)
    assert tiles.dimensions == (1024, 640) and tiles.slide_mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(
        dataset_tiles(slide, tiles), openslide_tiles(slide, ROW_MAJOR, level=0, size=128)
    )


@pytest.mark.parametrize(
    ("patch_size", "patch_level", "downsample", "extra"),
    [
        (64, 1, True, {}),  # 64 px at level 1 (downsample 2): 128 level-0 px
        (64, 1, False, {}),  # no `downsample` attribute: the slide's level 1 downsample
        (32, 1, True, {"custom_downsample": 2}),  # legacy: 32 * 2 * 2 (TRIDENT's reading)
    ],
)
def test_clam_tile_size_from_level_and_downsample(
    slide, tmp_path, patch_size, patch_level, downsample, extra
):
    coords_file = write_clam(
        tmp_path / "c.h5", CLAM_COORDS, patch_size, patch_level, downsample, **extra
    )
    tiles = read_external_tiling(coords_file, slide, mpp=0.5, tile_size=128)
    assert tiles.tile_size_level0 == 128
    assert tiles.coords.tolist() == ROW_MAJOR.tolist()


def test_trident_tiles_are_the_squares_trident_reads(slide, tmp_path):
    """64 px at 10x on a 20x slide: TRIDENT's WSIPatcher reads 64 px at level 1 (ds 2)."""
    coords = [(0, 0), (128, 0), (256, 128), (384, 512)]
    coords_file = write_trident(tmp_path / "case-1_patches.h5", coords)
    tiles = read_external_tiling(coords_file, slide, mpp=1.0, tile_size=64)
    assert tiles.coords.tolist() == [list(c) for c in coords]
    assert (tiles.tile_size_level0, tiles.tile_size) == (128, 64)
    np.testing.assert_array_equal(
        dataset_tiles(slide, tiles), openslide_tiles(slide, coords, level=1, size=64)
    )


def test_csv_of_level0_corners(slide, tmp_path):
    """Header `x,y` (extra columns, a BOM, CRLF and blank lines as spreadsheets write them)."""
    coords_file = tmp_path / "case-1.csv"
    coords_file.write_bytes(b"\xef\xbb\xbfid,x,y\r\n1,200,100\r\n\r\n2,0,0\r\n3,896,512\r\n")
    tiles = read_external_tiling(coords_file, slide, mpp=0.5, tile_size=128)
    assert tiles.coords.tolist() == [[0, 0], [200, 100], [896, 512]]
    assert tiles.tile_size_level0 == 128


def test_duplicates_are_removed_and_reported(slide, tmp_path):
    """Overlapping contours' bounding boxes give CLAM the same corner twice."""
    coords = np.concatenate([CLAM_COORDS, CLAM_COORDS[:2]])
    coords_file = write_clam(tmp_path / "case-1.h5", coords)
    with pytest.warns(UserWarning, match=r"lists 2 duplicate tile corner\(s\).*\(6 tiles\)"):
        tiles = read_external_tiling(coords_file, slide, mpp=0.5, tile_size=128)
    assert tiles.coords.tolist() == ROW_MAJOR.tolist()


@pytest.mark.parametrize(("size0", "accepted"), [(129, True), (127, True), (130, False)])
def test_patch_size_tolerance_is_one_percent(slide, tmp_path, size0, accepted):
    coords_file = write_trident(tmp_path / "t.h5", [(0, 0)], patch_size_level0=size0)
    if accepted:
        tiles = read_external_tiling(coords_file, slide, mpp=0.5, tile_size=128)
        assert tiles.tile_size_level0 == 128
    else:
        with pytest.raises(SlideError, match="has tiles of 130 level-0 px"):
            read_external_tiling(coords_file, slide, mpp=0.5, tile_size=128)


def test_patch_size_mismatch_is_refused_then_allowed(slide, tmp_path):
    """A TRIDENT file of 128 px at 10x (256 level-0 px) in a run of 128 px at 20x (128)."""
    coords = [(0, 0), (512, 256)]
    coords_file = write_trident(tmp_path / "case-1_patches.h5", coords, patch_size=128)
    with pytest.raises(SlideError) as error:
        read_external_tiling(coords_file, slide, mpp=0.5, tile_size=128, slide_id="case-1")
    message = str(error.value)
    assert "\n" not in message
    assert f"slide 'case-1': coordinates file {coords_file} has tiles of 256 level-0 px" in message
    assert "(TRIDENT patch_size_level0 = 256)" in message
    assert "this run reads 128 level-0 px (128 px at 0.5 µm/px on a 0.5 µm/px slide)" in message
    assert "set tile_size=256 (at mpp=0.5) or mpp=1 (at tile_size=128)" in message
    assert "allow_patch_size_mismatch=True" in message

    tiles = read_external_tiling(
        coords_file, slide, mpp=0.5, tile_size=128, allow_patch_size_mismatch=True
    )
    assert tiles.coords.tolist() == [list(c) for c in coords]
    assert tiles.tile_size_level0 == 128
    np.testing.assert_array_equal(
        dataset_tiles(slide, tiles), openslide_tiles(slide, coords, level=0, size=128)
    )


def _truncated_h5(path: Path) -> Path:
    write_clam(path, CLAM_COORDS)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _h5_with(path: Path, name: str, data) -> Path:
    with h5py.File(path, "w") as h5:
        h5.create_dataset(name, data=data)
    return path


BAD_FILES = {
    "missing": (lambda p: p, "does not exist; correct the manifest's `coords` column"),
    "empty file": (lambda p: _bytes(p, b""), "is empty (0 bytes); copy it again"),
    "features file": (
        lambda p: _h5_with(p, "features", np.zeros((3, 8), np.float32)),
        "has no `coords` dataset (it holds features); give the coordinates file",
    ),
    "three columns": (
        lambda p: _h5_with(p, "coords", np.zeros((3, 3), np.int64)),
        "has `coords` of shape (3, 3), not [n, 2]; coordinates are [n, 2] whole",
    ),
    "fractional coords": (
        lambda p: _h5_with(p, "coords", np.full((3, 2), 0.5)),
        "has `coords` of dtype float64, not integers",
    ),
    "no coordinates": (
        lambda p: write_trident(p, []),
        re.compile(r"lists no tile \(0 coordinates; .*\); remove the slide from the manifest"),
    ),
    "starts outside the slide": (  # (960, 0) overhangs the edge, as CLAM pads: accepted
        lambda p: write_clam(p, [(0, 0), (960, 0), (1024, 0), (1000, 640)]),
        "has 2 of 4 tiles outside the 1024x640 px slide (first: x=1024, y=0, a tile of 128 "
        "level-0 px); coordinates are level-0 top-left x, y: check that the file was made",
    ),
    "negative": (
        lambda p: write_clam(p, [(-1, 0)]),
        "has 1 of 1 tiles outside the 1024x640 px slide (first: x=-1, y=0",
    ),
    "truncated": (
        _truncated_h5,
        re.compile(r"cannot be read \(OSError: .*truncated file.*\); .*copy it again or re-run"),
    ),
    "not hdf5": (
        lambda p: _bytes(p, b"\x00garbage" * 8),
        "is not an HDF5 file (no HDF5 signature",
    ),
    "None attribute": (
        lambda p: write_trident(p, [(0, 0)], patch_size_level0=None),
        "has the attribute `patch_size_level0` = 'None' on `coords`, not a number",
    ),
    "level beyond the slide": (
        lambda p: write_clam(p, [(0, 0)], patch_size=4, patch_level=5, downsample=False),
        "reads tiles at patch_level 5, but the slide has 2 pyramid levels",
    ),
}
BAD_CSVS = {
    "csv without header": ("0,0\n128,0\n", "is neither HDF5 nor a CSV with columns x, y"),
    "csv fraction": ("x,y\n0,0\n12.5,0\n", "row 3 has x='12.5', y='0', not whole numbers"),
    "binary csv": (b"\xff\xfe\x00x", "is neither HDF5 nor UTF-8 text"),
}


@pytest.mark.parametrize("case", list(BAD_FILES) + list(BAD_CSVS))
def test_bad_coordinate_files_name_slide_file_and_fix(slide, tmp_path, case):
    if case in BAD_FILES:
        make, expected = BAD_FILES[case]
        coords_file = make(tmp_path / "case-1.h5")
    else:
        content, expected = BAD_CSVS[case]
        coords_file = tmp_path / "case-1.csv"
        if isinstance(content, bytes):
            coords_file.write_bytes(content)
        else:
            coords_file.write_text(content)
    with pytest.raises(SlideError) as error:
        read_external_tiling(coords_file, slide, mpp=0.5, tile_size=128, slide_id="case-1")
    message = str(error.value)
    assert "\n" not in message
    prefix = f"slide 'case-1': coordinates file {coords_file} "
    assert message.startswith(prefix)
    rest = message[len(prefix) :]
    if isinstance(expected, re.Pattern):
        assert expected.match(rest), message
    else:
        assert rest.startswith(expected), message


def test_probe_reads_a_tile_so_corrupt_levels_fail_here(tmp_path):
    """The middle tile is read at the training resolution, as tile_slide's probe does."""
    image = grid_image([(0, 0), (1, 1)], 2, 2, 256)
    path = write_tiff_with_corrupt_tiles(tmp_path / "bad.tiff", image, 0.5, corrupt=[(0, 0)])
    coords_file = tmp_path / "bad.csv"
    coords_file.write_text("x,y\n0,0\n")
    with pytest.raises(SlideError, match="reading a tile at the training resolution"):
        read_external_tiling(coords_file, path, mpp=0.5, tile_size=128)


def test_write_clam_h5_round_trip(slide, tmp_path):
    """Our tiling in CLAM's layout: CLAM's attributes, and read back to the same tiles."""
    tiles = tile_slide(slide, 0.5, 128, tissue_options={"min_tissue_area_um2": 1000})
    assert sorted(map(tuple, tiles.coords // CELL)) == sorted(TISSUE)
    path = write_clam_h5(tmp_path / "case-1.h5", tiles, slide)
    with h5py.File(path, "r") as h5:
        dset = h5["coords"]
        assert (dset.dtype, dset.shape, dset.maxshape) == (np.int64, (11, 2), (None, 2))
        attrs = dict(dset.attrs)
    assert set(attrs) == {
        "patch_size",
        "patch_level",
        "downsample",
        "downsampled_level_dim",
        "level_dim",
        "name",
        "save_path",
    }
    assert (attrs["patch_size"], attrs["patch_level"], attrs["name"]) == (128, 0, "case-1")
    assert attrs["downsample"].tolist() == [1.0, 1.0]
    assert attrs["level_dim"].tolist() == attrs["downsampled_level_dim"].tolist() == [1024, 640]
    assert attrs["save_path"] == str(tmp_path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    back = read_external_tiling(path, slide, mpp=0.5, tile_size=128)
    assert back.coords.tolist() == tiles.coords.tolist()
    assert back.tile_size_level0 == tiles.tile_size_level0


def test_write_clam_h5_refuses_an_empty_tiling(slide, tmp_path):
    tiles = tile_slide(slide, 0.5, 128, tissue_options={"min_tissue_area_um2": 1000})
    empty = type(tiles)(**{**tiles.__dict__, "coords": np.zeros((0, 2), np.int64)})
    with pytest.raises(ValueError, match="'case-1.tiff' has no tile to write"):
        write_clam_h5(tmp_path / "case-1.h5", empty, slide)
    assert list(tmp_path.iterdir()) == []
