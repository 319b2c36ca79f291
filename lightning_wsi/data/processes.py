"""How the data pipeline starts worker processes: from a forkserver where it is safe.

A training process has threads (gloo's, multiprocessing queue feeders, tqdm's monitor). CPython
3.11 can deadlock a child forked while another thread is ending: the child waits forever in
``PyOS_AfterFork_Child`` for the runtime's thread-state lock (seen twice in the 2-process command
test: rank 1's new DataLoader worker stuck there, under gdb). Workers that fork from a
single-threaded forkserver cannot meet that. A forkserver child imports the main module first, so
it is used when that is harmless: no main file (a notebook, a REPL, ``python -m``-style
``__main__`` packages) or a script with an ``if __name__ == "__main__":`` guard. A script without
the guard keeps plain fork, and is told once how to get the safe start.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import re
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["stop_forkserver", "worker_context"]

_GUARD = re.compile(r"""__name__\s*==\s*['"]__main__['"]""")
_warned = False


def worker_context(preload: Sequence[str]) -> multiprocessing.context.BaseContext | None:
    """The multiprocessing context for data workers: a forkserver preloading ``preload`` (so each
    worker starts in milliseconds), or fork where the main module must not be imported again;
    ``None`` (the platform default) where neither exists."""
    methods = multiprocessing.get_all_start_methods()
    if "forkserver" in methods and _main_is_safe_to_import():
        _forget_a_parents_forkserver()
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(list(preload))
        return context
    if "fork" in methods:
        _warn_once()
        return multiprocessing.get_context("fork")
    return None


def _forget_a_parents_forkserver() -> None:
    """Let a forked process start a forkserver of its own.

    A process forked from one that started a forkserver (a rank of ``slide_parallel_notebook``
    or ``start_method="fork"`` after tiling, which uses one) inherits the record of that
    server, and CPython 3.11's ``ensure_running`` then waits on a process that is not its child:
    ``ChildProcessError`` at its first DataLoader worker. The record is reset (and a server
    that has died is reaped), so the next worker start launches this process's own server.
    """
    from multiprocessing import forkserver

    server = forkserver._forkserver  # the module's singleton: its functions are bound to it
    with server._lock:
        pid = server._forkserver_pid
        if pid is None:
            return
        try:
            ended, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not ours: the parent's server
            ended = pid
        if not ended:
            return  # our own server, still running
        _forget(server)


def stop_forkserver() -> None:
    """Kill this process's forkserver, if it started one, wait for it and forget it: the next
    worker start launches a new server. For a server that no longer reports its children's
    deaths (``manifest_tiling``); killing it closes the pipes a pool waits on."""
    from multiprocessing import forkserver

    server = forkserver._forkserver
    with server._lock:
        pid = server._forkserver_pid
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass  # gone already, or a parent's (not ours to wait for)
        _forget(server)


def _forget(server: Any) -> None:
    """Reset CPython's forkserver record (its pid, socket address and liveness pipe)."""
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
    server._forkserver_address = None
    server._forkserver_alive_fd = None
    server._forkserver_pid = None


def _main_is_safe_to_import() -> bool:
    main = sys.modules.get("__main__")
    spec_name = getattr(getattr(main, "__spec__", None), "name", None) or ""
    path = getattr(main, "__file__", None)
    if path is None or spec_name.endswith("__main__"):
        return True  # nothing to import again (multiprocessing skips `pkg.__main__`)
    try:
        return _GUARD.search(Path(path).read_text(errors="replace")) is not None
    except OSError:
        return False


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f'{sys.modules["__main__"].__file__} has no `if __name__ == "__main__":` guard, '
            "so lightning-wsi starts data workers by forking the process, which can deadlock a "
            "worker when the process has threads (CPython 3.11). Put the script's work under "
            "that guard to start workers from a forkserver instead.",
            stacklevel=3,
        )
