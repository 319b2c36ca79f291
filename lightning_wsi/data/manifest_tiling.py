"""Tile every slide of a manifest in parallel processes, with a progress bar and a summary.

Run once before training (``SlideDataModule.prepare_data`` does, on one process per node) so the
coordinate cache is warm when every rank's ``setup`` reads it.

A worker process killed by the operating system (the out-of-memory killer, a crash inside a
codec) breaks the whole process pool. The slides whose tiling had started in it are retried one
at a time in a fresh process each: the one that dies again becomes a :class:`SlideError` naming
it, the others tile; slides that had not started are tiled in a fresh pool. The pool is sized to
the memory available (``WORKER_MEMORY_BYTES`` per worker), not only to the cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from lightning_wsi.data.external_tiling import read_external_tiling
from lightning_wsi.data.processes import stop_forkserver, worker_context
from lightning_wsi.data.slide import SlideError, out_of_memory
from lightning_wsi.data.tiling import SlideTiles, tile_slide

__all__ = ["WORKER_MEMORY_BYTES", "SlideJob", "TilingSummary", "available_memory", "tile_many"]

# Memory one tiling worker may need at its peak, beyond what it shares with the forkserver it was
# forked from (the imports: ~0.8 GB resident, as lightning_wsi pulls in torch, shared
# copy-on-write): one thumbnail band (32 MiB RGBA, a few copies while it is reduced), OpenSlide's
# tile cache, the thumbnail and tissue-mask arrays (at most 2**24 px, a few bytes each). Measured:
# 0.23 GB above the imports for a 30,000 x 30,000 single-level TIFF; 1 GiB leaves headroom for
# the largest masks and other codecs.
WORKER_MEMORY_BYTES = 1 << 30
# Seconds a dead tiling worker may go unnoticed by its pool before the pool is broken by hand.
DEATH_GRACE_S = 10.0

Tiler = Callable[..., SlideTiles]


@dataclass(frozen=True)
class SlideJob:
    """One slide to tile: its id, path and optional mpp override."""

    slide_id: str
    path: str
    slide_mpp: float | None = None
    coords: str | None = None  # the slide's own tiling (CLAM/TRIDENT .h5, x,y CSV): no detection


@dataclass
class TilingSummary:
    """What a tiling run found: ``results[i]`` holds job i's tiles or the error that stopped it."""

    results: list[SlideTiles | SlideError]
    seconds: float

    @property
    def n_tiles(self) -> int:
        return sum(len(r) for r in self.results if isinstance(r, SlideTiles))

    @property
    def n_failed(self) -> int:
        return sum(isinstance(r, SlideError) for r in self.results)

    @property
    def n_without_tissue(self) -> int:
        return sum(isinstance(r, SlideTiles) and len(r) == 0 for r in self.results)

    @property
    def n_cached(self) -> int:
        return sum(isinstance(r, SlideTiles) and r.from_cache for r in self.results)

    @property
    def cache_errors(self) -> list[str]:
        """Why cache entries could not be written, one per slide concerned (tiles still valid)."""
        return [r.cache_error for r in self.results if isinstance(r, SlideTiles) and r.cache_error]

    def __str__(self) -> str:
        n = len(self.results)
        uncached = f", {len(self.cache_errors)} not cached" if self.cache_errors else ""
        return (
            f"tiled {n} slides in {self.seconds:.1f} s ({self.n_cached} from cache{uncached}): "
            f"{self.n_tiles} tiles, {self.n_without_tissue} slides without tissue, "
            f"{self.n_failed} unreadable"
        )


def available_memory() -> int | None:
    """Bytes this process can still allocate: the smaller of the machine's ``MemAvailable``
    and the cgroup's (container, SLURM job) limit less its usage; ``None`` if unknown."""
    candidates = [_meminfo_available(), _cgroup_available()]
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


