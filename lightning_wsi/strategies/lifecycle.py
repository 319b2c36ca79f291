"""Start and end of a slide-parallel run: launchers that fork safely, process groups torn down.

Two things must hold whatever the user's script or shell does:

- **A run leaves no process group behind.** After ``fit`` (or validate/test/predict) on N
  processes, a script may go on with a *new* one-device Trainer on rank 0 while rank 1 has
  exited. Lightning's ``prepare_data`` barrier creates a gloo group whenever
  ``torch.distributed`` is initialised, and that group waits for rank 1 forever. So the
  strategy destroys the groups it created at the end of every run (``leave_process_group``).
  The next run on the same Trainer (or a new slide-parallel Trainer in the same processes)
  joins again. A plain re-``init_process_group`` on the same ``MASTER_PORT`` races: rank 1
  may reach the next rendezvous while rank 0 still serves the old store, read the old run's
  keys and fail with "Connection reset by peer". ``join_process_group`` therefore keeps each
  process's rendezvous store (rank 0's server stays up) and gives every run its own key prefix.
- **Forked ranks neither deadlock nor crowd each other in OpenMP.** PyTorch's Linux wheels use
  GNU OpenMP (libgomp), which is not fork-safe: once the parent's main thread has run a parallel
  region (any large-enough tensor op, e.g. a notebook previewing a batch), a forked child that
  runs one with more than one thread waits forever at a barrier for pool threads that fork did
  not copy (py-spy: both ranks in ``libgomp.so.1`` under the first ``torch.cat`` of
  ``_sync_module_states``). Lightning sets one thread per rank, which hides this, only when
  ``OMP_NUM_THREADS`` is unset; clusters and many shells export it. ``ForkSafeLauncher``
  releases the parent's pool just before forking (``omp_pause_resource_all``, OpenMP 5.0), so
  that each child starts its own, and gives each child at most its share of the CPUs
  (``rank_threads``): the variable sized the one process the user started, which the launcher
  splits into N ranks on the same CPUs. Honoured as it is, ``OMP_NUM_THREADS=2`` on 2 cores
  with 2 ranks oversubscribes them, and libgomp's spin-waiting made the quickstart notebook
  take 314 s instead of 36-79 s (one thread per rank) on the same shared machine. Setting
  threads in the parent before the fork does not help: the pool outlives
  ``torch.set_num_threads(1)``.

With ``slide_group_size`` the strategy also creates, every run, one process group per slide group
(and a gloo twin for host values when the backend is not gloo) and one per "column" (the ranks
with the same rank in their group, one from each group) for metrics: ``new_slide_groups``. They go
with the others at the end of the run.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.utilities.distributed import (
    _init_dist_connection,
    _suggested_max_num_threads,
)
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import (
    _MultiProcessingLauncher,
)
from lightning.pytorch.strategies.launchers.launcher import _Launcher
from lightning.pytorch.trainer.states import TrainerStatus
from typing_extensions import override

from lightning_wsi.data.sampling import SlideGroup

__all__ = [
    "ForkSafeLauncher",
    "SlideProcessGroups",
    "join_process_group",
    "launcher_for",
    "leave_process_group",
    "new_slide_groups",
    "rank_threads",
    "release_openmp_threads",
]

_OMP_PAUSE_HARD = 2  # omp_pause_resource_t: omp_pause_soft = 1, omp_pause_hard = 2


# ---------------------------------------------------------------------- OpenMP and fork


def _loaded_gnu_openmp() -> list[Path]:
    """Paths of the GNU OpenMP runtimes mapped into this process (none off Linux)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    paths = {line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}
    return sorted(Path(p) for p in paths if p.startswith("/"))


def release_openmp_threads() -> bool:
    """Free the calling thread's GNU OpenMP thread pool, so that a child forked next can start
    its own; the next parallel region here starts a new pool. Call it on the thread that forks.

    Returns:
        True if no GNU OpenMP runtime is loaded or every one released its pool; False if one
        lacks ``omp_pause_resource_all`` or refused (a child may then use one thread only).
    """
    released = True
    for path in _loaded_gnu_openmp():
        try:
            library = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD)
            pause = library.omp_pause_resource_all
        except (OSError, AttributeError):
            released = False
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        released = pause(_OMP_PAUSE_HARD) == 0 and released
    return released


