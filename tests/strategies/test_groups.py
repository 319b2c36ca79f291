"""Groups of ranks per slide: G = N / S groups train G slides per step, the gradient their mean.

Real multi-process Trainers on CPU with gloo (``groups_harness.py``, one set of forked processes
for all world sizes): 4 ranks in 2 groups of 2, 2 ranks in 2 groups of 1 (plain slide data
parallel through this path) and 3 ranks in one group of 3. The references are one process on
the same permutation of the slides; with 2 groups it accumulates over 2 batches, so each
accumulation window holds the two slides of one group step. Bounds as in
``test_equivalence.py``: normalised L1 of parameters and losses <= 1e-5, of updates <= 1e-3.

The slides include one of 2 tiles (a rank of a 2-group holds one tile, of a 3-group none) and one
whose loader reports it unusable: its group adds nothing to the step and still counts in the
mean, as a skipped batch counts in one process's accumulation window.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from groups_harness import GroupScenario, run_reference, run_worlds
from harness import load, normalised_l1, updates
from slide_files import write_grid_slide

from lightning_wsi import SlideDataModule, SlideParallelStrategy
from lightning_wsi.data.manifest import ManifestError
from lightning_wsi.data.sampling import SlideGroup
from lightning_wsi.strategies.collectives import interleave

PARTS = ("encoder", "aggregator")
# SGD, whose update is the gradient (Adam's would hide a factor, being invariant to scale), and
# clipping by value, which sees the combined gradient: clipped or not, each element says so.
CLIP = {"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"}
# 4 slides + the 2-tile one + the unreadable one: 3 steps of 2 slides per epoch.
PAIRS = GroupScenario(
    "pairs", optimizer="sgd", k=8, n_slides=4, dropped_slide=True, evaluate=True, trainer=CLIP
)
ONE_GROUP = GroupScenario("one-group", k=8, slide_group_size=3)
# float16 with its gradient scaler, chunked re-encoding, and accumulation over 2 group steps: the
# mean over 4 slides. The reference encodes in the row groups of 2 ranks and chunks of 3 (float16
# CPU kernels round by batch size; that path has no skipped slides) and accumulates over 4.
MIXED = GroupScenario(
    "mixed", optimizer="sgd", k=8, n_slides=5, chunk=3, split_like=(2, 3),
    trainer={"precision": "16-mixed", "accumulate_grad_batches": 2},
)  # fmt: skip
# A slide without a target: its group's rank 0 raises in the loss, in one group of two.
FAILING = GroupScenario("failing", k=8, n_slides=4, no_target=True, slide_group_size=2)
CELLS = [(c, r) for c in range(1, 5) for r in range(1, 4)]  # 12 tissue tiles at 0.5 mpp / 224 px


def _write_slides(root: Path) -> str:
    """Four real TIFF slides of 12 tissue tiles and their manifest (two per class)."""
    (root / "slides").mkdir(parents=True)
    lines = ["slide_id,path,label"]
    for i in range(4):
        write_grid_slide(root / f"slides/s{i}.tiff", CELLS, 6, 5, 224, mpp=0.5, seed=i)
        lines.append(f"s{i},slides/s{i}.tiff,{i % 2}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return str(root / "manifest.csv")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("groups")
    # SlideDataModule on real slides, K=7 of 12 tiles: each rank reads its shard.
    slides = GroupScenario("slides", k=7, manifest=_write_slides(root), mpp=2.0, tile_size=56)
    reference = [
        dataclasses.replace(PAIRS, trainer={**CLIP, "accumulate_grad_batches": 2}),
        ONE_GROUP,
        dataclasses.replace(MIXED, trainer={**MIXED.trainer, "accumulate_grad_batches": 4}),
        dataclasses.replace(slides, trainer={"accumulate_grad_batches": 2}),
    ]
    run_reference(reference, root / "reference")
    worlds = {
        "4x2": (
            4,
            [dataclasses.replace(s, slide_group_size=2) for s in (PAIRS, MIXED, slides)]
            + [FAILING],
        ),
        "3x3": (3, [ONE_GROUP]),
        "2x1": (2, [dataclasses.replace(s, slide_group_size=1) for s in (PAIRS, slides)]),
    }
    run_worlds(worlds, root)
    return root


def _assert_trains_like(reference: dict, result: dict) -> None:
    for part in PARTS:
        assert normalised_l1(reference["final"], result["final"], part) <= 1e-5, part
        assert normalised_l1(updates(reference), updates(result), part) <= 1e-3, part
        assert normalised_l1(reference["initial"], reference["final"], part) > 1e-4, part


def _losses_by_slide(result: dict) -> dict[tuple[str, int], float]:
    """Each trained slide's loss, keyed by (slide, how often it was seen before)."""
    seen: Counter[str] = Counter()
    keyed = {}
    used = [s for s in result["slide_ids"] if s != "vanished"]  # skipped: no loss recorded
    for slide, loss in zip(used, result["losses"], strict=True):
        keyed[(slide, seen[slide])] = loss
        seen[slide] += 1
    return keyed