def tile_many(
    jobs: Sequence[SlideJob],
    *,
    num_workers: int | None = None,
    progress: bool = True,
    tiler: Tiler = tile_slide,
    **tile_kwargs: Any,
) -> TilingSummary:
    """Tile ``jobs`` with :func:`~lightning_wsi.data.tiling.tile_slide` in worker processes.

    Args:
        jobs: the slides, in the order results are returned.
        num_workers: processes; ``None`` uses every core. Either way at most one per
            ``WORKER_MEMORY_BYTES`` of available memory; 0 or 1 tiles in this process.
        progress: show a progress bar.
        tiler: the function called per slide as ``tiler(path, slide_mpp=..., slide_id=...,
            **tile_kwargs)``; a module-level function (it is pickled to the workers).
        **tile_kwargs: ``mpp``, ``tile_size``, ``cache_dir``, ... for ``tile_slide``.

    Returns:
        A :class:`TilingSummary` whose ``results`` hold a :class:`SlideTiles` or the
        :class:`SlideError` of each job: one bad slide (even one whose worker is killed) never
        stops the others.
    """
    start = time.perf_counter()
    workers = _pool_size(num_workers, len(jobs), available_memory())
    bar = tqdm(total=len(jobs), desc="tiling slides", unit="slide", disable=not progress)
    results: list[SlideTiles | SlideError | None] = [None] * len(jobs)
    if workers <= 1 or len(jobs) <= 1:
        for i, job in enumerate(jobs):
            results[i] = _tile_job(job, tiler, tile_kwargs)
            bar.update()
    else:
        _tile_in_pools(jobs, results, workers, tiler, tile_kwargs, bar)
    bar.close()
    done = [r for r in results if r is not None]
    return TilingSummary(results=done, seconds=time.perf_counter() - start)


def _tile_in_pools(
    jobs: Sequence[SlideJob],
    results: list[SlideTiles | SlideError | None],
    workers: int,
    tiler: Tiler,
    tile_kwargs: dict[str, Any],
    bar: tqdm,
) -> None:
    """Fill ``results`` using pools of ``workers`` processes, surviving killed workers.

    Each round runs the pending jobs in a fresh pool. If the pool breaks, the jobs that had
    started (their marker file survives the kill) run alone, one fresh process each; the ones
    that had not started go to the next round. Every round finishes at least one job.
    """
    # A forkserver preloading the tiling code (plain fork only for a script without a main
    # guard): forking a process with threads can deadlock the child (processes.py).
    context = worker_context(["lightning_wsi.data.tiling"])
    markers = Path(tempfile.mkdtemp(prefix="lightning-wsi-tiling-"))
    try:
        pending = list(range(len(jobs)))
        while pending:
            pool = _Pool(workers, context, markers, tiler, tile_kwargs)
            broken = pool.run(jobs, pending, results, bar)
            started = {i for i in broken if (markers / str(i)).exists()} or set(broken)
            for i in sorted(started):
                results[i] = _run_alone(jobs[i], context, tiler, tile_kwargs)
                (markers / str(i)).unlink(missing_ok=True)
                bar.update()
            pending = [i for i in broken if i not in started]
    finally:
        shutil.rmtree(markers, ignore_errors=True)


@dataclass
class _Pool:
    """How one round's process pool runs jobs: its size, start context and job function."""

    workers: int
    context: Any
    markers: Path
    tiler: Tiler
    tile_kwargs: dict[str, Any]

    def run(
        self,
        jobs: Sequence[SlideJob],
        pending: list[int],
        results: list[SlideTiles | SlideError | None],
        bar: tqdm,
    ) -> list[int]:
        """Run ``pending`` jobs in a fresh pool; fill their results; return those it lost."""
        broken = []
        with ProcessPoolExecutor(min(self.workers, len(pending)), mp_context=self.context) as pool:
            futures = {}
            for i in pending:
                marker = str(self.markers / str(i))
                futures[i] = pool.submit(_tile_job, jobs[i], self.tiler, self.tile_kwargs, marker)
                futures[i].add_done_callback(_count_success(bar))
            _watch(pool, list(futures.values()))
            for i, future in futures.items():
                try:
                    results[i] = future.result()
                except BrokenProcessPool:
                    broken.append(i)
        return broken


