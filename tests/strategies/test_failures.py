"""One failure, every rank knows: an exception on one rank stops both ranks at the same step.

Each case runs two real processes (gloo) started by the test, as torchrun would start them; the
failure happens on one rank only. Both must exit non-zero within 60 s, each naming the failing
rank and the original message; without the failure flag on the step's exchanges the healthy rank
would wait in a collective (for 30 minutes under NCCL).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import free_port

SCRIPT = Path(__file__).resolve().parent / "run_failure.py"
CASES = {
    "loss": "rank 0: FloatingPointError: loss exploded on slide",
    "target": "rank 0: KeyError:",
    "read": "rank 1: OSError: cannot read tile 3 of",
    "encode": "rank 1: RuntimeError: encoder blew up on rank 1",
    "val": "rank 0: ValueError: aggregator cannot handle this validation slide",
}


@pytest.fixture(scope="module")
def outcomes() -> dict[str, list[tuple[int, float, str]]]:
    """Start every case's two ranks at once; collect (exit code, seconds, stderr) per rank."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PL_", "LOCAL_RANK"))}
    running = {}
    for case in CASES:
        port = str(free_port())
        for rank in (0, 1):
            rank_env = {
                **env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
                "NODE_RANK": "0", "LOCAL_RANK": str(rank), "GLOBAL_RANK": str(rank),
                "PYTHONWARNINGS": "ignore",
            }  # fmt: skip
            proc = subprocess.Popen(
                [sys.executable, str(SCRIPT), case], env=rank_env, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            running[(case, rank)] = (proc, time.monotonic())
    results: dict[str, list[tuple[int, float, str]]] = {case: [] for case in CASES}
    for (case, _rank), (proc, start) in running.items():
        try:
            _, err = proc.communicate(timeout=max(1.0, 300 - (time.monotonic() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        results[case].append((proc.returncode, time.monotonic() - start, err))
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_stops_with_the_original_message(outcomes, case: str) -> None:
    for rank, (code, seconds, err) in enumerate(outcomes[case]):
        # A rank still waiting after 300 s (gloo's own timeout is 30 minutes) is killed: -9.
        assert code not in (0, None, -9), (rank, code, seconds, err[-2000:])
        assert "SlideParallelError" in err, (rank, err[-2000:])
        assert CASES[case] in err, (rank, err[-2000:])
