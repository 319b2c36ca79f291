"""Quadratic weighted kappa of slide grades with a bootstrapped 95% CI, given only where it means
something.

The kappa is computed from confusion matrices in numpy, all bootstrap resamples at once (1000
resamples of 1000 slides take milliseconds); it equals torchmetrics'
``MulticlassCohenKappa(weights="quadratic")``, which the ordinal task logs as ``val/qwk``. Kept
apart from :mod:`lightning_wsi.reports` so that it needs neither matplotlib nor OpenSlide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lightning_wsi.intervals import MIN_USABLE, BootstrapCI, format_interval

__all__ = ["KappaCI", "format_kappa", "kappa_ci", "quadratic_kappa"]

MIN_SLIDES = 20  # slides below which a bootstrap kappa interval is withheld
MIN_GRADES = 2  # distinct target grades needed for the interval


class KappaCI(BootstrapCI):
    """Quadratic weighted kappa with its 95% percentile-bootstrap interval, or why not
    (:class:`~lightning_wsi.intervals.BootstrapCI`; ``value`` is the kappa, NaN when undefined:
    targets of a single grade, no slides). The counterpart of ``reports.AurocCI`` for grades."""

    @property
    def kappa(self) -> float:
        return self.value


def _grades(values: Sequence[int], num_classes: int, name: str) -> np.ndarray:
    """``[N]`` int64 grades; raises naming ``name`` and the bad values."""
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = ~(np.isfinite(a) & (a == np.round(a)) & (a >= 0) & (a < num_classes))
    if bad.any():
        shown = sorted(set(a[bad].tolist()), key=str)[:5]
        raise ValueError(
            f"Expected `{name}` to be integer grades in 0..{num_classes - 1}, got {shown}; "
            f"pass grades (e.g. ordinal.median_grade of the probabilities), not probabilities."
        )
    return a.astype(np.int64)


def _confusions(preds: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """``[B, C, C]`` confusion counts (rows: target, columns: prediction) of ``[B, N]`` grades."""
    b, c = preds.shape[0], num_classes
    flat = (np.arange(b)[:, None] * c + targets) * c + preds
    return np.bincount(flat.reshape(-1), minlength=b * c * c).reshape(b, c, c).astype(np.float64)


def _kappas(confusion: np.ndarray) -> np.ndarray:
    """``[B]`` quadratic weighted kappas of ``[B, C, C]`` confusions (NaN where undefined)."""
    c = confusion.shape[-1]
    weights = (np.arange(c)[:, None] - np.arange(c)[None, :]) ** 2.0
    n = confusion.sum(axis=(1, 2))
    expected = confusion.sum(2)[:, :, None] * confusion.sum(1)[:, None, :] / n[:, None, None]
    observed = (weights * confusion).sum(axis=(1, 2))
    chance = (weights * expected).sum(axis=(1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        return 1.0 - observed / chance


def quadratic_kappa(preds: Sequence[int], targets: Sequence[int], num_classes: int) -> float:
    """Cohen's kappa with quadratic weights ``(i - j)^2`` of predicted against target grades.

    ``1 - sum(W * O) / sum(W * E)`` with ``O`` the confusion counts and ``E`` the counts expected
    from the two marginals; NaN when all grades (targets and predictions) are one and the same.

    Example:
        >>> quadratic_kappa([0, 1, 2, 2], [0, 1, 1, 2], num_classes=3)
        0.8
    """
    p, t = _checked(preds, targets, num_classes)
    if t.size == 0:
        return math.nan
    return float(_kappas(_confusions(p[None], t[None], num_classes))[0])


def _checked(
    preds: Sequence[int], targets: Sequence[int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"Expected `num_classes` >= 2 grades, but got {num_classes!r}")
    p, t = _grades(preds, num_classes, "preds"), _grades(targets, num_classes, "targets")
    if len(p) != len(t):
        raise ValueError(f"Expected as many preds as targets, got {len(p)} and {len(t)}")
    return p, t


def _withheld_because(
    t: np.ndarray, usable: np.ndarray, n_bootstrap: int, limits: tuple[int, int, float]
) -> str:
    """Why an interval would mislead, or ``""`` when it may be reported."""
    min_slides, min_grades, min_usable = limits
    present = np.unique(t)
    if n_bootstrap == 0:
        return "bootstrap off (0 resamples)"
    if len(t) < min_slides:
        return f"{len(t)} slides: too few for a bootstrap interval, need >= {min_slides}"
    if len(present) < min_grades:
        return (
            f"targets hold {len(present)} grades ({present.tolist()}): need >= {min_grades} "
            f"for an interval"
        )
    if usable.mean() < min_usable:  # floored, so 89.6% never reads as the 90% it missed
        return (
            f"only {math.floor(100 * usable.mean())}% of {n_bootstrap} resamples hold >= 2 "
            f"target grades, need >= {min_usable:.0%}"
        )
    return ""


def kappa_ci(
    preds: Sequence[int],
    targets: Sequence[int],
    num_classes: int,
    n_bootstrap: int = 1000,
    seed: int = 0,
    *,
    min_slides: int = MIN_SLIDES,
    min_grades: int = MIN_GRADES,
    min_usable: float = MIN_USABLE,
) -> KappaCI:
    """Quadratic weighted kappa of slide grades and its 95% percentile-bootstrap interval.

    The kappa needs targets of at least two grades (with one, it is 0 or 0/0 whatever the
    predictions): otherwise it is NaN with the reason. The interval is withheld (NaN bounds,
    ``note`` says why) below ``min_slides`` slides (20: fewer resample to a handful of distinct
    sets), with fewer than ``min_grades`` target grades, when under ``min_usable`` of the
    resamples hold two target grades, or when it has no width (predictions all right give kappa
    1 in every resample, which only looks certain).

    Args:
        preds: ``[N]`` predicted grade per slide (``0..num_classes-1``).
        targets: ``[N]`` target grade per slide.
        num_classes: Number of grades ``C``.
        n_bootstrap: Resamples of the slides (with replacement); 0 turns the interval off.
        seed: Seed of the resampling.
        min_slides: Slides needed for an interval.
        min_grades: Distinct target grades needed for an interval.
        min_usable: Share of resamples that must hold two target grades.

    Example:
        >>> kappa_ci([0, 1, 2, 2], [0, 1, 1, 2], num_classes=3).note
        '4 slides: too few for a bootstrap interval, need >= 20'
    """
    if n_bootstrap < 0:
        raise ValueError(f"Expected `n_bootstrap` >= 0 resamples, but got {n_bootstrap}")
    p, t = _checked(preds, targets, num_classes)
    if t.size == 0 or t.min() == t.max():
        kind = "no slides" if t.size == 0 else f"{t.size} slides, all of grade {t[0]}"
        return KappaCI(math.nan, note=f"{kind}: kappa needs targets of >= 2 grades")
    value = float(_kappas(_confusions(p[None], t[None], num_classes))[0])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(t), (n_bootstrap, len(t)))
    usable = t[idx].min(axis=1) < t[idx].max(axis=1)
    note = _withheld_because(t, usable, n_bootstrap, (min_slides, min_grades, min_usable))
    if note:
        return KappaCI(value, note=note)
    scores = _kappas(_confusions(p[idx[usable]], t[idx[usable]], num_classes))
    return KappaCI.from_resamples(value, scores, "kappa")


def format_kappa(ci: KappaCI, name: str = "val/qwk") -> str:
    """The line the train command prints for ``ci`` (as ``reports.format_auroc`` for AUROC).

    Example:
        >>> format_kappa(KappaCI(0.8123, 0.704, 0.897, resamples=1000))
        'val/qwk 0.812 [0.70, 0.90]  (95% bootstrap CI, 1000 resamples)'
    """
    return format_interval(ci, name)
