"""Survival reports: C-index with a bootstrapped 95% CI, Kaplan-Meier curves and the log-rank test.

Conventions of :mod:`lightning_wsi.reports`: an interval is given only where it can mean
something (here at least ``MIN_EVENTS`` observed events, comparable pairs in nearly every
resample, a non-degenerate interval), else withheld with the reason; plots are PNG files
written with matplotlib's Agg backend. Kaplan-Meier and log-rank are implemented here with
numpy and scipy (checked against lifelines, a test-only dependency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from scipy.stats import chi2

from lightning_wsi.intervals import MIN_USABLE, BootstrapCI, format_interval
from lightning_wsi.models.tasks.survival import check_survival_data, concordance_counts

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = [
    "CIndexCI",
    "KaplanMeier",
    "LogRank",
    "RiskGroups",
    "cindex_ci",
    "format_cindex",
    "kaplan_meier",
    "logrank_test",
    "plot_km_by_risk",
    "split_at_median",
]

MIN_EVENTS = 10  # observed events below which a bootstrap C-index interval is withheld


class CIndexCI(BootstrapCI):
    """Harrell's C-index of slide risks with its 95% percentile-bootstrap interval, or why not
    (:class:`~lightning_wsi.intervals.BootstrapCI`; ``value`` is the C-index, NaN when
    undefined: no comparable pair, non-finite risks)."""

    @property
    def cindex(self) -> float:
        return self.value


def _checked(
    risks: Sequence[float],
    times: Sequence[float],
    events: Sequence[float],
    slide_ids: Sequence[Any] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[N]`` float64 risks and times, bool events; raises on a length mismatch or bad target."""
    r = np.asarray(risks, dtype=np.float64).reshape(-1)
    t, e = check_survival_data(times, events, slide_ids)
    if len(r) != len(t):
        raise ValueError(f"Expected as many risks as times, got {len(r)} and {len(t)}")
    return r, t, e


def _resample_weights(n: int, n_bootstrap: int, seed: int) -> np.ndarray:
    """``[n_bootstrap, n]`` how often each slide is drawn in each resample (with replacement).

    Drawn as ``default_rng(seed).integers(0, n, (n_bootstrap, n))`` indices, the resampling of
    :func:`lightning_wsi.reports.auroc_ci`.
    """
    idx = np.random.default_rng(seed).integers(0, n, (n_bootstrap, n))
    weights = np.zeros((n_bootstrap, n))
    np.add.at(weights, (np.arange(n_bootstrap)[:, None], idx), 1.0)
    return weights


def _counts(r: np.ndarray, t: np.ndarray, e: np.ndarray, w: np.ndarray | None = None):
    tensors = (torch.from_numpy(a) for a in (r, t, e))
    weights = None if w is None else torch.from_numpy(w)
    return (c.numpy() for c in concordance_counts(*tensors, weights=weights))


def _withheld_because(n_events: int, usable: np.ndarray, n_bootstrap: int, min_events: int) -> str:
    """Why an interval would mislead, or ``""`` when it may be reported."""
    if n_bootstrap == 0:
        return "bootstrap off (0 resamples)"
    if n_events < min_events:
        return f"{n_events} observed events: too few for a bootstrap interval, need >= {min_events}"
    if usable.mean() < MIN_USABLE:
        return (
            f"only {math.floor(100 * usable.mean())}% of {n_bootstrap} resamples hold a "
            f"comparable pair, need >= {MIN_USABLE:.0%}"
        )
    return ""


