"""Survival reports: C-index intervals only where they mean something, Kaplan-Meier and log-rank
as lifelines computes them, and the Kaplan-Meier plot written as a PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as lifelines_logrank
from lifelines.utils import concordance_index

from lightning_wsi.models.tasks.survival import harrell_cindex
from lightning_wsi.survival_reports import (
    CIndexCI,
    cindex_ci,
    format_cindex,
    kaplan_meier,
    logrank_test,
    plot_km_by_risk,
)


def _cohort(n: int = 60, seed: int = 11) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Risks that carry some signal, integer times (ties) and ~35% censoring."""
    rng = np.random.default_rng(seed)
    risk = np.round(rng.normal(size=n), 1)
    time = np.ceil(rng.exponential(10.0 * np.exp(-0.7 * risk))).clip(1, 40)
    event = (rng.random(n) < 0.65).astype(float)
    return risk, time, event


def test_kaplan_meier_matches_lifelines() -> None:
    _, time, event = _cohort()
    km = kaplan_meier(time, event)
    fitter = KaplanMeierFitter().fit(time, event)
    np.testing.assert_allclose(
        km.survival, fitter.survival_function_.loc[km.times].to_numpy()[:, 0], rtol=1e-12
    )
    table = fitter.event_table.loc[km.times]
    np.testing.assert_array_equal(km.at_risk, table["at_risk"].to_numpy())
    np.testing.assert_array_equal(km.events, table["observed"].to_numpy())
    np.testing.assert_array_equal(km.censored, table["censored"].to_numpy())
    assert (km.censored > 0).any() and (km.events > 1).any()  # censoring and tied events


@pytest.mark.parametrize("seed", [11, 12])
def test_logrank_matches_lifelines(seed: int) -> None:
    risk, time, event = _cohort(seed=seed)
    high = risk > np.median(risk)
    ours = logrank_test(time, event, high)
    ref = lifelines_logrank(time[high], time[~high], event[high], event[~high])
    assert ours.statistic == pytest.approx(ref.test_statistic, rel=1e-10)
    assert ours.p_value == pytest.approx(ref.p_value, rel=1e-8)


def test_logrank_without_events_is_nan() -> None:
    test = logrank_test([1.0, 2.0, 3.0], [0, 0, 0], [True, False, True])
    assert math.isnan(test.statistic) and math.isnan(test.p_value)


def test_cindex_interval_is_the_bootstrap_over_slides() -> None:
    risk, time, event = _cohort()
    ci = cindex_ci(risk, time, event, n_bootstrap=200, seed=5)
    assert ci.cindex == pytest.approx(concordance_index(time, -risk, event), abs=1e-12)
    # the same resamples drawn explicitly, each scored on its own slides
    idx = np.random.default_rng(5).integers(0, len(risk), (200, len(risk)))
    scores = [harrell_cindex(*(torch.from_numpy(a[i]) for a in (risk, time, event))) for i in idx]
    low, high = np.percentile([s for s in scores if not math.isnan(s)], [2.5, 97.5])
    assert ci.has_interval and ci.resamples == 200
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-12)
    assert ci.low < ci.cindex < ci.high


def test_cindex_interval_withheld_below_ten_events() -> None:
    rng = np.random.default_rng(0)
    risk, time = rng.normal(size=40), rng.integers(1, 30, 40).astype(float)
    event = np.zeros(40)
    event[:9] = 1
    ci = cindex_ci(risk, time, event, n_bootstrap=100)
    assert not ci.has_interval and math.isnan(ci.low) and math.isfinite(ci.cindex)
    assert ci.note == "9 observed events: too few for a bootstrap interval, need >= 10"
    event[9] = 1
    assert cindex_ci(risk, time, event, n_bootstrap=100).has_interval


def test_cindex_interval_withheld_when_every_resample_agrees() -> None:
    time = np.arange(1.0, 21.0)
    ci = cindex_ci(-time, time, np.ones(20), n_bootstrap=100)  # perfect ranking
    assert ci.cindex == 1.0 and not ci.has_interval
    assert ci.note == "every resample gives C-index 1.000: a bootstrap cannot bound it"


def test_cindex_undefined_is_nan_with_the_reason() -> None:
    ci = cindex_ci([0.1, 0.2, 0.3], [1.0, 2.0, 3.0], [0, 0, 0])
    assert math.isnan(ci.cindex) and ci.note == "3 slides, 0 events: no comparable pair"
    ci = cindex_ci([0.1, float("nan"), 0.3], [1.0, 2.0, 3.0], [1, 1, 0])
    assert math.isnan(ci.cindex) and ci.note == "1 of 3 risks are not finite"


def test_bad_survival_data_names_the_slide() -> None:
    with pytest.raises(ValueError, match=r"slide 's1': survival time -2\.0 is not a finite"):
        cindex_ci([0.1, 0.2], [1.0, -2.0], [1, 0], slide_ids=["s0", "s1"])
    with pytest.raises(ValueError, match="as many risks as times, got 3 and 2"):
        cindex_ci([0.1, 0.2, 0.3], [1.0, 2.0], [1, 0])


def test_format_cindex() -> None:
    assert format_cindex(CIndexCI(0.6734, 0.612, 0.738, resamples=1000)) == (
        "val/cindex 0.673 [0.61, 0.74]  (95% bootstrap CI, 1000 resamples)"
    )
    assert format_cindex(CIndexCI(0.7, note="bootstrap off (0 resamples)")) == (
        "val/cindex 0.700  (no interval: bootstrap off (0 resamples))"
    )
    assert format_cindex(CIndexCI(math.nan, note="x")) == "val/cindex n/a  (x)"


def test_km_plot_written_with_the_logrank_of_the_median_split(tmp_path: Path) -> None:
    risk, time, event = _cohort()
    path = tmp_path / "km.png"
    groups = plot_km_by_risk(risk, time, event, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    high = risk > np.median(risk)
    assert groups.threshold == np.median(risk) and not groups.note
    assert (groups.n_low, groups.n_high) == (int((~high).sum()), int(high.sum()))
    ref = lifelines_logrank(time[high], time[~high], event[high], event[~high])
    assert groups.logrank.p_value == pytest.approx(ref.p_value, rel=1e-8)
    assert groups.logrank.p_value < 0.05  # the cohort's risks carry signal


def test_km_plot_with_equal_risks_says_there_is_no_test(tmp_path: Path) -> None:
    path = tmp_path / "km.png"
    groups = plot_km_by_risk(np.zeros(6), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1, 0, 1, 1, 0, 1], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (groups.n_low, groups.n_high) == (6, 0)
    assert groups.note == "all risks equal: one group, no log-rank test"
