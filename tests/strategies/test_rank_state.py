"""What ranks must differ in and what they must agree on, beyond the gradient: dropout masks,
BatchNorm statistics, the collectives a step issues, and options the strategy refuses.

One set of 2 real processes (gloo) trains every scenario (see harness.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest
import torch
from harness import Scenario, load, normalised_l1, run_world, updates
from torch.utils.data import DataLoader

from lightning_wsi import SlideModule, SlideParallelStrategy

DROPOUT = Scenario("dropout", k=8, encoder_kwargs={"drop_rate": 0.5}, record_steps=True)
VIT = Scenario(
    "vit-drop-path-chunked", k=8, encoder="test_vit", chunk=3,
    encoder_kwargs={"img_size": 32, "drop_path_rate": 0.5},
)  # fmt: skip
# Batch statistics need 2 tiles per forward at least: no 2-tile slide, chunks of 2.
BATCHNORM = Scenario("batchnorm", k=8, freeze_batchnorm=False, record_steps=True, tiny_slide=False)
COUNTED = Scenario("collectives", k=8, count_collectives=True)
EVALUATE_ONLY = Scenario("evaluate-only", evaluate=True, evaluate_only=True)
DROPPED_TILE = Scenario("dropped-tile", k=7, drop_tile=(1, 2))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rank-state")
    scenarios = [
        DROPOUT,
        dataclasses.replace(DROPOUT, name="dropout-again"),
        VIT,
        BATCHNORM,
        dataclasses.replace(BATCHNORM, name="batchnorm-chunked", chunk=2),
        COUNTED,
        dataclasses.replace(COUNTED, name="collectives-chunked", chunk=3),
        dataclasses.replace(COUNTED, name="collectives-frozen", freeze_encoder=True),
        EVALUATE_ONLY,
        DROPPED_TILE,
    ]
    run_world(2, scenarios, root / "2")
    run_world(None, [EVALUATE_ONLY, DROPPED_TILE], root / "reference")
    return root


def test_each_rank_draws_its_own_dropout_masks(runs: Path) -> None:
    """The zeros of each rank's features: ReLU zeros (shared by similar tiles) plus dropout's.
    With one mask for tile j of every shard, the patterns of the two ranks differ in 1-5% of
    the entries (measured); with a stream per rank, in 19-29%."""
    rank0, rank1 = load(runs / "2", "dropout", 0), load(runs / "2", "dropout", 1)
    assert len(rank0["masks"]) == len(rank1["masks"]) == len(rank0["losses"]) > 0
    for a, b in zip(rank0["masks"], rank1["masks"], strict=True):
        assert a.shape == b.shape  # K=8: shards of 4 tiles; the 2-tile slide: 1 each
        assert float((a != b).float().mean()) > 0.12
        assert float(a.float().mean()) > 0.4  # dropout p=0.5 really acts


def test_the_same_seed_and_world_size_give_the_same_run(runs: Path) -> None:
    for rank in (0, 1):
        first, again = load(runs / "2", "dropout", rank), load(runs / "2", "dropout-again", rank)
        assert first["losses"] == again["losses"]
        for name, value in first["final"].items():
            assert torch.equal(value, again["final"][name]), name
        for a, b in zip(first["masks"], again["masks"], strict=True):
            assert torch.equal(a, b)


def test_vit_with_drop_path_trains_chunked_with_ranks_in_step(runs: Path) -> None:
    rank0, rank1 = load(runs / "2", VIT.name, 0), load(runs / "2", VIT.name, 1)
    assert rank0["losses"] == rank1["losses"]
    assert all(torch.isfinite(torch.tensor(rank0["losses"])))
    for name, value in rank0["final"].items():
        assert torch.equal(value, rank1["final"][name]), name
    assert normalised_l1(rank0["initial"], rank0["final"], "encoder") > 1e-4


@pytest.mark.parametrize("name", ["batchnorm", "batchnorm-chunked"])
def test_trainable_batchnorm_statistics_agree_on_every_rank_after_every_step(
    runs: Path, name: str
) -> None:
    rank0, rank1 = load(runs / "2", name, 0), load(runs / "2", name, 1)
    stats = [n for n in rank0["final_buffers"] if n.endswith(("running_mean", "running_var"))]
    assert stats  # the encoder really has trainable BatchNorm
    assert len(rank0["buffers"]) == len(rank1["buffers"]) == len(rank0["losses"])
    for step0, step1 in zip(rank0["buffers"], rank1["buffers"], strict=True):
        for n in step0:
            assert torch.equal(step0[n], step1[n]), n
    # The statistics moved (batch statistics in training), so the agreement is not trivial.
    first, last = rank0["buffers"][0], rank0["final_buffers"]
    assert any(not torch.equal(first[n], last[n]) for n in stats)
    for n, value in rank0["final_buffers"].items():  # what a checkpoint on rank 0 stores
        assert torch.equal(value, rank1["final_buffers"][n]), n


@pytest.mark.parametrize("name", ["collectives", "collectives-chunked", "collectives-frozen"])
def test_a_training_step_issues_a_fixed_set_of_collectives(runs: Path, name: str) -> None:
    """Per step: the host header (all_gather), features and coords to rank 0 (2 gathers), the
    loss (broadcast), dL/df back (scatter), one all_reduce per encoder bucket, one broadcast per
    aggregator bucket, and the host flags (all_reduce). No pickled objects. A frozen encoder
    has no dL/df to scatter and no encoder buckets."""
    for rank in (0, 1):
        result = load(runs / "2", name, rank)
        buckets = result["buckets"]
        frozen = name.endswith("frozen")
        # bucket_cap_mb=0.05 in the harness: many encoder buckets, started during backward
        assert buckets["summed"] == 0 if frozen else buckets["summed"] > 1
        expected = {
            "all_gather": 1,
            "gather": 2,
            "broadcast": 1 + buckets["broadcast"],
            "all_reduce": buckets["summed"] + 1,
        }
        if not frozen:
            expected["scatter"] = 1
        assert len(result["collectives"]) == len(result["losses"]) > 0
        for step in result["collectives"]:
            assert step == expected


def test_validate_and_predict_only_start_every_rank_from_rank_0s_weights(runs: Path) -> None:
    """No fit: ranks built their modules from different seeds; rank 0's weights are used."""
    reference = load(runs / "reference", EVALUATE_ONLY.name)
    for rank in (0, 1):
        result = load(runs / "2", EVALUATE_ONLY.name, rank)
        assert result["metrics"]["val/loss"] == pytest.approx(
            reference["metrics"]["val/loss"], abs=1e-6
        )
        assert result["metrics"]["val/slides"] == 4
        for ours, theirs in zip(result["predictions"], reference["predictions"], strict=True):
            torch.testing.assert_close(ours["probabilities"], theirs["probabilities"])


