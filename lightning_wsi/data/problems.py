"""What a run lost, and why: one record of every bad slide, left-out tile and dropped slide.

A bad tile costs a tile, a bad slide costs a slide, nothing costs the run, and every loss is
written down. The pieces:

- A loaded slide (a batch) says what went wrong while reading it under three keys:
  ``tile_problems`` (a list of ``{"x", "y", "error"}``: tiles left out of this step after a
  retry), ``max_bad_tiles`` (how many left-out tiles the whole sample tolerates) and
  ``slide_problem`` (a reason when the slide cannot be used in this step: its file vanished,
  it cannot be reopened, or too many of its tiles failed). :func:`slide_problem` gives the
  verdict for a batch; a slide-parallel strategy gives it for the sum over ranks and writes the
  merged record back into every rank's batch (:func:`merge_into_batch`).
- :class:`ProblemLog` collects records (deduplicated, with a count), remembers dropped slides so
  the sampler stops loading them, and writes ``problems.csv``.
- :class:`ProblemRecorder`, a Lightning callback that ``SlideDataModule`` attaches to its
  trainer, records every batch's problems, merges the ranks' logs of a data-parallel run and
  prints one plain line at the end of every fit, validate, test and predict.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = [
    "DEFAULT_MAX_BAD_TILE_FRACTION",
    "Problem",
    "ProblemLog",
    "ProblemRecorder",
    "dropped_prediction",
    "max_bad_tiles",
    "merge_into_batch",
    "set_slide_problem",
    "slide_problem",
]

# A slide whose sampled tiles fail to read in more than this share (after one retry each) is
# dropped for the rest of the run: a few broken JPEG tiles are a damaged file, this many is a
# broken one whose remaining tiles are not a fair sample of the slide.
DEFAULT_MAX_BAD_TILE_FRACTION = 0.1

_CSV_FIELDS = ("kind", "slide_id", "path", "x", "y", "stage", "epoch", "count", "reason")


@dataclass
class Problem:
    """One thing a run lost.

    Attributes:
        kind: ``"bad slide"`` (unusable at setup), ``"tile left out"``, ``"slide dropped"``,
            ``"cache"`` (coordinates could not be cached) or ``"heatmap"``.
        slide_id: The slide's manifest id.
        path: The slide file.
        reason: What actually happened.
        x: Level-0 x of a left-out tile.
        y: Level-0 y of a left-out tile.
        stage: ``setup``, ``train``, ``val``, ``test``, ``predict`` or ``report``.
        epoch: Training epoch where it first happened, if any.
        count: How many times it happened (a tile that fails every epoch is one record).
    """

    kind: str
    slide_id: str
    path: str
    reason: str
    x: int | None = None
    y: int | None = None
    stage: str = ""
    epoch: int | None = None
    count: int = 1

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.slide_id, self.x, self.y)

    def __str__(self) -> str:
        where = f" tile at level-0 ({self.x}, {self.y})" if self.x is not None else ""
        return f"{self.kind}: {self.slide_id} ({self.path}){where}: {self.reason}"


class ProblemLog:
    """Every problem of a run, once each, in the order they first happened."""

    def __init__(self) -> None:
        self._records: dict[tuple[Any, ...], Problem] = {}

    def add(self, problem: Problem) -> None:
        """Record ``problem``; a repeat only raises the count of the first record."""
        known = self._records.get(problem.key)
        if known is None:
            self._records[problem.key] = problem
        else:
            known.count += problem.count

    def extend(self, problems: Iterable[Problem]) -> None:
        for problem in problems:
            self.add(problem)

    @property
    def records(self) -> list[Problem]:
        return list(self._records.values())

    @property
    def dropped(self) -> dict[str, str]:
        """Slides dropped for the rest of the run: ``{slide_id: reason}``."""
        return {p.slide_id: p.reason for p in self._records.values() if p.kind == "slide dropped"}

    def counts(self) -> dict[str, int]:
        """Records per kind."""
        out: dict[str, int] = {}
        for problem in self._records.values():
            out[problem.kind] = out.get(problem.kind, 0) + 1
        return out

    def summary_line(self, where: str | os.PathLike | None = None) -> str:
        """One plain line: what was lost, and where the list is."""
        counts = self.counts()
        if not counts:
            return "problems: none (no slide or tile was skipped)"
        names = {"bad slide": "bad slides at setup", "tile left out": "tiles left out",
                 "slide dropped": "slides dropped", "cache": "slides not cached",
                 "heatmap": "heatmaps not drawn"}  # fmt: skip
        parts = ", ".join(f"{n} {names.get(k, k)}" for k, n in counts.items())
        return f"problems: {parts}" + (f"; listed in {where}" if where else "")

    def as_dicts(self) -> list[dict[str, Any]]:
        return [asdict(p) for p in self._records.values()]

    def write_csv(self, path: str | os.PathLike) -> Path:
        """``problems.csv``: one row per record (header only when nothing was lost)."""
        path = Path(path)
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=_CSV_FIELDS)
            writer.writeheader()
            for record in self.as_dicts():
                writer.writerow({k: record[k] for k in _CSV_FIELDS})
        return path


def max_bad_tiles(num_tiles: int, fraction: float) -> int:
    """How many of a sample's ``num_tiles`` tiles may fail before the slide is dropped."""
    return math.floor(fraction * num_tiles)


