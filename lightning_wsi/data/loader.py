"""A DataLoader whose iterator starts at the first batch, so an epoch-seeded sampler reads the
epoch when the epoch has begun.

Lightning creates the first training iterator early: ``trainer.estimated_stepping_batches`` (asked
by ``configure_optimizers`` to size a schedule) sets up and iterates the train loader before a
checkpoint's loop progress is restored, and with loader workers the first resumed epoch's iterator
exists before ``set_epoch`` (Lightning issue #21938). A sampler whose order and tiles come from
``(seed, epoch)`` would then replay epoch 0 in the first resumed epoch. Deferring the iterator to
the first ``next()`` costs nothing and makes the epoch right whoever calls ``iter()`` early.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader

__all__ = ["DeferredDataLoader"]


class DeferredDataLoader(DataLoader):
    """``DataLoader`` whose ``iter()`` returns an iterator that starts on its first ``next()``."""

    def __iter__(self) -> Iterator[Any]:
        return _Deferred(super().__iter__, len(self))


class _Deferred(Iterator[Any]):
    def __init__(self, start: Callable[[], Iterator[Any]], length: int) -> None:
        self._start = start
        self._length = length
        self._iterator: Iterator[Any] | None = None

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = self._start()
        return next(self._iterator)

    def __len__(self) -> int:
        return self._length