def test_a_shard_that_lost_a_tile_still_trains_like_one_process(runs: Path) -> None:
    """Rank 1's loader drops a tile (an unreadable one, say): the shard sizes travel with the
    step, so rank 0 aggregates the K - 1 tiles one process would, in the same order. The 2-tile
    slide leaves rank 1 with none."""
    reference = load(runs / "reference", DROPPED_TILE.name)
    for rank in (0, 1):
        result = load(runs / "2", DROPPED_TILE.name, rank)
        assert len(result["losses"]) == len(reference["losses"]) > 0
        for part in ("encoder", "aggregator"):
            assert normalised_l1(reference["final"], result["final"], part) <= 1e-5, part
            assert normalised_l1(updates(reference), updates(result), part) <= 1e-3, part
        assert result["losses"] == pytest.approx(reference["losses"], rel=1e-5)


def test_sync_batchnorm_is_refused_with_the_alternative() -> None:
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy=SlideParallelStrategy(), sync_batchnorm=True,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, max_steps=1,
    )  # fmt: skip
    module = SlideModule("test_resnet", "gma", "binary", freeze_batchnorm=False)
    loader = DataLoader([{"tiles": torch.rand(4, 3, 16, 16), "slide_id": "a"}], batch_size=None)
    with pytest.raises(ValueError, match=r"sync_batchnorm=True.*freeze_batchnorm=False"):
        trainer.fit(module, loader)