def rank_threads(num_processes: int) -> int:
    """Intra-op threads for one of ``num_processes`` ranks started on this machine's CPUs:
    ``OMP_NUM_THREADS`` (its first level) where set and valid, but at most the rank's share of
    the CPUs, ``cpus // num_processes`` (Lightning's choice when the variable is unset)."""
    share = _suggested_max_num_threads(max(num_processes, 1))
    requested = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if not requested.isdigit() or int(requested) < 1:
        return share
    return min(int(requested), share)


class ForkSafeLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork/forkserver launcher whose ranks get their share of the CPUs
    (``rank_threads``) and, with fork, start without the parent's OpenMP pool
    (``release_openmp_threads``; one thread each where it could not be released)."""

    def __init__(self, strategy: DDPStrategy, start_method: str = "spawn") -> None:
        super().__init__(strategy, start_method=start_method)  # type: ignore[arg-type]
        self._one_thread = False

    @override
    def launch(self, function: Callable, *args: Any, trainer: L.Trainer | None = None,
               **kwargs: Any) -> Any:  # fmt: skip
        if self._start_method == "fork":
            self._one_thread = not release_openmp_threads()
        return super().launch(function, *args, trainer=trainer, **kwargs)

    @override
    def _wrapping_function(self, process_idx: int, *args: Any, **kwargs: Any) -> None:
        # In the child, before any torch op and before Lightning's own (unset-only) setting.
        threads = 1 if self._one_thread else rank_threads(self._strategy.num_processes)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        super()._wrapping_function(process_idx, *args, **kwargs)


def launcher_for(strategy: DDPStrategy) -> _Launcher:
    """The launcher ``DDPStrategy._configure_launcher`` would choose, fork-safe.

    ``"popen"`` re-runs the script (fresh processes, nothing inherited); the other start methods
    go through ``ForkSafeLauncher``.
    """
    environment = strategy.cluster_environment
    assert environment is not None
    start_method = strategy._start_method
    if start_method == "popen":
        from lightning_wsi.strategies.hydra_launch import HydraJobLauncher

        # Lightning's re-run of the command, except that a sweep's job re-runs only that job.
        return HydraJobLauncher(environment, strategy.num_processes, strategy.num_nodes)
    return ForkSafeLauncher(strategy, start_method=start_method)


# ---------------------------------------------------------------------- process groups


@dataclass
class _Rendezvous:
    """One process's store for a (address, port, world size, rank) and how often it was used."""

    store: dist.Store
    joins: int = 0


_RENDEZVOUS: dict[tuple[str, int, int, int], _Rendezvous] = {}


def _rendezvous(address: str, port: int, world: int, rank: int, timeout: Any) -> _Rendezvous:
    """This process's store for the address and port (torch's ``env://`` rendezvous, run once;
    rank 0 serves it, or torchrun's agent does)."""
    key = (address, port, world, rank)
    if key not in _RENDEZVOUS:
        options = {} if timeout is None else {"timeout": timeout}
        store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world, **options))
        if timeout is not None:
            store.set_timeout(timeout)
        _RENDEZVOUS[key] = _Rendezvous(store)
    return _RENDEZVOUS[key]


def join_process_group(strategy: DDPStrategy) -> bool:
    """Initialise the default process group for this run, if nobody has, on this process's kept
    store under a key prefix of its own (see the module docstring). Call it at the start of
    ``setup_distributed``; Lightning's own set-up then finds the group and keeps it.

    Returns:
        Whether the default group is the strategy's: True unless torch.distributed was
        initialised already (by the user or another strategy), whose group is left alone.
    """
    if not dist.is_available() or dist.is_initialized():
        return False
    strategy.set_world_ranks()
    environment = strategy.cluster_environment
    assert environment is not None
    rank, world = environment.global_rank(), environment.world_size()
    if world == 1:
        return True  # one process cannot race itself: Lightning's usual store, freed at the end
    address, port = environment.main_address, environment.main_port
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)
    timeout = strategy._timeout
    rendezvous = _rendezvous(address, port, world, rank, timeout)
    store = dist.PrefixStore(f"lightning_wsi/run{rendezvous.joins}", rendezvous.store)
    rendezvous.joins += 1
    device = strategy.root_device
    options: dict[str, Any] = {"store": store}
    options["device_id"] = device if device.type != "cpu" else None  # as DDPStrategy passes it
    if timeout is not None:
        options["timeout"] = timeout
    _init_dist_connection(
        environment, strategy._get_process_group_backend(), rank, world, **options
    )
    return True


