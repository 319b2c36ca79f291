"""Survival task: the discrete-time NLL by hand, bins from quantiles, the C-index vs lifelines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from lifelines.utils import concordance_index
from torchmetrics import MetricCollection

from lightning_wsi.models.tasks.survival import HarrellCIndex, SurvivalTask, harrell_cindex

LOGITS = [0.3, -0.8, 1.2]  # 3 bins with edges 0, 10, 20, inf


def _task() -> SurvivalTask:
    return SurvivalTask(num_bins=3, bin_edges=[0.0, 10.0, 20.0, math.inf])


def _log_h(z: float) -> float:
    return math.log(1 / (1 + math.exp(-z)))


def _log_1mh(z: float) -> float:
    return math.log(1 - 1 / (1 + math.exp(-z)))


@pytest.mark.parametrize(
    ("time", "event", "expected"),
    [
        (5.0, 1, -_log_h(LOGITS[0])),  # event in bin 0
        (10.0, 1, -_log_h(LOGITS[0])),  # on an edge: bins are right-closed, (0, 10]
        (15.0, 1, -(_log_1mh(LOGITS[0]) + _log_h(LOGITS[1]))),  # survived bin 0, event in 1
        (15.0, 0, -(_log_1mh(LOGITS[0]) + _log_1mh(LOGITS[1]))),  # censored: survived bins 0-1
        (25.0, 0, -sum(_log_1mh(z) for z in LOGITS)),  # censored in the last bin
        (99.0, 1, -(_log_1mh(LOGITS[0]) + _log_1mh(LOGITS[1]) + _log_h(LOGITS[2]))),
    ],
)
def test_nll_by_hand(time: float, event: int, expected: float) -> None:
    loss = _task().loss(torch.tensor(LOGITS), torch.tensor([time, float(event)]))
    assert loss.shape == ()
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_alpha_weights_the_event_term() -> None:
    task = SurvivalTask(num_bins=3, bin_edges=[0.0, 10.0, 20.0, math.inf], alpha=0.4)
    event = -(_log_1mh(LOGITS[0]) + _log_h(LOGITS[1]))
    censored = -(_log_1mh(LOGITS[0]) + _log_1mh(LOGITS[1]))
    logits = torch.tensor(LOGITS)
    assert float(task.loss(logits, torch.tensor([15.0, 1.0]))) == pytest.approx(event, rel=1e-6)
    got = float(task.loss(logits, torch.tensor([15.0, 0.0])))
    assert got == pytest.approx(0.6 * censored, rel=1e-6)


@pytest.mark.parametrize("target", [[5.0, 1.0], [25.0, 0.0], [15.0, 1.0]])
def test_gradients_finite_at_extreme_logits(target: list[float]) -> None:
    logits = torch.tensor([60.0, -60.0, 80.0], requires_grad=True)
    loss = _task().loss(logits, torch.tensor(target))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # surviving a hazard of ~1 and an event at a hazard of ~0 cost ~|logit| each, not a clamp
    if target == [15.0, 1.0]:
        assert float(loss.detach()) == pytest.approx(60.0 + 60.0, rel=1e-6)


def test_bins_from_quantiles_of_event_times_only() -> None:
    rng = np.random.default_rng(3)
    times = rng.exponential(30.0, 60) + 0.1
    events = (rng.random(60) < 0.6).astype(int)
    times[events == 0] *= 100.0  # censored times far out: they must not move the edges
    task = SurvivalTask(num_bins=4)
    edges = task.fit_bins(times.tolist(), events.tolist())
    expected = np.quantile(times[events == 1], [0.25, 0.5, 0.75])
    assert edges[0] == 0.0 and edges[-1] == math.inf and len(edges) == 5
    np.testing.assert_allclose(edges[1:-1], expected, rtol=1e-6)
    assert task.bin_edges == edges
    # the loss places each float32 target time in its right-closed bin (lo, hi]; a quantile
    # that lands on a slide's time keeps that slide in the lower bin, as pandas' qcut does
    t32 = times[events == 1].astype(np.float32)
    e32 = np.asarray(edges, dtype=np.float32)
    bins = task.time_bin(torch.from_numpy(t32))
    assert bins.tolist() == [int(np.flatnonzero((t > e32[:-1]) & (t <= e32[1:]))[0]) for t in t32]
    assert torch.bincount(bins, minlength=4).tolist() == [10, 9, 9, 9]


def test_loss_without_bins_says_how_to_fit_them() -> None:
    with pytest.raises(RuntimeError, match=r"call task\.fit_bins\(train_times, train_events\)"):
        SurvivalTask().loss(torch.zeros(4), torch.tensor([3.0, 1.0]))


@pytest.mark.parametrize(
    ("times", "events", "ids", "match"),
    [
        ([1.0, 0.0, 2.0], [1, 1, 1], ["a", "b", "c"], r"slide 'b': survival time 0\.0"),
        ([1.0, 2.0, float("nan")], [1, 1, 1], None, r"slide at index 2: survival time nan"),
        ([1.0, 2.0, 3.0], [1, 2, 1], ["a", "b", "c"], r"slide 'b': event 2\.0 is not 0"),
        ([1.0, 2.0, 3.0, 9.0], [1, 0, 0, 0], None, r"1 events .* lower `num_bins`"),
        ([5.0, 5.0, 5.0, 5.0, 6.0], [1, 1, 1, 1, 1], None, r"repeated bin edges"),
    ],
)
def test_fit_bins_refuses_bad_data(times, events, ids, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SurvivalTask(num_bins=4).fit_bins(times, events, slide_ids=ids)


@pytest.mark.parametrize(
    ("target", "match"),
    [([3.0], r"got shape \(1,\)"), ([-1.0, 1.0], r"got \(-1\.0, 1\.0\)"), ([3.0, 0.5], "0.5")],
)
def test_loss_refuses_bad_targets(target: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _task().loss(torch.zeros(3), torch.tensor(target))


@pytest.mark.parametrize(
    "edges", [[0.0, 10.0, 20.0], [0.0, 20.0, 10.0, math.inf], [1.0, 10.0, 20.0, math.inf]]
)
def test_bad_bin_edges_are_refused(edges: list[float]) -> None:
    with pytest.raises(ValueError, match="increasing `bin_edges` from 0 to inf"):
        SurvivalTask(num_bins=3, bin_edges=edges)


def test_bin_edges_survive_a_checkpoint(tmp_path) -> None:
    task = SurvivalTask(num_bins=3, alpha=0.2)
    task.fit_bins([1.5, 2.0, 4.0, 7.0, 8.5, 30.0], [1, 1, 1, 1, 1, 0])
    torch.save({"task": task.state()}, tmp_path / "task.ckpt")
    state = torch.load(tmp_path / "task.ckpt", weights_only=True)["task"]
    restored = SurvivalTask(num_bins=3)
    restored.load_state(state)
    assert restored.bin_edges == task.bin_edges and restored.alpha == 0.2
    logits, target = torch.tensor(LOGITS), torch.tensor([4.5, 1.0])
    assert float(restored.loss(logits, target)) == float(task.loss(logits, target))
    with pytest.raises(ValueError, match=r"build SurvivalTask\(num_bins=3\)"):
        SurvivalTask(num_bins=4).load_state(state)


def test_survival_curve_and_risk() -> None:
    task = _task()
    h = torch.sigmoid(torch.tensor(LOGITS, dtype=torch.float64))
    expected = torch.cumprod(1 - h, 0)
    curve = task.survival_curve(torch.tensor(LOGITS))
    assert curve.shape == (3,)
    torch.testing.assert_close(curve.double(), expected, rtol=1e-6, atol=0)
    assert float(task.predict(torch.tensor(LOGITS))) == pytest.approx(-float(expected.sum()))
    # a higher hazard in every bin is a higher risk
    assert task.predict(torch.tensor(LOGITS) + 1) > task.predict(torch.tensor(LOGITS))
    assert task.prediction_key == "risk" and task.num_outputs == 3


def _survival_data(n: int = 60, seed: int = 7) -> tuple[np.ndarray, ...]:
    """Risks rounded to one decimal (ties) and integer times (ties), 40% censored."""
    rng = np.random.default_rng(seed)
    risk = np.round(rng.normal(size=n), 1)
    time = rng.integers(1, 12, n).astype(float)
    event = (rng.random(n) < 0.6).astype(float)
    return risk, time, event


def test_cindex_metric_matches_lifelines() -> None:
    risk, time, event = _survival_data()
    assert len(set(risk)) < len(risk) and len(set(time)) < len(time)  # ties in both
    metric = HarrellCIndex()
    for r, t, e in zip(risk, time, event, strict=True):  # one slide per update, as the module
        metric.update(torch.tensor([r]), torch.tensor([[t, e]]))
    expected = concordance_index(time, -risk, event)
    assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)
    as_tensors = (torch.from_numpy(a) for a in (risk, time, event))
    assert harrell_cindex(*as_tensors) == pytest.approx(expected, abs=1e-12)


def test_cindex_is_nan_without_a_comparable_pair() -> None:
    metric = HarrellCIndex()
    metric.update(torch.tensor([0.1, 0.2]), torch.tensor([[3.0, 0.0], [5.0, 0.0]]))
    assert math.isnan(float(metric.compute()))


def test_task_metrics_fed_as_the_module_feeds_them() -> None:
    task = _task()
    metrics = MetricCollection(task.metrics(), prefix="val/")
    logits = [torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 0.0]), torch.zeros(3) - 2]
    targets = [torch.tensor([5.0, 1.0]), torch.tensor([15.0, 1.0]), torch.tensor([30.0, 0.0])]
    for lg, tg in zip(logits, targets, strict=True):
        metrics.update(*task.metric_inputs(lg, tg))
    assert float(metrics.compute()["val/cindex"]) == 1.0