def cindex_ci(
    risks: Sequence[float],
    times: Sequence[float],
    events: Sequence[float],
    n_bootstrap: int = 1000,
    seed: int = 0,
    *,
    min_events: int = MIN_EVENTS,
    slide_ids: Sequence[Any] | None = None,
) -> CIndexCI:
    """Harrell's C-index of slide risks and its 95% percentile-bootstrap interval over slides.

    The interval is withheld (NaN bounds, ``note`` says why) with fewer than ``min_events``
    observed events (the pairs then hang on a handful of slides), when under 90% of the
    resamples hold a comparable pair, or when it has no width (a perfect ranking gives 1 in every
    resample, which only looks certain).

    Args:
        risks: ``[N]`` predicted risk per slide (higher: event sooner).
        times: ``[N]`` event or censoring time (> 0).
        events: ``[N]`` 1 observed, 0 censored.
        n_bootstrap: Resamples of the slides (with replacement); 0 turns the interval off.
        seed: Seed of the resampling.
        min_events: Observed events needed for an interval.
        slide_ids: Names for errors about a bad time or event.

    Example:
        >>> cindex_ci([3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [1, 1, 0]).note
        '2 observed events: too few for a bootstrap interval, need >= 10'
    """
    if n_bootstrap < 0:
        raise ValueError(f"Expected `n_bootstrap` >= 0 resamples, but got {n_bootstrap}")
    r, t, e = _checked(risks, times, events, slide_ids)
    if not np.isfinite(r).all():
        bad = int((~np.isfinite(r)).sum())
        return CIndexCI(math.nan, note=f"{bad} of {r.size} risks are not finite")
    concordant, comparable = _counts(r, t, e)
    if comparable[0] == 0:
        return CIndexCI(
            math.nan, note=f"{len(t)} slides, {int(e.sum())} events: no comparable pair"
        )
    value = float(concordant[0] / comparable[0])
    concordant, comparable = _counts(r, t, e, _resample_weights(len(t), n_bootstrap, seed))
    usable = comparable > 0
    note = _withheld_because(int(e.sum()), usable, n_bootstrap, min_events)
    if note:
        return CIndexCI(value, note=note)
    return CIndexCI.from_resamples(value, concordant[usable] / comparable[usable], "C-index")


def format_cindex(ci: CIndexCI, name: str = "val/cindex") -> str:
    """The line a command prints for ``ci``.

    Example:
        >>> format_cindex(CIndexCI(0.6734, 0.612, 0.738, resamples=1000))
        'val/cindex 0.673 [0.61, 0.74]  (95% bootstrap CI, 1000 resamples)'
    """
    return format_interval(ci, name)


@dataclass(frozen=True)
class KaplanMeier:
    """Product-limit estimate at each distinct observed time (events and censorings).

    Attributes:
        times: ``[m]`` distinct times, increasing.
        survival: ``[m]`` estimated ``P(T > time)`` just after each time.
        at_risk: ``[m]`` slides still at risk just before each time.
        events: ``[m]`` events at each time.
        censored: ``[m]`` censorings at each time.
    """

    times: np.ndarray
    survival: np.ndarray
    at_risk: np.ndarray
    events: np.ndarray
    censored: np.ndarray


