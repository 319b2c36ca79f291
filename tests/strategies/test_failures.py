"""One failure, every rank knows: an exception on one rank stops both ranks at the same step.

Each case runs two real processes (gloo) forked by the test with the environment torchrun gives
a rank; the failure happens on one rank only. Both must exit non-zero within 60 s, each naming
the failing rank and the original message; without the failure flag on the step's exchanges the
healthy rank would wait in a collective (for 30 minutes under NCCL).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback

import pytest
from harness import free_port, join_world

from lightning_wsi.strategies.lifecycle import release_openmp_threads

CASES = {
    "loss": "rank 0: FloatingPointError: loss exploded on slide",
    "target": "rank 0: KeyError:",
    "read": "rank 1: OSError: cannot read tile 3 of",
    "encode": "rank 1: RuntimeError: encoder blew up on rank 1",
    "val": "rank 0: ValueError: aggregator cannot handle this validation slide",
}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list[tuple[int, float, str]]]:
    """Start every case's two ranks at once; collect (exit code, seconds, stderr) per rank.

    Each rank is a process forked from this one (the code is imported already), with the
    environment torchrun gives a rank and its stderr in a file; an exception that escapes
    ``run_failure.main`` is printed there and exits 1, as Python would."""
    import run_failure

    folder = tmp_path_factory.mktemp("failures")
    release_openmp_threads()  # each rank starts its own pool
    running = {}
    for case in CASES:
        port = free_port()
        for rank in (0, 1):
            err_path = folder / f"{case}.rank{rank}.err"
            pid = os.fork()
            if pid == 0:  # the rank: never returns into pytest
                code = 1
                try:
                    sys.stderr = open(err_path, "w", buffering=1)  # noqa: SIM115 - until exit
                    os.dup2(sys.stderr.fileno(), 2)  # what C code and gloo print, too
                    join_world(rank, 2, port)
                    for key in [k for k in os.environ if k.startswith("PL_")]:
                        del os.environ[key]
                    run_failure.CASE = case
                    run_failure.main()
                    code = 0
                except BaseException:  # noqa: BLE001 - what an uncaught exception prints
                    traceback.print_exc()
                finally:
                    sys.stderr.flush()
                    os._exit(code)
            running[(case, rank)] = (pid, err_path, time.monotonic())
    results: dict[str, list[tuple[int, float, str]]] = {case: [] for case in CASES}
    for (case, _rank), (pid, err_path, start) in running.items():
        code = _wait(pid, deadline=start + 300)
        results[case].append((code, time.monotonic() - start, err_path.read_text()))
    return results


def _wait(pid: int, deadline: float) -> int:
    """The exit code of a forked rank (a signal as its negative); past ``deadline`` it is
    killed: -9."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@pytest.mark.parametrize("case", list(CASES))
def test_every_rank_stops_with_the_original_message(outcomes, case: str) -> None:
    for rank, (code, seconds, err) in enumerate(outcomes[case]):
        # A rank still waiting after 300 s (gloo's own timeout is 30 minutes) is killed: -9.
        assert code not in (0, None, -9), (rank, code, seconds, err[-2000:])
        assert "SlideParallelError" in err, (rank, err[-2000:])
        assert CASES[case] in err, (rank, err[-2000:])