def _watch(pool: ProcessPoolExecutor, futures: list[Future]) -> None:
    """Wait for ``futures``; if a worker is dead for ``DEATH_GRACE_S`` seconds while the pool
    still counts it alive, make its death visible: kill the pool's processes and its forkserver.

    The pool learns of a dead worker from a pipe its forkserver writes the exit code to. Once,
    under heavy load, that never came: the pool waited forever for a worker killed mid-slide.
    Killing the server closes those pipes, so the pool breaks as it should (its lost jobs run
    again, each alone) and the next pool starts a new server.
    """
    dead_since: float | None = None
    while not all(f.done() for f in futures):
        wait(futures, timeout=min(1.0, DEATH_GRACE_S))
        processes = dict(getattr(pool, "_processes", None) or {})
        if getattr(pool, "_broken", False) or not any(_is_dead(p) for p in processes):
            dead_since = None
            continue
        dead_since = dead_since or time.monotonic()
        if time.monotonic() - dead_since >= DEATH_GRACE_S:
            for pid in processes:
                if not _is_dead(pid):
                    _kill(pid)
            stop_forkserver()
            dead_since = None


def _is_dead(pid: int) -> bool:
    """A process that has exited: gone, or a zombie nobody reaped (Linux ``/proc``; elsewhere
    only a gone process counts)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _count_success(bar: tqdm) -> Callable[[Future], None]:
    """A done-callback that moves the bar for a finished job (not for one a broken pool lost,
    which is counted when it is retried)."""

    def update(future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            bar.update()

    return update


def _run_alone(
    job: SlideJob, context: Any, tiler: Tiler, tile_kwargs: dict[str, Any]
) -> SlideTiles | SlideError:
    """Tile one slide in a fresh process of its own; its death is this slide's error."""
    try:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            future = pool.submit(_tile_job, job, tiler, tile_kwargs)
            _watch(pool, [future])
            return future.result()
    except BrokenProcessPool:
        return SlideError(
            f"slide {job.slide_id!r}: the tiling worker process died while tiling {job.path} "
            "(killed by the operating system, most often the out-of-memory killer, or a crash "
            "in a codec); free memory or use fewer tiling workers, or check the file"
        )


def _tile_job(
    job: SlideJob, tiler: Tiler, tile_kwargs: dict[str, Any], marker: str | None = None
) -> SlideTiles | SlideError:
    """Tile one job, its failure returned as a :class:`SlideError`. ``marker`` is a file that
    exists while the job runs, so a job whose process is killed can be told apart."""
    if marker is not None:
        Path(marker).touch()
    kwargs = dict(tile_kwargs)
    mismatch = kwargs.pop("allow_patch_size_mismatch", False)
    try:
        if job.coords is not None:
            return read_external_tiling(
                job.coords, job.path, kwargs["mpp"], kwargs["tile_size"],
                slide_mpp=job.slide_mpp, slide_id=job.slide_id,
                allow_patch_size_mismatch=mismatch,
                allow_upsampling=kwargs.get("allow_upsampling", False),
            )  # fmt: skip
        return tiler(job.path, slide_mpp=job.slide_mpp, slide_id=job.slide_id, **kwargs)
    except SlideError as err:
        return err
    except MemoryError:
        return SlideError(out_of_memory(job.slide_id, job.path, "tiling it"))
    except Exception as err:  # a corrupt pyramid can fail deep inside OpenSlide or PIL
        return SlideError(
            f"slide {job.slide_id!r}: tiling {job.path} failed ({type(err).__name__}: {err})"
        )
    finally:
        if marker is not None:
            Path(marker).unlink(missing_ok=True)


def _pool_size(requested: int | None, n_jobs: int, memory: int | None) -> int:
    """Worker processes: as requested (default: every core), at most one per job and one per
    ``WORKER_MEMORY_BYTES`` of ``memory`` (unknown: no cap), at least 1; 0 means "in this
    process"."""
    if requested is not None and requested <= 0:
        return 0
    wanted = requested if requested is not None else (os.cpu_count() or 1)
    by_memory = wanted if memory is None else max(1, memory // WORKER_MEMORY_BYTES)
    return max(1, min(wanted, n_jobs, by_memory))


def _meminfo_available() -> int | None:
    """``MemAvailable`` from /proc/meminfo (Linux), else free physical pages; ``None``."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """A cgroup v2 memory limit less current usage (containers, SLURM), or ``None``."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        usage = int(Path("/sys/fs/cgroup/memory.current").read_text())
        return max(0, int(limit) - usage)
    except (OSError, ValueError):
        return None
