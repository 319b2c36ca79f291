"""Every way processes get started trains like one process with all K tiles.

Lightning's own launcher (``strategy="slide_parallel"`` re-runs the script), its spawn and
notebook (fork) variants, and torchrun with two nodes on loopback (``Trainer(num_nodes=2)``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from harness import (
    Scenario,
    build_module,
    free_port,
    in_memory_slides,
    load,
    normalised_l1,
    train,
    updates,
)
from torch.utils.data import DataLoader, DistributedSampler

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "run_scenario.py"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference")
    train(Scenario("gma-adamw"), None, out)
    return load(out, "gma-adamw")


def _assert_matches(reference: dict, result: dict) -> None:
    assert len(result["losses"]) == len(reference["losses"])
    for part in ("encoder", "aggregator"):
        assert normalised_l1(reference["final"], result["final"], part) <= 1e-5, part
        assert normalised_l1(updates(reference), updates(result), part) <= 1e-3, part
    diff = sum(abs(a - b) for a, b in zip(reference["losses"], result["losses"], strict=True))
    assert diff / sum(abs(a) for a in reference["losses"]) <= 1e-5


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "LOCAL_RANK"))}
    return {**env, "PYTHONWARNINGS": "ignore"}


def test_lightning_launcher_reruns_the_script(tmp_path: Path, reference: dict) -> None:
    """The default ``strategy="slide_parallel"``: Lightning starts rank 1 by re-running argv."""
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), "gma-adamw", "--devices", "2"]
    env = {**_env(), "MASTER_PORT": str(free_port())}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        _assert_matches(reference, load(tmp_path, "gma-adamw", rank))


def test_torchrun_two_nodes_on_loopback(tmp_path: Path, reference: dict) -> None:
    """Two torchrun agents, one process each, as two nodes: ``Trainer(num_nodes=2)``."""
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
            "1", "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port",
            str(port), str(SCRIPT), str(tmp_path), "gma-adamw", "--devices", "1",
            "--num-nodes", "2",
        ]  # fmt: skip
        procs.append(
            subprocess.Popen(
                cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )  # noqa: E501
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    for rank in (0, 1):
        _assert_matches(reference, load(tmp_path, "gma-adamw", rank))


@pytest.mark.parametrize("name", ["slide_parallel_spawn", "slide_parallel_notebook"])
def test_spawn_and_notebook_variants(name: str, reference: dict) -> None:
    """Started from this (pytest) process; rank 0's weights come back into ``module``."""
    scenario = Scenario("gma-adamw")
    module = build_module(scenario)
    slides = in_memory_slides(scenario)
    order = DistributedSampler(slides, num_replicas=1, rank=0, shuffle=True, seed=7)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=name, max_epochs=scenario.epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, DataLoader(slides, batch_size=None, sampler=order))
    final = {n: p.detach() for n, p in module.named_parameters()}
    for part in ("encoder", "aggregator"):
        assert normalised_l1(reference["final"], final, part) <= 1e-5, part
    assert not torch.equal(
        final["encoder.conv1.0.weight"], reference["initial"]["encoder.conv1.0.weight"]
    )
