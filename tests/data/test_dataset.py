"""SlideDataset: one slide per item, this rank's shard only, identical inputs at any world size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from slide_files import write_grid_slide
from torch.utils.data import DataLoader

from lightning_wsi.data.augment import TileAugment, color_jitter
from lightning_wsi.data.dataset import SlideDataset, SlideEntry
from lightning_wsi.data.sampling import SlideSampler
from lightning_wsi.data.slide import Slide
from lightning_wsi.data.tiling import tile_slide
from lightning_wsi.data.transfer import normalize_tiles

TILE = dict(mpp=2.0, tile_size=56)  # 112 µm tiles read small, so tests stay fast


@pytest.fixture(scope="module")
def entries(tmp_path_factory):
    """Three slides with 40, 12 and 5 tissue tiles (different tissue, different texture)."""
    shapes = [(8, 5), (4, 3), (5, 1)]
    out = []
    for i, (w, h) in enumerate(shapes):
        cells = [(c, r) for c in range(w) for r in range(h)]
        cells += [(c, r) for c in range(w - 2, w) for r in range(h, h + 1)] if h == 1 else []
        path = tmp_path_factory.mktemp("slides") / f"s{i}.tiff"
        write_grid_slide(path, cells, w, max(h, 2), 224, mpp=0.5, seed=i)
        tiles = tile_slide(path, **TILE)
        out.append(SlideEntry(f"slide-{i}", str(path), i % 2, tiles))
    return out


def _dataset(entries, rank=0, world=1, k=16, augment=True):
    return SlideDataset(
        entries,
        k=k,
        seed=11,
        shard_rank=rank,
        shard_count=world,
        augment=TileAugment(color_jitter=0.2) if augment else None,
    )


def test_item_format(entries):
    item = _dataset(entries)[(0, 0)]
    assert item["tiles"].shape == (16, 3, 56, 56) and item["tiles"].dtype == torch.uint8
    assert item["color_jitter"].shape == (16, 4)
    assert item["coords"].shape == (16, 2) and item["coords"].dtype == torch.int64
    assert item["target"].shape == () and item["target"].dtype == torch.int64
    assert item["slide_id"] == "slide-0" and item["num_tiles"] == 16
    assert item["tile_index"].dtype == torch.int64
    coords = entries[0].tiles.coords[item["tile_index"].numpy()]
    np.testing.assert_array_equal(item["coords"].numpy(), coords)


def test_pixels_match_openslide_and_normalise_on_the_device(entries):
    item = SlideDataset(entries, k=None)[1]
    entry = entries[1]
    with Slide(entry.path) as slide:
        x, y = entry.tiles.coords[3]
        raw = slide.read_tile(x, y, entry.tiles.tile_size_level0, 56)
    assert torch.equal(item["tiles"][3], torch.from_numpy(raw).permute(2, 0, 1))
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    tiles = normalize_tiles(item, mean, std)["tiles"]
    expected = (
        torch.from_numpy(raw).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]
    )
    expected = expected / torch.tensor(std)[:, None, None]
    assert tiles.dtype == torch.float32
    torch.testing.assert_close(tiles[3], expected, rtol=0, atol=1e-6)


def test_colour_jitter_factors_are_applied_per_tile(entries):
    item = _dataset(entries)[(0, 0)]
    plain = normalize_tiles({"tiles": item["tiles"]}, (0, 0, 0), (1, 1, 1))["tiles"]
    jittered = normalize_tiles(item, (0, 0, 0), (1, 1, 1))["tiles"]
    assert "color_jitter" not in normalize_tiles(item, (0, 0, 0), (1, 1, 1))
    torch.testing.assert_close(jittered, color_jitter(plain, item["color_jitter"]))
    assert not torch.equal(jittered, plain)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [16, 7])
def test_shards_concatenate_to_the_single_process_sample(entries, world_size, k):
    single = _dataset(entries, k=k)
    shards = [_dataset(entries, rank=r, world=world_size, k=k) for r in range(world_size)]
    for epoch in (0, 1):
        for index in range(len(entries)):
            whole = single[(index, epoch)]
            parts = [s[(index, epoch)] for s in shards]
            sizes = [len(p["tiles"]) for p in parts]
            assert max(sizes) - min(sizes) <= 1
            for key in ("tiles", "coords", "tile_index", "color_jitter"):
                torch.testing.assert_close(
                    torch.cat([p[key] for p in parts]), whole[key], rtol=0, atol=0
                )
            assert all(p["num_tiles"] == whole["num_tiles"] for p in parts)
            assert whole["num_tiles"] == min(k, len(entries[index].tiles))


def test_epochs_differ_and_runs_repeat(entries):
    a, b = _dataset(entries), _dataset(entries)
    assert torch.equal(a[(0, 0)]["tiles"], b[(0, 0)]["tiles"])
    assert not torch.equal(a[(0, 0)]["tile_index"], a[(0, 1)]["tile_index"])


def test_augmentation_changes_tiles_but_not_their_place(entries):
    plain, augmented = _dataset(entries, augment=False)[(0, 2)], _dataset(entries)[(0, 2)]
    assert torch.equal(plain["coords"], augmented["coords"])
    assert not torch.equal(plain["tiles"], augmented["tiles"])


def test_rank_reads_only_its_own_shard(entries, monkeypatch):
    reads = []
    original = Slide.read_tile

    def spy(self, x, y, size0, tile_size):
        reads.append((x, y))
        return original(self, x, y, size0, tile_size)

    monkeypatch.setattr(Slide, "read_tile", spy)
    item = _dataset(entries, rank=1, world=3, k=16)[(0, 0)]
    assert len(reads) == len(item["coords"]) == 5
    assert reads == [tuple(c) for c in item["coords"].tolist()]


def test_loader_workers_give_identical_batches(entries):
    def run(workers):
        sampler = SlideSampler(len(entries), shuffle=True, seed=2)
        sampler.set_epoch(1)
        loader = DataLoader(
            _dataset(entries), batch_size=None, sampler=sampler, num_workers=workers
        )
        return list(loader)

    serial, parallel = run(0), run(2)
    assert [b["slide_id"] for b in serial] == [b["slide_id"] for b in parallel]
    for a, b in zip(serial, parallel, strict=True):
        assert torch.equal(a["tiles"], b["tiles"]) and torch.equal(a["coords"], b["coords"])


def test_eval_takes_all_tiles_in_fixed_order(entries):
    dataset = SlideDataset(entries, k=None)
    item = dataset[0]
    np.testing.assert_array_equal(item["coords"].numpy(), entries[0].tiles.coords)
    capped = SlideDataset(entries, k=None, eval_k=10)[0]
    assert len(capped["tiles"]) == 10
    assert torch.equal(capped["tiles"], SlideDataset(entries, k=None, eval_k=10)[0]["tiles"])