@pytest.mark.parametrize("world", ["4x2", "2x1"])
def test_two_groups_train_as_one_process_accumulating_over_the_pairs(runs, world) -> None:
    reference = load(runs / "reference", "pairs")
    ranks = int(world[0])
    leaders = [load(runs / world, "pairs", r) for r in range(0, ranks, ranks // 2)]
    _assert_trains_like(reference, leaders[0])
    # Each group's rank 0 returned its own slides' losses: together, the reference's (which
    # Lightning reports divided by accumulate_grad_batches).
    expected = {key: 2 * loss for key, loss in _losses_by_slide(reference).items()}
    ours = {**_losses_by_slide(leaders[0]), **_losses_by_slide(leaders[1])}
    assert ours.keys() == expected.keys() and len(ours) == 2 * 5  # 5 usable slides, 2 epochs
    a, b = torch.tensor([expected[k] for k in ours]), torch.tensor(list(ours.values()))
    assert float((a - b).abs().sum() / a.abs().sum()) <= 1e-5


def test_the_step_is_world_size_independent_given_the_group_count(runs) -> None:
    """4 ranks in 2 groups of 2 and 2 ranks in 2 groups of 1 take the same steps."""
    _assert_trains_like(load(runs / "4x2", "pairs"), load(runs / "2x1", "pairs"))


def test_mixed_precision_chunks_and_accumulation_average_over_every_slide(runs) -> None:
    _assert_trains_like(load(runs / "reference", "mixed"), load(runs / "4x2", "mixed"))


@pytest.mark.parametrize("world", ["4x2", "2x1"])
def test_the_data_module_gives_each_group_its_slides_and_each_rank_its_shard(runs, world):
    """Real slides through SlideDataModule: SlideSampler's groups and the ranks' tile shards
    train as one process accumulating over each pair of slides of the epoch's order."""
    reference = load(runs / "reference", "slides")
    ranks = int(world[0])
    results = [load(runs / world, "slides", r) for r in range(ranks)]
    _assert_trains_like(reference, results[0])
    size = ranks // 2
    assert all(r["slide_ids"] == results[i - i % size]["slide_ids"] for i, r in enumerate(results))
    pairs = zip(results[0]["slide_ids"], results[size]["slide_ids"], strict=True)
    assert [s for pair in pairs for s in pair] == reference["slide_ids"]


def test_one_group_of_three_trains_as_one_process(runs) -> None:
    reference, result = load(runs / "reference", "one-group"), load(runs / "3x3", "one-group")
    _assert_trains_like(reference, result)
    assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5)


@pytest.mark.parametrize(("world", "size"), [("4x2", 2), ("2x1", 1), ("3x3", 3)])
def test_ranks_of_a_group_share_slides_and_groups_interleave_the_order(runs, world, size):
    ranks = int(world[0])
    name = "one-group" if size == 3 else "pairs"
    reference = load(runs / "reference", name)["slide_ids"]
    results = [load(runs / world, name, r) for r in range(ranks)]
    for r, result in enumerate(results):  # same slides within a group, same final weights
        assert result["slide_ids"] == results[r - r % size]["slide_ids"]
        for n, p in results[0]["final"].items():
            assert torch.equal(p, result["final"][n]), (r, n)
    groups = [results[g]["slide_ids"] for g in range(0, ranks, size)]
    assert [s for step in zip(*groups, strict=True) for s in step] == reference


@pytest.mark.parametrize("world", ["4x2", "2x1"])
def test_validation_counts_and_predict_returns_every_slide_once(runs, world) -> None:
    reference = load(runs / "reference", "pairs")
    for rank in range(int(world[0])):
        result = load(runs / world, "pairs", rank)
        # 4 validation slides, 2 per group; a sum metric gathered over one rank per group.
        assert result["metrics"]["val/slides"] == reference["metrics"]["val/slides"] == 4
        for key in ("val/auroc", "val/balanced_accuracy"):
            assert result["metrics"][key] == pytest.approx(reference["metrics"][key], abs=1e-5)
        ours, theirs = result["predictions"], reference["predictions"]
        assert [p["slide_id"] for p in ours] == [p["slide_id"] for p in theirs]
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(a["probabilities"], b["probabilities"])
            assert torch.equal(a["coords"], b["coords"])


@pytest.mark.parametrize(("size", "world", "divisors"), [(3, 4, "1, 2, 4"), (4, 2, "1, 2")])
def test_a_group_size_not_dividing_the_world_is_refused_before_launch(size, world, divisors):
    strategy = SlideParallelStrategy(slide_group_size=size)
    expected = (
        rf"^strategy\.slide_group_size={size} must divide the world size {world} \(devices x "
        rf"nodes\): use one of \[{divisors}\], or null for one group of all ranks\.$"
    )
    with pytest.raises(ValueError, match=expected):
        L.Trainer(accelerator="cpu", devices=world, strategy=strategy, logger=False)


@pytest.mark.parametrize("size", [0, -2, 1.5, True, "2"])
def test_a_group_size_that_is_no_positive_integer_is_refused(size) -> None:
    with pytest.raises(ValueError, match=rf"strategy\.slide_group_size must be a positive integer"
                       rf".*; got {size!r}\.$"):  # fmt: skip
        SlideParallelStrategy(slide_group_size=size)


def test_group_outputs_interleave_back_into_the_slide_order() -> None:
    """Group g of G predicted the slides g, g + G, ... of 7: the first groups one more."""
    order = list(range(7))
    assert interleave([order[g::3] for g in range(3)]) == order
    assert interleave([order[g::2] for g in range(2)]) == order
    assert interleave([order]) == order
    assert interleave([[], []]) == []


def test_a_failure_in_one_group_stops_every_rank_at_the_same_step(runs) -> None:
    results = [load(runs / "4x2", "failing", r) for r in range(4)]
    leader = next(r for r in (0, 2) if results[r]["slide_ids"][-1] == "no-target")
    steps = {len(r["slide_ids"]) for r in results}
    assert len(steps) == 1  # the same step on every rank, in both groups
    for result in results:
        assert result["error"].startswith(f"Slide-parallel backward failed on rank {leader}: ")
        assert "KeyError: \"Slide 'no-target' has no `target` in its batch.\"" in result["error"]
        assert result["error"].endswith("Every rank stopped at the same step.")


def _data_module_under(tmp_path: Path, group_size: int, val_fraction: float) -> SlideDataModule:
    """A data module attached to a 4-device Trainer (built, not launched: this is rank 0)."""
    strategy = SlideParallelStrategy(slide_group_size=group_size)
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=strategy, logger=False)
    dm = SlideDataModule(
        _write_slides(tmp_path), k=7, mpp=2.0, tile_size=56, val_fraction=val_fraction,
        progress=False, tiling_workers=0,
    )  # fmt: skip
    dm.trainer = trainer
    return dm


def test_the_data_module_reads_its_group_and_shard_from_the_strategy(tmp_path) -> None:
    dm = _data_module_under(tmp_path, group_size=2, val_fraction=0.5)
    loader = dm.train_dataloader()
    assert loader.sampler.group == SlideGroup(index=0, count=2, rank=0, size=2)
    assert (loader.dataset.shard_rank, loader.dataset.shard_count) == (0, 2)
    assert len(loader.sampler) == 1  # 2 training slides, one per group
    assert len(next(iter(loader))["tiles"]) == 4  # rank 0's shard of 7 tiles


def test_an_evaluation_split_with_fewer_slides_than_groups_is_refused(tmp_path) -> None:
    dm = _data_module_under(tmp_path, group_size=1, val_fraction=0.5)
    expected = (
        r"split 'val' of manifest .*manifest\.csv has 2 slides, fewer than the 4 groups of ranks "
        r"that evaluate slides side by side \(4 ranks, 1 per slide\); every group needs one: use "
        r"fewer groups \(a larger strategy\.slide_group_size\) or more slides$"
    )
    with pytest.raises(ManifestError, match=expected):
        dm.val_dataloader()
