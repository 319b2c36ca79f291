"""Evaluation in parts on 2 real gloo ranks: slide-parallel (one group) and two groups of one
give the predictions, metrics and problem records of one process evaluating each slide as one
item. Both worlds run in one pair of forked processes (``harness.run_world``'s pattern)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from bad_tile_slides import write_part_slides
from harness import fork_ranks, free_port, join_world, one_thread, quiet_rank

from lightning_wsi import SlideDataModule, SlideModule, SlideParallelStrategy

# Tiles per part: the 64-tile slides of write_part_slides make 7 parts (6 x 10 + 4), each
# sharded over the group's ranks; their bad tiles (positions 0 and 24) lie in parts 0 and 2.
PART = 10
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
WORLDS = {"one_group": None, "two_groups": 1}  # strategy.slide_group_size
EXPECTED_RECORDS = {
    ("tile left out", "one_bad", 0, 0),
    ("tile left out", "two_bad", 0, 0),
    ("tile left out", "two_bad", 0, 384),
    ("slide dropped", "two_bad", None, None),
}


def _evaluate(manifest: Path, part_size: int | None, strategy: Any, devices: int) -> dict:
    dm = SlideDataModule(
        manifest, k=8, tile_size=128, eval_part_size=part_size, max_bad_tile_fraction=0.02,
        progress=False, tiling_workers=0,
    )  # fmt: skip
    torch.manual_seed(0)
    module = SlideModule(
        "test_resnet", "gma", "binary", aggregator_kwargs={"hidden_dim": 16, "attention_dim": 8}
    )
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, **QUIET)
    metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
    predictions = trainer.predict(module, datamodule=dm)
    records = {(p.kind, p.slide_id, p.x, p.y) for p in dm.problems.records}
    return {"metrics": metrics, "predictions": predictions, "records": records}


def _worker(rank: int, port: int, manifest: str, out: str) -> None:
    join_world(rank, 2, port)
    quiet_rank()
    for name, group_size in WORLDS.items():
        for part_size in (PART, None):
            strategy = SlideParallelStrategy(slide_group_size=group_size)
            result = _evaluate(Path(manifest), part_size, strategy, devices=2)
            torch.save(result, Path(out) / f"{name}.{part_size}.rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("eval_parts_ranks")
    manifest = write_part_slides(root)
    with one_thread():
        reference = _evaluate(manifest, None, "auto", devices=1)
    fork_ranks(_worker, 2, free_port(), str(manifest), str(root))
    out = {"reference": reference}
    for path in root.glob("*.rank*.pt"):
        out[path.stem] = torch.load(path, weights_only=False)
    return out


@pytest.mark.parametrize("world", list(WORLDS))
def test_two_ranks_in_parts_evaluate_as_one_process_with_one_item(
    results: dict[str, Any], world: str
) -> None:
    reference = results["reference"]
    want = reference["predictions"]
    assert [p["slide_id"] for p in want] == ["intact", "small", "one_bad", "two_bad"]
    for rank in range(2):
        got = results[f"{world}.{PART}.rank{rank}"]
        # One prediction per slide, in the loader's order, on every rank; the dropped slide too.
        assert [p["slide_id"] for p in got["predictions"]] == [p["slide_id"] for p in want]
        assert got["predictions"][3]["status"] == "dropped"
        assert got["predictions"][3]["reason"] == want[3]["reason"]
        assert "2 of 64 sampled tiles failed to read, more than the 1" in want[3]["reason"]
        for g, w in zip(got["predictions"][:3], want[:3], strict=True):
            assert torch.equal(g["coords"], w["coords"])  # the same tiles in the same order
            # Shards of 5 tiles rather than one batch of 64: float32 rounding of the encoder.
            assert (g["logits"] - w["logits"]).abs().max() <= 1e-5
            assert (g["attention"] - w["attention"]).abs().max() <= 1e-6
        assert len(got["predictions"][2]["coords"]) == 63  # one_bad kept without its bad tile
        # AUROC counts every slide once; val/loss is the mean of the groups' means (today's
        # sync_dist), the same as the same world evaluating each slide as one item.
        assert got["metrics"]["val/auroc"] == pytest.approx(reference["metrics"]["val/auroc"])
        one_item = results[f"{world}.None.rank{rank}"]["metrics"]
        assert got["metrics"]["val/loss"] == pytest.approx(one_item["val/loss"], abs=1e-6)
        if world == "one_group":
            assert got["metrics"]["val/loss"] == pytest.approx(
                reference["metrics"]["val/loss"], abs=1e-6
            )
        assert got["records"] == reference["records"] == EXPECTED_RECORDS