def slide_problem(
    bad_tiles: int, num_tiles: int, tolerated: int, reported: str | None = None
) -> str | None:
    """The reason a slide cannot be used in this step, or ``None``.

    Args:
        bad_tiles: Tiles of the sample left out (all ranks together).
        num_tiles: Size of the whole sample.
        tolerated: ``max_bad_tiles`` of the sample.
        reported: A reason a loader already gave (the file vanished or cannot be reopened).
    """
    if reported:
        return reported
    if num_tiles and bad_tiles >= num_tiles:
        return f"every one of the {num_tiles} sampled tiles failed to read"
    if bad_tiles > tolerated:
        return (
            f"{bad_tiles} of {num_tiles} sampled tiles failed to read, more than the "
            f"{tolerated} that max_bad_tile_fraction tolerates"
        )
    return None


def merge_into_batch(
    batch: MutableMapping[str, Any], tile_problems: list[dict[str, Any]], problem: str | None
) -> None:
    """Write the problems of the whole sample (every rank's) into this rank's ``batch``."""
    batch["tile_problems"] = tile_problems
    batch["slide_problem"] = problem


def set_slide_problem(batch: Mapping[str, Any], problem: str | None) -> None:
    """Write a slide's verdict into its batch as ``slide_problem``, for the problem record (a
    mapping the loader made; a read-only one is left alone)."""
    if isinstance(batch, MutableMapping):
        batch["slide_problem"] = problem


def dropped_prediction(batch: Mapping[str, Any]) -> dict[str, Any]:
    """What predict returns for a slide that could not be used: its id, status and reason."""
    return {
        "slide_id": batch.get("slide_id"),
        "status": "dropped",
        "reason": batch.get("slide_problem") or "no tile could be read",
    }


def _batch_problems(
    batch: Any, stage: str, epoch: int | None, paths: Mapping[str, str]
) -> list[Problem]:
    if not isinstance(batch, Mapping):
        return []
    slide_id = str(batch.get("slide_id"))
    path = paths.get(slide_id, "")
    found = []
    for p in batch.get("tile_problems") or ():
        tile_slide = str(p.get("slide_id", slide_id))  # a patient bag names the slide
        found.append(
            Problem(
                "tile left out",
                tile_slide,
                paths.get(tile_slide, path),
                str(p.get("error")),
                int(p["x"]),
                int(p["y"]),
                stage,
                epoch,
            )  # fmt: skip
        )
    if batch.get("slide_problem"):
        found.append(
            Problem(
                "slide dropped",
                slide_id,
                path,
                str(batch["slide_problem"]),
                None,
                None,
                stage,
                epoch,
            )  # fmt: skip
        )
    return found


class ProblemRecorder(Callback):
    """Records the problems every loaded slide reports into a :class:`ProblemLog`.

    ``SlideDataModule`` attaches one to its trainer. Slide-parallel ranks see the same merged
    batch, so their logs agree; data-parallel ranks see different slides, and their logs are
    merged at the end of each run. Global rank 0 prints :meth:`ProblemLog.summary_line`.
    """

    def __init__(self, log: ProblemLog, paths: Mapping[str, str] | None = None) -> None:
        self.problems = log
        self.paths = dict(paths or {})

    def _record(self, trainer: L.Trainer, batch: Any, stage: str) -> None:
        epoch = trainer.current_epoch if stage == "train" else None
        self.problems.extend(_batch_problems(batch, stage, epoch, self.paths))

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self._record(trainer, batch, "train")

    @override
    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                                dataloader_idx=0) -> None:  # fmt: skip
        self._record(trainer, batch, "val")  # trainer.test calls on_test_batch_end instead

    @override
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                          dataloader_idx=0) -> None:  # fmt: skip
        self._record(trainer, batch, "test")

    @override
    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,  # noqa: ANN001
                             dataloader_idx=0) -> None:  # fmt: skip
        self._record(trainer, batch, "predict")

    # Data-parallel ranks' logs are merged at the end of each run, before the strategy tears
    # its process group down (Lightning calls `teardown` hooks after that).
    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._merge_ranks(trainer)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._merge_ranks(trainer)

    @override
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._merge_ranks(trainer)

    @override
    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._merge_ranks(trainer)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.problems.records:
            print(self.problems.summary_line())

    def _merge_ranks(self, trainer: L.Trainer) -> None:
        """Ranks that saw different slides (data parallel, or several slide groups): give every
        rank every record. One slide-parallel group saw the same slides on every rank."""
        strategy = trainer.strategy
        group = getattr(strategy, "slide_group", None)
        one_group = getattr(strategy, "slide_parallel", False) and (
            group is None or group.count == 1
        )
        if trainer.world_size == 1 or one_group:
            return
        if not (dist.is_available() and dist.is_initialized()):
            return
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, self.problems.records)
        known = {p.key for p in self.problems.records}
        for records in everyone:
            for problem in records:
                if problem.key not in known:
                    self.problems.add(problem)
                    known.add(problem.key)
