"""Evaluation in parts (``eval_part_size``): a slide's tiles stream through the loader in parts
and are collected per slide, with the same predictions, metrics and problem records as one item
per slide."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from bad_tile_slides import write_part_slides

from lightning_wsi import SlideDataModule, SlideModule
from lightning_wsi.data.dataset import BagEntry, SlideDataset
from lightning_wsi.data.parts import SlideParts
from lightning_wsi.data.sampling import SlideSampler, num_parts, part_bounds

# Tiles per part: the 64-tile slides of write_part_slides make 3 parts (24, 24, 16), "small"
# one; their bad tiles (positions 0 and 24) lie in parts 0 and 1.
PART = 24
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_part_slides(tmp_path_factory.mktemp("eval_parts"))


def datamodule(manifest: Path, part_size: int | None) -> SlideDataModule:
    # max_bad_tile_fraction 0.02: 1 of a 64-tile slide's tiles may fail (two_bad is dropped
    # only by the sum over its parts, each of which has 1).
    return SlideDataModule(
        manifest, k=8, tile_size=128, eval_part_size=part_size, max_bad_tile_fraction=0.02,
        progress=False, tiling_workers=0,
    )  # fmt: skip


def module() -> SlideModule:
    torch.manual_seed(0)
    return SlideModule(
        "test_resnet", "gma", "binary", aggregator_kwargs={"hidden_dim": 16, "attention_dim": 8}
    )


# ------------------------------------------------------------------------- sampling


def test_parts_cover_the_sample_in_order() -> None:
    assert [num_parts(n, 24) for n in (0, 1, 24, 25, 64)] == [1, 1, 1, 2, 3]
    assert num_parts(30_000, None) == 1
    bounds = [part_bounds(64, p, 24) for p in range(3)]
    assert bounds == [(0, 24), (24, 48), (48, 64)]
    with pytest.raises(ValueError, match=r"part must lie in \[0, 3\) for 64 tiles, got 3"):
        part_bounds(64, 3, 24)


def test_sampler_keeps_a_slides_parts_consecutive_and_equal_within_a_group() -> None:
    parts = [3, 1, 2, 1, 2]

    def keys(rank: int, group_size: int | None, dropped: dict | None = None) -> list[tuple]:
        sampler = SlideSampler(
            5, shuffle=False, num_replicas=4, rank=rank, group_size=group_size, parts=parts,
            dropped_source=(lambda: dropped) if dropped else None,
        )  # fmt: skip
        assert len(sampler) == len(list(sampler))  # the evaluation loop stops at len
        return list(sampler)

    one_group = keys(0, None)
    assert one_group == [
        (0, 0, None, 0), (0, 0, None, 1), (0, 0, None, 2), (1, 0, None, 0), (2, 0, None, 0),
        (2, 0, None, 1), (3, 0, None, 0), (4, 0, None, 0), (4, 0, None, 1),
    ]  # fmt: skip
    assert all(keys(r, None) == one_group for r in range(4))
    # Two groups of two ranks: group 0 the slides 0, 2, 4, group 1 the slides 1, 3, as without
    # parts (evaluation is not padded); both ranks of a group the same sequence.
    assert keys(0, 2) == keys(1, 2) == [k for k in one_group if k[0] in (0, 2, 4)]
    assert keys(2, 2) == keys(3, 2) == [(1, 0, None, 0), (3, 0, None, 0)]
    # A slide dropped earlier in the run is one item, which the dataset answers unread.
    assert keys(0, None, {0: "gone"})[:2] == [(0, 0, "gone", 0), (1, 0, None, 0)]
    with pytest.raises(ValueError, match="parts must give a count >= 1 for each of the 5"):
        SlideSampler(5, shuffle=False, parts=[1, 2])


# ------------------------------------------------------------------------- dataset


def _concat(dataset: SlideDataset, index: int, ranks: int = 1) -> dict[str, np.ndarray]:
    """Every part's shards, concatenated in part then rank order."""
    keys = ("tiles", "coords", "tile_index", "slide_index")
    pieces: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for part in range(dataset.num_parts(index)):
        for rank in range(ranks):
            dataset.shard_rank, dataset.shard_count = rank, ranks
            item = dataset[(index, 0, None, part)]
            assert (item["part"], item["parts"]) == (part, dataset.num_parts(index))
            assert item["num_tiles"] == len(dataset.sample_indices(index, 0))  # the slide's
            for key in keys:
                if key in item:
                    pieces[key].append(item[key].numpy())
    return {k: np.concatenate(v) for k, v in pieces.items() if v}


