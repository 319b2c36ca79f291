"""Survival of one slide per step: a discrete-time hazard model and Harrell's C-index."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lightning_wsi.models.tasks.base import Task

__all__ = [
    "HarrellCIndex",
    "SurvivalTask",
    "check_survival_data",
    "concordance_counts",
    "harrell_cindex",
]

_ROWS = 1024  # pair-matrix rows at a time: memory O(_ROWS * N), whatever N


def _name(i: int, slide_ids: Sequence[Any] | None) -> str:
    return f"slide {slide_ids[i]!r}" if slide_ids is not None else f"slide at index {i}"


def check_survival_data(
    times: Sequence[float],
    events: Sequence[float],
    slide_ids: Sequence[Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``[N]`` float64 times and bool events; raises naming the first bad slide.

    Times must be finite and > 0 (any unit), events 0 (censored) or 1 (observed).
    """
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    e = np.asarray(events, dtype=np.float64).reshape(-1)
    if len(t) != len(e) or (slide_ids is not None and len(slide_ids) != len(t)):
        n_ids = "" if slide_ids is None else f", {len(slide_ids)} slide ids"
        raise ValueError(f"Expected as many times as events, got {len(t)} and {len(e)}{n_ids}")
    bad_t = np.flatnonzero(~(np.isfinite(t) & (t > 0)))
    if bad_t.size:
        i = int(bad_t[0])
        raise ValueError(
            f"{_name(i, slide_ids)}: survival time {t[i]} is not a finite number > 0; "
            "fix its time in the manifest"
        )
    bad_e = np.flatnonzero(~np.isin(e, (0, 1)))
    if bad_e.size:
        i = int(bad_e[0])
        raise ValueError(
            f"{_name(i, slide_ids)}: event {e[i]} is not 0 (censored) or 1 (observed); "
            "fix its event in the manifest"
        )
    return t, e.astype(bool)


