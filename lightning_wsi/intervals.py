"""An estimate with its 95% percentile-bootstrap interval, given only where it means something.

What AUROC (:mod:`lightning_wsi.reports`), quadratic kappa (:mod:`lightning_wsi.ordinal_reports`)
and the C-index (:mod:`lightning_wsi.survival_reports`) share: the result type, the interval
from the resampled scores (withheld when it has no width) and the line a command prints. Each
metric decides itself when an interval would mislead (too few slides, classes or events).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

__all__ = ["MIN_USABLE", "BootstrapCI", "format_interval"]

MIN_USABLE = 0.9  # share of resamples that must give a defined score for the interval to stand

_CI = TypeVar("_CI", bound="BootstrapCI")


@dataclass(frozen=True)
class BootstrapCI:
    """An estimate over all slides with its 95% percentile-bootstrap interval, or why not.

    Attributes:
        value: The estimate over all slides; NaN when it is undefined.
        low: Lower bound of the 95% interval; NaN when withheld.
        high: Upper bound; NaN when withheld.
        note: Why the interval (or the estimate) is withheld; empty when it is given.
        resamples: Bootstrap resamples the interval is computed from (0 when withheld).
    """

    value: float
    low: float = math.nan
    high: float = math.nan
    note: str = ""
    resamples: int = 0

    @property
    def has_interval(self) -> bool:
        """Whether ``low`` and ``high`` are a reported interval."""
        return not self.note and math.isfinite(self.low) and math.isfinite(self.high)

    @classmethod
    def from_resamples(cls: type[_CI], value: float, scores: Sequence[float], metric: str) -> _CI:
        """The 2.5% and 97.5% percentiles of the resampled ``scores``; withheld when they are
        equal (a perfect ranking scores the same in every resample, which only looks certain)."""
        low, high = np.percentile(scores, [2.5, 97.5])
        if high - low < 1e-6:
            return cls(value, note=f"every resample gives {metric} {high:.3f}: a bootstrap "
                       "cannot bound it")  # fmt: skip
        return cls(value, float(low), float(high), resamples=len(scores))


def format_interval(ci: BootstrapCI, name: str) -> str:
    """The line a command prints for ``ci``, e.g.
    ``val/auroc 0.873 [0.71, 0.97]  (95% bootstrap CI, 1000 resamples)``."""
    if math.isnan(ci.value):
        return f"{name} n/a  ({ci.note})"
    if not ci.has_interval:
        return f"{name} {ci.value:.3f}  (no interval: {ci.note})"
    return (
        f"{name} {ci.value:.3f} [{ci.low:.2f}, {ci.high:.2f}]  "
        f"(95% bootstrap CI, {ci.resamples} resamples)"
    )
