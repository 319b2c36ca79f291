"""``python -m lightning_wsi.predict --devices 2``: slide-parallel prediction, written once.

Under Lightning's default DDP each rank would predict a subset of the slides and write its own
``predictions.csv`` to the same path; slide-parallel prediction gives every rank every slide (a
shard of its tiles each) and only global rank 0 writes, so the file lists each slide once, with
the probabilities of a one-process run.
"""

from __future__ import annotations

import ast
import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_wsi import SlideDataModule, SlideModule
from lightning_wsi.data import make_synthetic_dataset
from lightning_wsi.predict import main as predict_main


def _run(args: list[str], cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    """A fresh process without the launch variables a test's earlier Trainer may have left."""
    launch = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch and not k.startswith("PL_")}
    env.update(PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint of one training step (test_resnet + GMA on 56 px tiles at 2 µm/px) that
    records the data module's tiling, and the manifest of its 4 synthetic slides."""
    root = tmp_path_factory.mktemp("predict_devices")
    manifest = make_synthetic_dataset(root / "slides", n_slides=4, progress=False)
    # A str, as the train command passes it: a Path in the recorded hyperparameters would stop
    # `load_from_checkpoint` (weights_only) from reading the checkpoint.
    dm = SlideDataModule(
        str(manifest), k=4, mpp=2.0, tile_size=56, val_fraction=0.0, progress=False,
        tiling_workers=0,
    )  # fmt: skip
    torch.manual_seed(0)
    module = SlideModule(
        "test_resnet", "gma", "binary", aggregator_kwargs={"hidden_dim": 32, "attention_dim": 16}
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, dm)
    checkpoint = root / "tiny.ckpt"
    trainer.save_checkpoint(checkpoint)
    return checkpoint, manifest


def test_predict_on_two_devices_writes_every_slide_once_as_one_device_does(
    tiny_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint, manifest = tiny_run
    common = [str(checkpoint), str(manifest), "--accelerator", "cpu", "--heatmaps", "2"]
    one = tmp_path / "one"
    assert predict_main([*common, "--devices", "1", "--num-workers", "0", "--out", str(one)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"outputs: {one}"

    two = tmp_path / "two"
    done = _run(
        ["-m", "lightning_wsi.predict", *common, "--devices", "2", "--out", str(two)], tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 1 runs the same command (Lightning's launcher) and shares this stdout: it must not
    # print, and must not write.
    lines = done.stdout.splitlines()
    assert lines.count(f"outputs: {two}") == 1, done.stdout
    assert sum("slides predicted;" in line for line in lines) == 1, done.stdout
    assert len(list((two / "heatmaps").glob("*.png"))) == 2

    listed = [r["slide_id"] for r in _rows(manifest)]
    single, parallel = _rows(one / "predictions.csv"), _rows(two / "predictions.csv")
    assert sorted(r["slide_id"] for r in parallel) == sorted(listed)  # each slide exactly once
    assert [r["slide_id"] for r in parallel] == [r["slide_id"] for r in single]
    assert [r["n_tiles"] for r in parallel] == [r["n_tiles"] for r in single]
    assert [r["target"] for r in parallel] == [r["target"] for r in single]
    probabilities = [
        torch.tensor([float(ast.literal_eval(r["prediction"])) for r in rows])
        for rows in (single, parallel)
    ]
    torch.testing.assert_close(probabilities[1], probabilities[0], rtol=0, atol=1e-5)