@dataclass
class SlideProcessGroups:
    """This rank's process groups for its slide group; ``None`` means the world's default group.

    Attributes:
        device: The ranks sharing this rank's slide: features, dL/df, outputs (device backend).
        host: The same ranks for host values (gloo); the world's host group with one group.
        metrics: This rank's column, one rank of every slide group: metric states gathered over
            it count every slide once. ``None`` with one group (metrics stay local).
        created: This rank's groups made here, to destroy at the end of the run.
    """

    device: dist.ProcessGroup | None = None
    host: dist.ProcessGroup | None = None
    metrics: dist.ProcessGroup | None = None
    created: list[dist.ProcessGroup] = field(default_factory=list)


def new_slide_groups(
    group: SlideGroup, world_host: dist.ProcessGroup | None, default_is_gloo: bool
) -> SlideProcessGroups:
    """Create the process groups of slide groups of ``group.size`` ranks; collective on the world.

    Every rank creates every group, in the same order (``torch.distributed.new_group``'s rule):
    the slide groups (consecutive ranks), their gloo twins unless the default backend is gloo
    and carries host values itself, then the columns. One group of all ranks creates
    nothing: the world's groups serve, as without groups.

    Args:
        group: This rank's place (``data.sampling.slide_group``).
        world_host: The world's host group (``None``: the default group is gloo).
        default_is_gloo: The default backend is gloo (device groups carry host values too).
    """
    if group.count == 1:
        return SlideProcessGroups(host=world_host)
    mine = SlideProcessGroups()
    for g in range(group.count):  # a rank outside a group gets a placeholder from new_group
        ranks = list(range(g * group.size, (g + 1) * group.size))
        device = dist.new_group(ranks)
        host = device if default_is_gloo else dist.new_group(ranks, backend="gloo")
        if g == group.index:
            mine.device, mine.host = device, host
            mine.created += [device] if host is device else [device, host]
    if group.size == 1:
        return mine  # one rank per slide group: the columns are the world
    for column in range(group.size):
        members = dist.new_group([g * group.size + column for g in range(group.count)])
        if column == group.rank:
            mine.metrics = members
            mine.created.append(members)
    return mine


def _run_failed(strategy: DDPStrategy) -> bool:
    """Whether the run is ending on an exception (Lightning marks it interrupted first)."""
    module = strategy.lightning_module
    trainer = getattr(module, "_trainer", None) if module is not None else None
    return trainer is not None and trainer.state.status == TrainerStatus.INTERRUPTED


def leave_process_group(
    strategy: DDPStrategy,
    owned: bool,
    extra: dist.ProcessGroup | Sequence[dist.ProcessGroup | None] | None = None,
) -> None:
    """End of a run: destroy every process group if the strategy owns the default one, else
    only ``extra`` (its own groups: the gloo host group, slide groups). Call it in
    ``teardown``, on every rank.

    After a normal end the ranks first meet at a barrier, so no rank destroys a group a peer is
    still using; after an exception they do not (a peer may never arrive).
    """
    groups = [extra] if isinstance(extra, dist.ProcessGroup) else list(extra or ())
    groups = [g for g in groups if g is not None and g != dist.GroupMember.NON_GROUP_MEMBER]
    if not (dist.is_available() and dist.is_initialized()) or not (owned or groups):
        return
    try:
        if not _run_failed(strategy):
            strategy.barrier("lightning_wsi.teardown")
    finally:
        if owned:
            dist.destroy_process_group()
        else:
            for group in dict.fromkeys(groups):  # a group listed twice is destroyed once
                dist.destroy_process_group(group)
