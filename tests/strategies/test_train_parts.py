"""Training slides streamed in parts (``train_part_size``) train exactly as whole shards.

Real fits through ``SlideDataModule`` (K = every tile, colour jitter, bad tiles in non-final
parts, accumulation over 2 slides, clipping, a loader worker in one process) under
``SlideParallelStrategy`` with gradient caching whose chunks straddle the parts: in one
process, and on 2 forked gloo ranks as one group and as two groups of one. Streamed and
unstreamed runs of the same world end with the same parameters bit for bit, the same problem
records and the same number of steps (one per slide, not per part); 2 ranks agree with one
process to the core's bounds.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from bad_tile_slides import write_part_slides
from harness import fork_ranks, free_port, join_world, one_thread, quiet_rank

from lightning_wsi import SlideDataModule, SlideModule, SlideParallelStrategy
from lightning_wsi.strategies import streaming

# 64-tile slides (16 for "small"): one process reads 7 parts of 10 (chunks of 4 straddle
# them); 2 ranks' 32-tile shards make 4 parts of 10 each ("small": 8 tiles, one part).
PART, CHUNK, EPOCHS = 10, 4, 2
QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False,
             enable_checkpointing=False)  # fmt: skip
WORLDS = {"one_group": None, "two_groups": 1}  # strategy.slide_group_size
EXPECTED_RECORDS = {
    ("tile left out", "one_bad", 0, 0),
    ("tile left out", "two_bad", 0, 0),
    ("tile left out", "two_bad", 0, 384),
}


def _train_manifest(root: Path) -> Path:
    """``write_part_slides``' four slides, all in the train split."""
    manifest = write_part_slides(root)
    with open(manifest, newline="") as handle:
        rows = [{**row, "split": "train"} for row in csv.DictReader(handle)]
    with open(manifest, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def _fit(
    manifest: Path, part_size: int | None, devices: int, group: int | None, epochs: int,
    workers: int, precision: str = "32-true",
) -> dict:  # fmt: skip
    dm = SlideDataModule(
        manifest, k="all", tile_size=128, train_part_size=part_size, val_fraction=0.0,
        color_jitter=0.1, max_bad_tile_fraction=0.05, num_workers=workers, progress=False,
        tiling_workers=0,
    )  # fmt: skip
    torch.manual_seed(0)
    module = SlideModule(
        "test_resnet", "gma", "binary", encoder_lr=1e-3,
        aggregator_kwargs={"hidden_dim": 16, "attention_dim": 8},
    )  # fmt: skip
    streams = []
    begin = streaming.TileStream.begin

    def spy(self: streaming.TileStream, batch: Any) -> None:
        streams.append((self.slide_id, self.parts))
        begin(self, batch)

    streaming.TileStream.begin = spy  # type: ignore[method-assign]
    try:
        strategy = SlideParallelStrategy(encode_chunk_size=CHUNK, slide_group_size=group)
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs,
            accumulate_grad_batches=2, gradient_clip_val=0.5, precision=precision, **QUIET,
        )  # fmt: skip
        trainer.fit(module, datamodule=dm)
    finally:
        streaming.TileStream.begin = begin  # type: ignore[method-assign]
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "records": {(p.kind, p.slide_id, p.x, p.y) for p in dm.problems.records},
        "steps": trainer.global_step,
        "streams": streams,
    }


def _worker(rank: int, port: int, manifest: str, out: str) -> None:
    join_world(rank, 2, port)
    quiet_rank()
    for name, group in WORLDS.items():
        for part_size in (PART, None):
            result = _fit(Path(manifest), part_size, 2, group, epochs=EPOCHS, workers=0)
            torch.save(result, Path(out) / f"{name}.{part_size}.rank{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("train_parts")
    manifest = _train_manifest(root)
    with one_thread():
        out = {
            f"one_process.{p}": _fit(manifest, p, 1, None, epochs=EPOCHS, workers=1)
            for p in (PART, None)
        }
        for p in (PART, None):  # the GPU preset's precision (bf16-mixed), on this CPU
            out[f"bf16.{p}"] = _fit(manifest, p, 1, None, 1, 0, precision="bf16-mixed")
    fork_ranks(_worker, 2, free_port(), str(manifest), str(root))
    for path in root.glob("*.rank*.pt"):
        out[path.stem] = torch.load(path, weights_only=False)
    return out


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_one_process_streamed_trains_exactly_as_whole_shards(results: dict[str, Any]) -> None:
    streamed, whole = results[f"one_process.{PART}"], results["one_process.None"]
    # Every slide but "small" (16 tiles: 2 parts) has 7 parts; each epoch streams all four.
    assert sorted(streamed["streams"]) == sorted(
        [("intact", 7), ("small", 2), ("one_bad", 7), ("two_bad", 7)] * EPOCHS
    )
    assert whole["streams"] == []
    # An optimiser step per 2 slides (accumulation), not per part.
    assert streamed["steps"] == whole["steps"] == 4 // 2 * EPOCHS
    for key, value in whole["state"].items():
        assert torch.equal(streamed["state"][key], value), key
    assert streamed["records"] == whole["records"] == EXPECTED_RECORDS


def test_streamed_in_bf16_mixed_trains_exactly_as_whole_shards(results: dict[str, Any]) -> None:
    # The later parts' colour jitter must run outside the step's autocast, as the first's does.
    streamed, whole = results[f"bf16.{PART}"], results["bf16.None"]
    assert streamed["streams"] and not whole["streams"]
    for key, value in whole["state"].items():
        assert torch.equal(streamed["state"][key], value), key


@pytest.mark.parametrize("world", list(WORLDS))
def test_two_ranks_streamed_train_as_whole_shards_and_as_one_process(
    results: dict[str, Any], world: str
) -> None:
    reference = results["one_process.None"]["state"]
    # Per rank and epoch 4 slides (two groups: 2 each), an optimiser step per 2 of them.
    steps = (4 if world == "one_group" else 2) // 2 * EPOCHS
    for rank in range(2):
        streamed, whole = results[f"{world}.{PART}.rank{rank}"], results[f"{world}.None.rank{rank}"]
        assert streamed["streams"] and not whole["streams"]
        assert streamed["steps"] == whole["steps"] == steps
        for key, value in whole["state"].items():
            assert torch.equal(streamed["state"][key], value), key
        assert streamed["records"] == whole["records"] == EXPECTED_RECORDS
        if world == "one_group":  # the same slides per step as one process
            assert _max_difference(streamed["state"], reference) <= 1e-5