def test_parts_in_order_are_the_one_item_slide_also_for_a_patient_bag(manifest: Path) -> None:
    dm = datamodule(manifest, PART)
    dm.setup("validate")
    intact, small = dm.splits["val"][:2]
    assert len(small.tiles) < PART < len(intact.tiles) == 64
    bag = BagEntry("patient", 0, (small, intact))  # tile positions over the union
    whole = SlideDataset([intact, bag], k=None)
    parts = SlideDataset([intact, bag], k=None, part_size=PART)
    assert [parts.num_parts(i) for i in range(2)] == [3, 4]  # 64 and 80 tiles
    for index in range(2):
        one = whole[index]
        for ranks in (1, 2):
            got = _concat(parts, index, ranks)
            assert np.array_equal(got["tiles"], one["tiles"].numpy())
            assert np.array_equal(got["coords"], one["coords"].numpy())
            assert np.array_equal(got["tile_index"], one["tile_index"].numpy())
            if index == 1:
                assert np.array_equal(got["slide_index"], one["slide_index"].numpy())
    with pytest.raises(ValueError, match="eval_part_size must be an integer >= 1"):
        SlideDataset([intact], k=None, part_size=0)
    with pytest.raises(ValueError, match="eval_part_size applies to evaluation"):
        SlideDataset([intact], k=8, part_size=PART)


def test_training_parts_of_a_rank_are_its_shard_in_order(manifest: Path) -> None:
    # train_part_size: part p is the p-th run of the rank's own shard of the K sample; every
    # rank of the group has the same number of parts (its largest shard's).
    dm = datamodule(manifest, PART)
    dm.setup("validate")
    intact, small = dm.splits["val"][:2]
    bag = BagEntry("patient", 0, (small, intact))
    for k in (50, None):  # a random sample of 50 (epoch 1), and every tile in a fixed order
        whole = SlideDataset([intact, bag], k=k)
        for ranks in (1, 2, 3):
            parts = SlideDataset([intact, bag], k=k, train_part_size=7, shard_count=ranks)
            for index in range(2):
                n = len(whole.sample_indices(index, 1))
                largest = math.ceil(n / ranks)  # the first shard's
                assert parts.num_parts(index) == math.ceil(largest / 7)
                for rank in range(ranks):
                    whole.shard_rank, whole.shard_count = rank, ranks
                    parts.shard_rank = rank
                    shard = whole[(index, 1)]
                    items = [parts[(index, 1, None, p)] for p in range(parts.num_parts(index))]
                    assert all(i["num_tiles"] == n for i in items)
                    for key in ("tiles", "coords", "tile_index"):
                        got = torch.cat([i[key] for i in items])
                        assert torch.equal(got, shard[key]), (k, ranks, index, rank, key)
    with pytest.raises(ValueError, match="train_part_size must be an integer >= 1"):
        SlideDataset([intact], k=8, train_part_size=0)
    with pytest.raises(ValueError, match="evaluation parts .* or training parts"):
        SlideDataset([intact], k=None, part_size=4, train_part_size=4)
    with pytest.raises(IndexError, match=r"'intact' has 10 parts \(train_part_size=7\)"):
        SlideDataset([intact], k=None, train_part_size=7)[(0, 0, None, 10)]


def test_a_part_reports_its_own_bad_tiles_and_leaves_the_verdict_to_the_slide(
    manifest: Path,
) -> None:
    dm = datamodule(manifest, PART)
    dm.setup("validate")
    two_bad = dm.splits["val"][3]
    dataset = SlideDataset([two_bad], k=None, part_size=PART, max_bad_tile_fraction=0.02)
    items = [dataset[(0, 0, None, p)] for p in range(3)]
    assert [len(i["tile_problems"]) for i in items] == [1, 1, 0]
    assert [(p["x"], p["y"]) for i in items for p in i["tile_problems"]] == [(0, 0), (0, 384)]
    assert all(i["slide_problem"] is None and i["max_bad_tiles"] == 1 for i in items)
    collector = SlideParts()
    for item in items:
        collector.begin(item)
        collector.add_problems(len(item["tile_problems"]), item["slide_problem"])
        collector.add(len(item["tiles"]))
    slide = collector.finish()
    assert slide.verdict == "2 of 64 sampled tiles failed to read, more than the 1 that " + (
        "max_bad_tile_fraction tolerates"
    )


