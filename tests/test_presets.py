"""Every shipped trainer preset trains: two optimiser steps with only the accelerator set to CPU.

The presets' precision and clipping are what a CPU smoke run must not change: ``trainer=gpu``
and ``trainer=multinode`` train in bf16-mixed with ``gradient_clip_val=1.0``, which stopped at
the first optimiser step while AdamW was fused. The train command runs as in
``tests/test_commands.py``: ``python -m lightning_wsi.train`` with Hydra overrides from a folder
outside the repository, on tiny settings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_wsi.data import make_synthetic_dataset

# Two optimiser steps in one epoch (so validation and checkpoints run as usual), tiny model and K.
TINY = [
    "encoder=test_resnet",
    "K=8",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "trainer.enable_progress_bar=false",
    "heatmaps=1",
    "bootstrap=100",
    "data.synthetic.n_slides=8",
]
LAUNCH = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")


def _env() -> dict[str, str]:
    """This environment without a launcher's rank variables, which would make a run a rank."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH and not k.startswith("PL_")}
    return {**env, "PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic slides, written once, so that two nodes never write them at the same time."""
    root = tmp_path_factory.mktemp("slides")
    make_synthetic_dataset(root, n_slides=8, seed=0, task="hard")  # as data=synthetic asks
    return root


def _train_args(preset: str, slides: Path, run: Path) -> list[str]:
    return [
        "-m", "lightning_wsi.train", f"trainer={preset}", "trainer.accelerator=cpu", *TINY,
        f"data.synthetic.root={slides}", f"hydra.run.dir={run}",
    ]  # fmt: skip


def _assert_two_steps(run: Path, output: str, precision: str, clip: float | None) -> None:
    """The run finished its report, took exactly two optimiser steps, in the preset's precision,
    and its AdamW is the one that can clip there (foreach when clipping under AMP)."""
    assert (run / "summary.json").is_file(), output[-3000:]
    if precision == "bf16-mixed":
        assert "Using bfloat16 Automatic Mixed Precision (AMP)" in output
    last = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)  # written by this test
    assert checkpoint["global_step"] == 2
    group = checkpoint["optimizer_states"][0]["param_groups"][0]
    expected = (True, None) if precision.endswith("mixed") and clip else (None, True)
    assert (group["foreach"], group["fused"]) == expected
    weights = checkpoint["state_dict"].values()
    assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point())


# trainer=cpu, the default, is the preset tests/test_commands.py's run trains (and checks).
@pytest.mark.parametrize(("preset", "precision", "clip"), [("gpu", "bf16-mixed", 1.0)])
def test_single_process_preset_trains_on_cpu(
    tmp_path: Path, slides: Path, preset: str, precision: str, clip: float | None
) -> None:
    run = tmp_path / preset
    done = subprocess.run(
        [sys.executable, *_train_args(preset, slides, run)],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    _assert_two_steps(run, output, precision, clip)


def test_multinode_preset_trains_on_two_cpu_nodes(tmp_path: Path, slides: Path) -> None:
    """``trainer=multinode`` as two torchrun "nodes" on loopback, slide-parallel across them.

    One process per node (``trainer.devices=1``, the preset has 8) because the CI machine has 2
    cores; ``num_nodes=2``, bf16-mixed and clipping stay as shipped.
    """
    run, port = tmp_path / "multinode", _free_port()
    procs: list[subprocess.Popen[Any]] = []
    try:
        for node in (0, 1):
            torchrun = [
                sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc-per-node", "1", "--node-rank", str(node), "--master-addr", "127.0.0.1",
                "--master-port", str(port),
            ]  # fmt: skip
            train = _train_args("multinode", slides, run)[1:]  # the module, run by torchrun
            train += ["trainer.devices=1", "strategy=slide_parallel"]
            procs.append(
                subprocess.Popen(
                    [*torchrun, "-m", *train], cwd=tmp_path, env=_env(), text=True,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                )
            )  # fmt: skip
        outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for node, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"node {node}:\n{output[-3000:]}"
    _assert_two_steps(run, outputs[0], "bf16-mixed", 1.0)
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert json.loads((run / "summary.json").read_text())["devices"] == 2
