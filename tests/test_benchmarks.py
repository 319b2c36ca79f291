"""The benchmark scripts still run: ``benchmarks/gpu_check.py --tiny`` on the CPU.

The GPU check waits for the day a GPU is lent; running it tiny here keeps it from rotting, and
its CPU-visible checks (chunked vs unchunked, channels_last under the strategy, clipping under
mixed precision) must pass, and the host-sync check's guard is shown to wrap what it claims.
No time or memory figure is asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_tiny_on_cpu_and_every_check_passes_or_is_skipped() -> None:
    launch = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch and not k.startswith("PL_")}
    env.update(PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    report = done.stdout + done.stderr[-3000:]
    status = {}
    for line in done.stdout.splitlines():
        found = re.match(r"\[([a-f])\] (PASS|FAIL|SKIP) ", line)
        if found:
            assert found[1] not in status, f"two lines for check {found[1]}:\n{report}"
            status[found[1]] = found[2]
    # a, b, c and f are measured on the CPU too; d (sync debug mode) and e (CUDA memory) need CUDA.
    expected = {"a": "PASS", "b": "PASS", "c": "PASS", "d": "SKIP", "e": "SKIP", "f": "PASS"}
    assert status == expected, report
    assert "summary" in done.stdout, report
    assert done.returncode == 0, report


def test_gpu_check_guards_exactly_the_strategy_step_and_backward(monkeypatch) -> None:
    """Check d's coverage, on the CPU: the sync debug mode is switched on around the strategy's
    ``training_step`` and ``backward`` only, in every step after the first."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    modes: list[object] = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    arm = gpu_check._sync_run("cpu", gpu_check.Sizes.tiny(), 3, "error")
    assert (arm.guarded_steps, arm.guarded_calls) == (2, 4)
    assert modes == ["error", 0] * 4


def test_foundation_tuning_steps_train_what_each_mode_says(monkeypatch) -> None:
    """``benchmarks/foundation_tuning.py``'s step, tiny (test_vit, 32 px, K=8, chunks of 4,
    gradient checkpointing on): the encoder's trainable share follows the mode, and every mode
    that trains gets a gradient into the encoder through chunking and checkpointing together
    (LoRA's adapters too). Memory and time are measured but not asserted."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import foundation_tuning as ft

    setup = ft.Setup(model="test_vit", size=32)
    results = {m: ft.worker(ft.Config(m, 8, 4, True), setup) for m in ft.MODES}
    assert {m: (r["status"], r["grad_ok"]) for m, r in results.items()} == {
        m: ("ok", True) for m in ft.MODES
    }
    trainable = [results[m]["trainable_m"] for m in ft.MODES]  # frozen, lora, last4, full
    assert trainable[0] == 0 and 0 < trainable[1] < trainable[2] < trainable[3]
    assert all(r["seconds"] > 0 for r in results.values())