# ------------------------------------------------------------------------- collector


def _part(part: int, parts: int, slide_id: str = "s") -> dict:
    return {"slide_id": slide_id, "part": part, "parts": parts, "num_tiles": 4, "max_bad_tiles": 0}


def test_collector_merges_parts_and_refuses_them_out_of_order() -> None:
    collector = SlideParts()
    features = torch.arange(8.0).view(4, 2)
    for part in range(2):
        collector.begin(_part(part, 2))
        rows = slice(2 * part, 2 * part + 2)
        collector.add(2, features[rows], torch.full((2, 2), part), None)
    assert collector.last
    slide = collector.finish()
    assert slide.verdict is None and slide.rows == 4
    assert torch.equal(slide.features, features)
    assert slide.coords[:, 0].tolist() == [0, 0, 1, 1]
    collector.begin(_part(0, 3, "a"))
    with pytest.raises(ValueError, match=r"slide 'a': evaluation part 2 of 3 arrived after part 0"):
        collector.begin(_part(2, 3, "a"))
    collector.begin(_part(0, 3, "a"))
    with pytest.raises(ValueError, match=r"slide 'b': evaluation part 1 of 3 arrived after part 0 "
                                         r"of 3 of slide 'a'.*eval_part_size=None"):  # fmt: skip
        collector.begin(_part(1, 3, "b"))
    collector.begin(_part(0, 2, "c"))  # part 0 starts afresh (a loop stopped mid-slide)
    with pytest.raises(RuntimeError, match="finish\\(\\) at part 0 of 2"):
        collector.finish()
    collector.begin(_part(1, 2, "c"))
    assert collector.finish().verdict == "no tile of the slide could be read"


# ------------------------------------------------------------------------- one process


def _predict(manifest: Path, part_size: int | None) -> tuple[list[dict], SlideDataModule, dict]:
    dm = datamodule(manifest, part_size)
    trainer = L.Trainer(accelerator="cpu", devices=1, **QUIET)
    model = module()
    metrics = trainer.validate(model, datamodule=dm, verbose=False)[0]
    return trainer.predict(model, datamodule=dm), dm, metrics


def test_one_process_parts_predict_and_validate_as_one_item(manifest: Path) -> None:
    parts, dm, metrics = _predict(manifest, PART)
    whole, dm_whole, metrics_whole = _predict(manifest, None)
    assert [p["slide_id"] for p in parts] == ["intact", "small", "one_bad", "two_bad"]
    assert [p["slide_id"] for p in whole] == [p["slide_id"] for p in parts]
    assert parts[3]["status"] == "dropped" and whole[3]["status"] == "dropped"
    assert parts[3]["reason"] == whole[3]["reason"]
    assert "2 of 64 sampled tiles failed to read, more than the 1" in parts[3]["reason"]
    for got, want in zip(parts[:3], whole[:3], strict=True):
        # The aggregator sees the same features in the same order; the encoder ran on batches
        # of 24 rather than 64 tiles, which float32 convolutions may round differently.
        assert torch.equal(got["coords"], want["coords"])
        assert (got["logits"] - want["logits"]).abs().max() <= 1e-5
        assert (got["attention"] - want["attention"]).abs().max() <= 1e-6
    assert len(parts[2]["coords"]) == 63  # one_bad: its one bad tile left out, slide kept
    for key in ("val/loss", "val/auroc"):
        assert metrics[key] == pytest.approx(metrics_whole[key], abs=1e-6)
    # Recorded once per run (validate, then predict: counts 2; two_bad, dropped in validate,
    # is not read again), the same as with one item.
    records = {(p.kind, p.slide_id, p.x, p.y): p.count for p in dm.problems.records}
    assert records == {
        ("tile left out", "one_bad", 0, 0): 2,
        ("tile left out", "two_bad", 0, 0): 1,
        ("tile left out", "two_bad", 0, 384): 1,
        ("slide dropped", "two_bad", None, None): 2,
    }
    assert records == {(p.kind, p.slide_id, p.x, p.y): p.count for p in dm_whole.problems.records}
