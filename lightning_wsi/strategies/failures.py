"""One rank fails, every rank knows: errors travel as a flag on the step's own host exchanges.

In slide-parallel training every rank takes part in every collective of a step. An exception on
one rank (rank 0's aggregator or loss, a missing target, an encode error, a tile that fails to
load) would leave the others waiting in the next collective: gloo notices the dead peer after
seconds, NCCL only at its watchdog (30 minutes). Here the exception is caught where it happens,
the rank carries on with empty data to the next exchange the step makes anyway, a failure flag
rides on that exchange, and then every rank raises ``SlideParallelError`` with the failing ranks'
original messages (the failing rank chains its own exception, with its traceback).

Exceptions that escape a DataLoader (a slide deleted mid-run, a decode error a dataset did not
handle) happen before the strategy's step runs; ``CatchLoadErrors`` turns them into a marker batch
so that the failing rank still enters the step and reports them. A dataset that drops unreadable
tiles from its shard instead just yields fewer rows: the step's shard-size exchange tells rank 0.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "LOAD_ERROR_KEY",
    "CatchLoadErrors",
    "SlideParallelError",
    "describe",
    "load_error",
    "raise_together",
]

LOAD_ERROR_KEY = "_slide_parallel_load_error"


class SlideParallelError(RuntimeError):
    """A step failed on at least one rank; raised on every rank with the failing ranks' messages."""


def describe(error: BaseException) -> str:
    """``Type: message`` of an exception, on one line."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def raise_together(
    group: dist.ProcessGroup | None, error: BaseException | None, where: str
) -> None:
    """Raise on every rank once the caller's exchange showed that some rank failed.

    Collective on ``group`` (the host group): gathers each rank's message so every rank's error
    names them all. Call it only when the exchange said so, on every rank alike.

    Raises:
        SlideParallelError: Always; chained to this rank's own ``error`` if it has one.
    """
    messages: list[str | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, describe(error) if error is not None else None, group=group)
    # Ranks by their global number: within a slide group, index r is not the rank a user sees.
    ranks = [r if group is None else dist.get_global_rank(group, r) for r in range(len(messages))]
    failed = "; ".join(
        f"rank {g}: {m}" for g, m in zip(ranks, messages, strict=True) if m is not None
    )
    raise SlideParallelError(
        f"Slide-parallel {where} failed on {failed}. Every rank stopped at the same step."
    ) from error


def load_error(batch: Any) -> BaseException | None:
    """The exception a ``CatchLoadErrors`` marker batch carries, if ``batch`` is one."""
    if isinstance(batch, Mapping):
        error = batch.get(LOAD_ERROR_KEY)
        return error if isinstance(error, BaseException) else None
    return None


class CatchLoadErrors:
    """Wraps a loader: an exception while fetching a batch becomes one marker batch, then the end.

    The marker is a slide mapping with empty ``tiles`` ``[0, 3, 1, 1]`` (uint8, so on-device
    normalisation passes it through) and the exception under ``LOAD_ERROR_KEY``; the strategy
    reports it on every rank at the step's first exchange. Everything else (``len``, ``sampler``,
    ``dataset``, ...) is the wrapped loader's.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 - reported on every rank by the step
                yield dict(
                    tiles=torch.zeros((0, 3, 1, 1), dtype=torch.uint8),
                    coords=torch.zeros((0, 2), dtype=torch.int64),
                    slide_id="<load failure>",
                    num_tiles=0,
                    **{LOAD_ERROR_KEY: error},
                )
                return
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)
