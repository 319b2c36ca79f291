"""Nothing hangs after a slide-parallel run, whatever OMP_NUM_THREADS says.

A run leaves no process group behind, so a new Trainer on rank 0 does not wait for a rank that
has exited, and the same Trainer can fit, validate, predict and fit again. Ranks forked from a
process that already used OpenMP (a notebook) start, and use their share of the CPUs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from harness import free_port
from lightning.fabric.utilities.data import _num_cpus_available

from lightning_wsi.data import make_synthetic_dataset
from lightning_wsi.strategies.lifecycle import rank_threads, release_openmp_threads

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "run_fit_then_predict.py"
LAUNCH = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four synthetic slides both scripts read (written once, here, for time)."""
    root = tmp_path_factory.mktemp("slides")
    make_synthetic_dataset(root, n_slides=4, num_workers=0, progress=False)
    return root


def _env(**extra: str) -> dict[str, str]:
    """This environment without a previous launch's rank variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH and not k.startswith("PL_")}
    return {**env, "PYTHONWARNINGS": "ignore", **extra}


def _run(args: list[str], env: dict[str, str], timeout: int, **kwargs: Any) -> str:
    """Run ``args``; its stdout, or a failure naming what hung or failed."""
    try:
        done = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=timeout, **kwargs
        )
    except subprocess.TimeoutExpired as err:  # its output so far comes as bytes
        tail = err.stderr.decode(errors="replace") if isinstance(err.stderr, bytes) else ""
        pytest.fail(f"{args[1:]} did not finish within {timeout} s: {tail[-2000:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _result(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, stdout[-3000:]  # rank 0 alone reports
    return json.loads(lines[0].removeprefix("RESULT "))


def _logits(rows: list[list[Any]]) -> torch.Tensor:
    return torch.tensor([logits for _, logits in rows], dtype=torch.float32)


def test_new_trainer_on_rank_0_after_fit_and_the_same_trainer_again(slides: Path) -> None:
    """Lightning's launcher (the script re-run for rank 1): fit, validate, predict and fit again
    on one Trainer; then rank 0 predicts with a new one-device Trainer while rank 1 exits. Both
    predictions agree, and no process group is left."""
    env = _env(MASTER_PORT=str(free_port()))
    stdout = _run([sys.executable, str(SCRIPT), "popen", str(slides)], env, timeout=240)
    result = _result(stdout)
    assert not result["initialized"]
    assert [s for s, _ in result["new"]] == [s for s, _ in result["same"]]
    assert len(result["new"]) == 4  # every slide of the manifest
    torch.testing.assert_close(_logits(result["new"]), _logits(result["same"]))


def test_notebook_fork_with_omp_num_threads_set(slides: Path, tmp_path: Path) -> None:
    """``OMP_NUM_THREADS`` = the core count, the code on stdin (no ``__main__`` file, as in a
    notebook), a tensor op before the fork: the forked ranks train on their share of the CPUs
    and the new Trainer predicts in this process. Without the fix the ranks deadlock in OpenMP
    under ``_sync_module_states``."""
    cores = _num_cpus_available()
    env = _env(OMP_NUM_THREADS=str(cores))
    stdout = _run(
        [sys.executable, "-", "notebook", str(slides)],
        env,
        timeout=180,
        input=SCRIPT.read_text(),
        cwd=tmp_path,
    )
    threads = [int(n) for n in re.findall(r"^threads (\d+)$", stdout, flags=re.MULTILINE)]
    assert threads == [max(1, cores // 2)] * 2, stdout[-2000:]
    predictions = _result(stdout)["new"]
    assert len(predictions) == 4
    assert torch.isfinite(_logits(predictions)).all()


def _wait_or_kill(pid: int, timeout: float) -> int | None:
    """The forked child's exit code, or None after killing it once ``timeout`` s have passed
    (a guard against a hang, not a measurement)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_forked_child_runs_two_openmp_threads_after_release() -> None:
    """The cause in plain torch: once this process has run a parallel region, a forked child's
    own 2-thread region finishes only because the pool was released first (without it the
    child waits forever in libgomp); this process's next region starts a new pool."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = torch.ones(1 << 22)  # sums of up to 2**24 ones are exact in float32
        assert float((x * 2).sum()) == 2**23  # on this process's thread pool
        assert release_openmp_threads()
        pid = os.fork()
        if pid == 0:  # the child: no pytest here, only an exit code
            code = 1
            try:
                torch.set_num_threads(2)
                code = 0 if float((x * 3).sum()) == 3 * 2**22 else 2
            finally:
                os._exit(code)
        code = _wait_or_kill(pid, timeout=60)
        assert code == 0, "the forked child hung in OpenMP" if code is None else code
        assert float((x * 4).sum()) == 2**24
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("value", "processes", "expected"),
    [
        (None, 2, "share"),  # unset: Lightning's choice, the share
        ("1", 1, 1),  # fewer than the share: honoured
        ("100000", 1, "share"),  # more: capped at the share
        ("100000", 2, "share"),
        ("100000,2", 1, "share"),  # nested levels: the first counts
        ("zero", 2, "share"),  # not a number: the share
        ("0", 2, "share"),
    ],
)
def test_rank_threads(
    monkeypatch: pytest.MonkeyPatch, value: str | None, processes: int, expected: Any
) -> None:
    if value is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
    share = max(1, _num_cpus_available() // processes)
    assert rank_threads(processes) == (share if expected == "share" else expected)
