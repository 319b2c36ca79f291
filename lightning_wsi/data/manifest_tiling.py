"""Tile every slide of a manifest in parallel processes, with a progress bar and a summary.

Run once before training (``SlideDataModule.prepare_data`` does, on one process per node) so the
coordinate cache is warm when every rank's ``setup`` reads it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from lightning_wsi.data.processes import worker_context
from lightning_wsi.data.slide import SlideError
from lightning_wsi.data.tiling import SlideTiles, tile_slide

__all__ = ["SlideJob", "TilingSummary", "tile_many"]


@dataclass(frozen=True)
class SlideJob:
    """One slide to tile: its id, path and optional mpp override."""

    slide_id: str
    path: str
    slide_mpp: float | None = None


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

    def __str__(self) -> str:
        n = len(self.results)
        return (
            f"tiled {n} slides in {self.seconds:.1f} s ({self.n_cached} from cache): "
            f"{self.n_tiles} tiles, {self.n_without_tissue} slides without tissue, "
            f"{self.n_failed} unreadable"
        )


def tile_many(
    jobs: Sequence[SlideJob],
    *,
    num_workers: int | None = None,
    progress: bool = True,
    **tile_kwargs: Any,
) -> TilingSummary:
    """Tile ``jobs`` with :func:`~lightning_wsi.data.tiling.tile_slide` in worker processes.

    Args:
        jobs: the slides, in the order results are returned.
        num_workers: processes; ``None`` uses every core, 0 tiles in this process.
        progress: show a progress bar.
        **tile_kwargs: ``mpp``, ``tile_size``, ``cache_dir``, ... for ``tile_slide``.

    Returns:
        A :class:`TilingSummary` whose ``results`` hold a :class:`SlideTiles` or the
        :class:`SlideError` of each job: one bad slide never stops the others.
    """
    start = time.perf_counter()
    if num_workers is None:
        num_workers = min(len(jobs), os.cpu_count() or 1)
    bar = tqdm(total=len(jobs), desc="tiling slides", unit="slide", disable=not progress)
    if num_workers <= 1 or len(jobs) <= 1:
        results = []
        for job in jobs:
            results.append(_tile_job(job, tile_kwargs))
            bar.update()
    else:
        # A forkserver preloading the tiling code (plain fork only for a script without a main
        # guard): forking a process with threads can deadlock the child (processes.py).
        context = worker_context(["lightning_wsi.data.tiling"])
        with ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            futures = [pool.submit(_tile_job, job, tile_kwargs) for job in jobs]
            for future in futures:
                future.add_done_callback(lambda _: bar.update())
            results = [future.result() for future in futures]
    bar.close()
    return TilingSummary(results=results, seconds=time.perf_counter() - start)


def _tile_job(job: SlideJob, tile_kwargs: dict[str, Any]) -> SlideTiles | SlideError:
    try:
        return tile_slide(job.path, slide_mpp=job.slide_mpp, slide_id=job.slide_id, **tile_kwargs)
    except SlideError as err:
        return err
    except Exception as err:  # a corrupt pyramid can fail deep inside OpenSlide or PIL
        return SlideError(
            f"slide {job.slide_id!r}: tiling {job.path} failed ({type(err).__name__}: {err})"
        )