def _table(t: np.ndarray, e: np.ndarray, g: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Distinct times of ``t`` and, at each, slides at risk just before it, events and
    censorings, counting only the slides where ``g`` is True (all when ``None``)."""
    times, inverse = np.unique(t, return_inverse=True)
    keep = np.ones(len(t)) if g is None else g.astype(np.float64)
    events = np.bincount(inverse, weights=keep * e, minlength=len(times))
    total = np.bincount(inverse, weights=keep, minlength=len(times))
    at_risk = total[::-1].cumsum()[::-1]
    return times, at_risk, events, total - events


def kaplan_meier(times: Sequence[float], events: Sequence[float]) -> KaplanMeier:
    """Kaplan-Meier survival of slides: ``S(t) = prod_{t_i <= t} (1 - d_i / n_i)``.

    Example:
        >>> kaplan_meier([1.0, 2.0, 2.0, 3.0], [1, 1, 0, 0]).survival.tolist()
        [0.75, 0.5, 0.5]
    """
    t, e = check_survival_data(times, events)
    u, at_risk, d, c = _table(t, e)
    return KaplanMeier(u, np.cumprod(1.0 - d / at_risk), at_risk, d, c)


@dataclass(frozen=True)
class LogRank:
    """Two-group log-rank test: chi-square statistic (1 degree of freedom) and its p-value."""

    statistic: float
    p_value: float


def logrank_test(times: Sequence[float], events: Sequence[float], group: Sequence[bool]) -> LogRank:
    """Log-rank test of equal survival in two groups (Mantel's hypergeometric variance).

    At each distinct event time with ``n`` at risk, ``d`` events, ``n1`` at risk in group 1:
    ``E1 = d n1 / n``, ``V = d (n1 / n)(1 - n1 / n)(n - d) / (n - 1)``; the statistic is
    ``(sum O1 - sum E1)^2 / sum V``. NaN when the variance is 0 (a group empty or no event).

    Args:
        times: ``[N]`` times (> 0).
        events: ``[N]`` 1 observed, 0 censored.
        group: ``[N]`` True for group 1.
    """
    t, e = check_survival_data(times, events)
    g = np.asarray(group, dtype=bool).reshape(-1)
    if len(g) != len(t):
        raise ValueError(f"Expected one group per slide, got {len(g)} and {len(t)}")
    _, n, d, _ = _table(t, e)
    _, n1, d1, _ = _table(t, e, g)
    share = n1 / n
    variance = (d * share * (1 - share) * (n - d) / np.maximum(n - 1, 1)).sum()
    if variance <= 0:
        return LogRank(math.nan, math.nan)
    statistic = float((d1 - d * share).sum() ** 2 / variance)
    return LogRank(statistic, float(chi2.sf(statistic, 1)))


@dataclass(frozen=True)
class RiskGroups:
    """Validation slides split at the median predicted risk, as the Kaplan-Meier plot shows them.

    Attributes:
        threshold: The median risk; slides above it are the high-risk group.
        n_low: Slides at or below the median.
        n_high: Slides above it.
        logrank: Log-rank test of high against low (NaN where it cannot be computed).
        note: Why there is no test; empty when there is one.
    """

    threshold: float
    n_low: int
    n_high: int
    logrank: LogRank
    note: str = ""


def split_at_median(
    risks: Sequence[float],
    times: Sequence[float],
    events: Sequence[float],
    slide_ids: Sequence[Any] | None = None,
) -> tuple[np.ndarray, RiskGroups]:
    """``[N]`` whether each slide is high risk (above the median risk) and the groups' test.

    Slides tied at the median go to the low group, so the groups may differ in size.
    """
    r, t, e = _checked(risks, times, events, slide_ids)
    if not np.isfinite(r).all() or len(r) == 0:
        note = "no slides" if len(r) == 0 else "risks are not all finite"
        return np.zeros(len(r), bool), RiskGroups(
            math.nan, len(r), 0, LogRank(math.nan, math.nan), note
        )
    threshold = float(np.median(r))
    high = r > threshold
    test = logrank_test(t, e, high)
    note = ""
    if high.all() or not high.any():
        note = "all risks equal: one group, no log-rank test"
    elif math.isnan(test.p_value):
        note = "no observed event: no log-rank test"
    return high, RiskGroups(threshold, int((~high).sum()), int(high.sum()), test, note)


def _km_step(ax: plt.Axes, km: KaplanMeier, label: str, colour: str) -> None:
    """One Kaplan-Meier step curve from (0, 1), with a tick at each censoring."""
    x = np.concatenate([[0.0], km.times])
    y = np.concatenate([[1.0], km.survival])
    ax.step(x, y, where="post", color=colour, lw=2, label=label)
    censored = km.censored > 0
    ax.plot(km.times[censored], km.survival[censored], "|", color=colour, ms=8)


def _km_figure(
    t: np.ndarray, e: np.ndarray, high: np.ndarray, groups: RiskGroups, title: str, time_label: str
) -> plt.Figure:
    """Kaplan-Meier curves of the low- and high-risk groups, log-rank p-value in the title."""
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for mask, name, colour in ((~high, "low risk", "tab:blue"), (high, "high risk", "tab:red")):
        if mask.any():
            km = kaplan_meier(t[mask], e[mask])
            _km_step(ax, km, f"{name} (n={int(mask.sum())}, {int(e[mask].sum())} events)", colour)
    p = groups.logrank.p_value
    test = f"log-rank p = {p:.3g}" if not groups.note else groups.note
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel(time_label)
    ax.set_ylabel("survival probability")
    ax.set_title(f"{title} ({len(t)} slides)\nsplit at median risk; {test}", fontsize=9)
    ax.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    return fig


def plot_km_by_risk(
    risks: Sequence[float],
    times: Sequence[float],
    events: Sequence[float],
    path: Path,
    title: str = "Validation Kaplan-Meier",
    time_label: str = "time",
    slide_ids: Sequence[Any] | None = None,
) -> RiskGroups:
    """Kaplan-Meier curves of slides split at the median predicted risk, with the log-rank
    p-value, written as a PNG at ``path``.

    Returns:
        The :class:`RiskGroups` the plot shows.
    """
    r, t, e = _checked(risks, times, events, slide_ids)
    high, groups = split_at_median(r, t, e)
    fig = _km_figure(t, e, high, groups, title, time_label)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return groups