def concordance_counts(
    risk: torch.Tensor,
    time: torch.Tensor,
    event: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Harrell's concordant and comparable pair counts, optionally weighted per slide.

    A pair ``(i, j)`` is comparable when slide ``i`` had its event first: ``event_i`` and
    ``time_i < time_j``, or ``time_i == time_j`` with ``j`` censored (censored at the event time
    counts as surviving it, as in lifelines and torchsurv). It is concordant when
    ``risk_i > risk_j`` and counts 1/2 when the risks are equal. With ``weights`` ``[B, N]`` (how
    often each slide appears in each of ``B`` bootstrap resamples) pair ``(i, j)`` counts
    ``w_i * w_j``, which equals the counts over the resampled slides.

    Args:
        risk: ``[N]`` predicted risk (higher: event sooner).
        time: ``[N]`` event or censoring time.
        event: ``[N]`` 1 observed, 0 censored.
        weights: ``[B, N]`` slide weights; ``None`` is one resample of every slide once.

    Returns:
        ``(concordant [B], comparable [B])`` float64; the C-index is their ratio.
    """
    risk, time = risk.double().reshape(-1), time.double().reshape(-1)
    event = event.bool().reshape(-1)
    w = torch.ones(1, len(risk), dtype=torch.float64) if weights is None else weights.double()
    concordant = torch.zeros(len(w), dtype=torch.float64)
    comparable = torch.zeros(len(w), dtype=torch.float64)
    for rows in torch.arange(len(risk)).split(_ROWS):
        ti, tj = time[rows, None], time[None, :]
        pair = event[rows, None] & ((ti < tj) | ((ti == tj) & ~event[None, :]))
        ri, rj = risk[rows, None], risk[None, :]
        score = pair * ((ri > rj) + 0.5 * (ri == rj))
        concordant += ((w[:, rows] @ score.double()) * w).sum(1)
        comparable += ((w[:, rows] @ pair.double()) * w).sum(1)
    return concordant, comparable


def harrell_cindex(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> float:
    """Harrell's C-index of ``[N]`` risks; NaN when no pair is comparable.

    Equals lifelines' ``concordance_index(time, -risk, event)`` (lifelines takes predicted
    survival times, so the concordance of the negated risk).

    Example:
        >>> harrell_cindex(torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, 2.0, 3.0]),
        ...                torch.tensor([1, 1, 0]))
        1.0
    """
    concordant, comparable = concordance_counts(risk, time, event)
    return float(concordant[0] / comparable[0]) if comparable[0] > 0 else math.nan


class HarrellCIndex(Metric):
    """Harrell's C-index over every slide seen, as a torchmetrics ``Metric``.

    ``update(risk [N], target [N, 2])`` with ``target[:, 0]`` the time and ``target[:, 1]`` the
    event. Computed by hand (:func:`concordance_counts`, vectorised, checked against lifelines)
    rather than with torchsurv's ``ConcordanceIndex``, which gives the same value but loops in
    Python over events, raises when no pair is comparable and would add pydantic and a
    ``torch.jit.script`` deprecation warning at import for one formula. ``compute`` gives NaN
    when no pair is comparable (no event, e.g. a sanity check on two censored slides).

    Example:
        >>> metric = HarrellCIndex()
        >>> metric.update(torch.tensor([2.0, 1.0]), torch.tensor([[1.0, 1.0], [5.0, 0.0]]))
        >>> metric.compute()
        tensor(1., dtype=torch.float64)
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("risk", default=[], dist_reduce_fx="cat")
        self.add_state("time", default=[], dist_reduce_fx="cat")
        self.add_state("event", default=[], dist_reduce_fx="cat")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Add ``[N]`` risks and their ``[N, 2]`` ``(time, event)`` targets."""
        target = target.reshape(-1, 2)
        if preds.numel() != len(target):
            raise ValueError(
                f"Expected one risk per (time, event) target, got {preds.numel()} and {len(target)}"
            )
        self.risk.append(preds.detach().double().reshape(-1))
        self.time.append(target[:, 0].detach().double())
        self.event.append(target[:, 1].detach().double())

    def compute(self) -> torch.Tensor:
        """The C-index of everything seen (float64; NaN when no pair is comparable)."""
        risk, time, event = (dim_zero_cat(s).cpu() for s in (self.risk, self.time, self.event))
        concordant, comparable = concordance_counts(risk, time, event)
        if comparable[0] == 0:
            return torch.tensor(math.nan, dtype=torch.float64)
        return concordant[0] / comparable[0]


class SurvivalTask(Task):
    """Survival with a discrete-time hazard model: ``num_bins`` hazard logits per slide.

    Target: a float tensor ``[2]`` = ``(time, event)``, time > 0 in any unit, event 1 observed,
    0 censored. Time is cut into ``num_bins`` bins (right-closed, ``(e_j, e_j+1]``) whose edges
    are the quantiles of the training split's event times, from 0 to +inf (:meth:`fit_bins`,
    as in MCAT). The head gives hazard logits ``z [num_bins]``, ``h_j = sigmoid(z_j)`` the chance
    of the event in bin ``j`` having survived the bins before it. The loss is the discrete-time
    survival negative log-likelihood (Zadeh & Schmid 2020, "Bias in cross-entropy-based training
    of deep survival networks", TPAMI; the ``nll_loss`` of MCAT/PORPOISE, Chen et al. 2021/2022)::

        event in bin y:    -log h_y - sum_{j<y} log(1 - h_j)
        censored in bin y:           - sum_{j<=y} log(1 - h_j)

    (censored slides survive their own bin, as in MCAT and pycox), computed with ``logsigmoid``
    so that it and its gradients stay finite at any logit. ``alpha`` > 0 adds MCAT's extra
    weight on the event term: ``(1 - alpha) * nll + alpha * event_term``.

    Why this loss is the default (and the only one): the Cox partial likelihood compares a slide
    with its risk set, the other slides still at risk, and is undefined for the one slide a step
    sees here. A Cox loss over a window of slides (a memory of recent risks) is left out: its
    gradient would reach past slides through stale risks, which the one-slide-per-step method
    cannot backpropagate.

    Prediction: the risk ``-sum_j S_j`` with ``S_j = prod_{m<=j} (1 - h_m)``, the negative
    expected number of bins survived (MCAT's risk); :meth:`survival_curve` gives ``S``.

    Checkpoints: the task holds no tensors. Store :meth:`state` (plain floats) with the module
    and restore it with :meth:`load_state`, or pass ``bin_edges`` to the constructor.

    Args:
        num_bins: Time bins, the head size; at least 2.
        bin_edges: ``num_bins + 1`` edges from 0 to +inf, e.g. a checkpoint's; else call
            :meth:`fit_bins` before training.
        alpha: Extra weight of the event term, in ``[0, 1]`` (MCAT's ``alpha_surv``).

    Example:
        >>> task = SurvivalTask(num_bins=2)
        >>> task.fit_bins([1.0, 2.0, 3.0, 9.0], [1, 1, 1, 0])
        [0.0, 2.0, inf]
        >>> round(float(task.loss(torch.zeros(2), torch.tensor([1.5, 1.0]))), 4)  # log 2
        0.6931
    """

    prediction_key = "risk"

    def __init__(
        self, num_bins: int = 4, bin_edges: Sequence[float] | None = None, alpha: float = 0.0
    ) -> None:
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
            raise ValueError(f"Expected `num_bins` to be an integer >= 2, got {num_bins!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Expected `alpha` in [0, 1], got {alpha!r}")
        self.num_bins = num_bins
        self.num_outputs = num_bins
        self.alpha = float(alpha)
        self.bin_edges = None if bin_edges is None else _checked_edges(bin_edges, num_bins)

    # ----------------------------------------------------------------- bins

    def fit_bins(
        self,
        times: Sequence[float],
        events: Sequence[float],
        slide_ids: Sequence[Any] | None = None,
    ) -> list[float]:
        """Set the bin edges from the training split: quantiles of its event times.

        Censored times are left out (as in MCAT); edges are ``[0, q_1/B, ..., q_(B-1)/B, inf]``,
        rounded to float32 so a float32 target equal to an edge falls in the same bin as its
        float64 value.

        Args:
            times: ``[N]`` training slides' times (> 0).
            events: ``[N]`` their events (0 or 1).
            slide_ids: Names for errors about a bad time or event.

        Returns:
            The edges, also kept as ``self.bin_edges``.
        """
        t, e = check_survival_data(times, events, slide_ids)
        event_times = t[e]
        if len(event_times) < self.num_bins:
            raise ValueError(
                f"{len(event_times)} events in the training split: too few for "
                f"num_bins={self.num_bins} quantile bins; lower `num_bins` or add slides"
            )
        inner = np.quantile(event_times, np.arange(1, self.num_bins) / self.num_bins)
        inner = [float(np.float32(q)) for q in inner]
        if any(b <= a for a, b in zip(inner, inner[1:], strict=False)):
            raise ValueError(
                f"tied event times give repeated bin edges {inner} for num_bins={self.num_bins}; "
                "lower `num_bins`"
            )
        self.bin_edges = [0.0, *inner, math.inf]
        return list(self.bin_edges)

    def state(self) -> dict[str, Any]:
        """Plain-float configuration to save with a checkpoint (``bin_edges`` may be ``None``)."""
        edges = None if self.bin_edges is None else list(self.bin_edges)
        return {"num_bins": self.num_bins, "bin_edges": edges, "alpha": self.alpha}

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state`; raises if it was saved for another number of bins."""
        if state.get("num_bins") != self.num_bins:
            raise ValueError(
                f"Survival state has num_bins={state.get('num_bins')!r} but the task has "
                f"{self.num_bins}; build SurvivalTask(num_bins={state.get('num_bins')!r})"
            )
        edges = state.get("bin_edges")
        self.bin_edges = None if edges is None else _checked_edges(edges, self.num_bins)
        self.alpha = float(state.get("alpha", self.alpha))

    def time_bin(self, time: torch.Tensor) -> torch.Tensor:
        """Bin index (int64, same shape) of times: ``j`` for a time in ``(e_j, e_j+1]``."""
        if self.bin_edges is None:
            raise RuntimeError(
                "SurvivalTask has no bin edges: call task.fit_bins(train_times, train_events) "
                "before training, or pass bin_edges= (e.g. from a checkpoint's task state)"
            )
        inner = torch.tensor(self.bin_edges[1:-1], dtype=torch.float32, device=time.device)
        return torch.searchsorted(inner, time.float().contiguous(), right=False)

    # ----------------------------------------------------------------- Task

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        time, event = _checked_target(target)
        y = self.time_bin(time)
        log_survive = F.logsigmoid(-logits.float())  # log(1 - h_j)  [num_bins]
        before = torch.arange(self.num_bins, device=logits.device) < y
        survived = (log_survive * before).sum()  # log S_(y-1)
        event_term = -(survived + F.logsigmoid(logits.float()[y]))
        censored_term = -(survived + log_survive[y])
        nll = event * event_term + (1 - event) * censored_term
        return (1 - self.alpha) * nll + self.alpha * event * event_term

    def survival_curve(self, logits: torch.Tensor) -> torch.Tensor:
        """``[num_bins]`` survival ``S_j = P(T > e_j+1)``: surviving bins ``0..j``."""
        return torch.exp(torch.cumsum(F.logsigmoid(-logits.float()), dim=-1))

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """The 0-d risk ``-sum_j S_j`` (higher: event sooner)."""
        return -self.survival_curve(logits).sum(-1)

    def metrics(self) -> dict[str, Metric]:
        return {"cindex": HarrellCIndex()}

    def metric_inputs(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predict(logits.detach()).reshape(1), target.float().reshape(1, 2)


def _checked_target(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """0-d float32 ``(time, event)`` of a ``[2]`` target; raises on a bad shape or value."""
    if target.numel() != 2:
        raise ValueError(
            f"Expected a survival target [2] = (time, event), got shape {tuple(target.shape)}"
        )
    time, event = target.float().reshape(2).unbind()
    if not (bool(torch.isfinite(time)) and time > 0 and event in (0, 1)):
        raise ValueError(
            f"Expected a survival target with time > 0 and event 0 or 1, got "
            f"({float(time)}, {float(event)})"
        )
    return time, event


def _checked_edges(edges: Sequence[float], num_bins: int) -> list[float]:
    """``num_bins + 1`` increasing plain-float edges from 0 to +inf; raises otherwise."""
    edges = [float(e) for e in edges]
    ok = len(edges) == num_bins + 1 and edges[0] == 0.0 and edges[-1] == math.inf
    ok = ok and all(math.isfinite(e) for e in edges[1:-1])
    if not ok or any(b <= a for a, b in zip(edges, edges[1:], strict=False)):
        raise ValueError(
            f"Expected {num_bins + 1} increasing `bin_edges` from 0 to inf for "
            f"num_bins={num_bins}, got {edges}; refit them with fit_bins"
        )
    return edges
