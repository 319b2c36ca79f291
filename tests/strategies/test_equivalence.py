"""Gradient equivalence, the core promise: 1 process with all K tiles = N ranks = chunked runs.

Real multi-process Trainers on CPU with gloo (see harness.py). The bounds are the issue's:
normalised L1 (sum |a - b| / sum |a|) per module of the parameters and of the loss at most 1e-5,
of the parameter updates (final - initial) at most 1e-3. Float32 on CPU gives about 1e-7 here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from harness import Scenario, load, normalised_l1, run_world, updates

from lightning_wsi.data import make_synthetic_dataset

PARTS = ("encoder", "aggregator")
WORLDS = ("1-chunked", "2", "3", "2-chunked", "3-chunked")


def _scenarios(manifest: Path) -> list[Scenario]:
    return [
        Scenario("gma-adamw"),
        Scenario("gma-sgd", optimizer="sgd"),
        Scenario("transformer-adamw", aggregator="transformer"),
        Scenario("transformer-sgd", aggregator="transformer", optimizer="sgd"),
        # Accumulation (the sync waits for the last micro-batch) and clipping (which must see
        # the summed gradient), with validation and prediction on every rank.
        Scenario(
            "gma-accumulate-clip",
            trainer={"accumulate_grad_batches": 2, "gradient_clip_val": 0.05},
            evaluate=True,
            epochs=3,
        ),
        # Real slides through SlideDataModule: K=128 tiles, more than some slides have, so
        # those use all their tiles; each rank reads only its shard.
        Scenario("slides-gma-adamw", k=128, manifest=str(manifest), epochs=2),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, list[Scenario]]:
    root = tmp_path_factory.mktemp("equivalence")
    manifest = make_synthetic_dataset(root / "slides", n_slides=4, progress=False)
    scenarios = _scenarios(manifest)
    run_world(None, scenarios, root / "reference")
    chunked = [dataclasses.replace(s, chunk=3) for s in scenarios]
    run_world(1, chunked, root / "1-chunked")
    for world in (2, 3):
        run_world(world, scenarios, root / str(world))
        run_world(world, chunked, root / f"{world}-chunked")
    return root, scenarios


def _cases() -> list[tuple[str, str]]:
    names = [s.name for s in _scenarios(Path("unused"))]
    return [(name, world) for name in names for world in WORLDS]


@pytest.mark.parametrize(("name", "world"), _cases())
def test_parameters_updates_and_loss_match_one_process(runs, name: str, world: str) -> None:
    root, _ = runs
    reference = load(root / "reference", name)
    result = load(root / world, name)
    assert len(result["losses"]) == len(reference["losses"]) > 0
    for part in PARTS:
        assert normalised_l1(reference["final"], result["final"], part) <= 1e-5, part
        assert normalised_l1(updates(reference), updates(result), part) <= 1e-3, part
        # The updates are not zero: the run really trained both parts.
        assert normalised_l1(reference["initial"], reference["final"], part) > 1e-4, part
    losses = torch.tensor(reference["losses"]), torch.tensor(result["losses"])
    assert float((losses[0] - losses[1]).abs().sum() / losses[0].abs().sum()) <= 1e-5


@pytest.mark.parametrize("world", ["2", "3", "3-chunked"])
def test_every_rank_ends_with_identical_parameters(runs, world: str) -> None:
    root, scenarios = runs
    for scenario in scenarios:
        rank0 = load(root / world, scenario.name, 0)
        for rank in range(1, int(world[0])):
            other = load(root / world, scenario.name, rank)
            assert other["losses"] == rank0["losses"]  # the slide's loss, logged on every rank
            for n, p in rank0["final"].items():
                assert torch.equal(p, other["final"][n]), (scenario.name, rank, n)


@pytest.mark.parametrize("world", ["2", "3-chunked"])
def test_validation_metrics_and_predictions_match_one_process(runs, world: str) -> None:
    root, _ = runs
    reference = load(root / "reference", "gma-accumulate-clip")
    for rank in range(int(world[0])):
        result = load(root / world, "gma-accumulate-clip", rank)
        assert set(result["metrics"]) >= {"val/loss", "val/auroc", "val/balanced_accuracy"}
        for key in ("val/loss", "val/auroc", "val/balanced_accuracy"):
            assert result["metrics"][key] == pytest.approx(reference["metrics"][key], abs=1e-5)
        assert len(result["predictions"]) == len(reference["predictions"])
        for ours, theirs in zip(result["predictions"], reference["predictions"], strict=True):
            assert ours["slide_id"] == theirs["slide_id"]
            assert torch.equal(ours["coords"], theirs["coords"])
            torch.testing.assert_close(ours["probabilities"], theirs["probabilities"])
            torch.testing.assert_close(ours["attention"], theirs["attention"])
