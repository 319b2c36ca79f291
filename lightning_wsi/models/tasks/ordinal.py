"""Ordinal slide grading (ISUP grade 0-5 as in PANDA): a cumulative-logit model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassCohenKappa

from lightning_wsi.models.tasks.base import Task

__all__ = ["OrdinalTask", "median_grade"]

_LOG2 = 0.6931471805599453


class OrdinalTask(Task):
    """Ordered grades ``0..C-1``: a cumulative-logit model; quadratic weighted kappa and accuracy.

    The head gives ``C - 1`` outputs ``z``. They become the logits of "grade > k" for
    ``k = 0..C-2`` as ``g_0 = z_0`` and ``g_k = g_{k-1} - softplus(z_k)``: a slide score minus
    ordered cut-points, so ``P(grade > k) = sigmoid(g_k)`` never rises with ``k``. The loss is the
    negative log-likelihood of the target grade, ``-log(P(grade > t-1) - P(grade > t))``.

    Why this model and not CORAL (Cao, Mirjalili & Raschka 2020): CORAL's rank consistency comes
    from one weight vector shared by the ``C - 1`` binary logits with ``C - 1`` biases, but a task
    holds no parameters and every aggregator ends in a plain ``Linear(hidden, C - 1)`` with
    independent rows. Binary cross-entropies on "grade > k" over such a head (what MONAI's PANDA
    tutorial trains) give cumulative probabilities that may rise with ``k`` and have to be
    clipped afterwards. The cut-point parametrisation above is monotone for every slide by
    construction, and its likelihood is a proper distribution over grades. When the head's rows
    for ``z_1..z_{C-2}`` are zero the cut-points are fixed (set by the head's biases) and this is
    exactly the proportional-odds (cumulative-logit) model whose rank-consistent form CORAL fits.

    Prediction: ``predict`` gives the grade probabilities ``[C]`` (``prediction_key``
    ``"probabilities"``, as the multiclass task). The grade the metrics score is their median,
    the number of ``P(grade > k) > 0.5`` (CORAL's rule, see ``grade``; equal to
    :func:`median_grade` of ``predict``), not their arg-max: the median minimises the expected
    absolute grade error, so it accounts for how far apart grades are, as the quadratic kappa
    does, where the arg-max ignores the order. (MONAI rounds the sum of the probabilities, the
    mean, instead.)

    Args:
        num_classes: Number of grades ``C``, at least 2 (6 for ISUP grades 0-5).

    Example:
        >>> task = OrdinalTask(num_classes=3)
        >>> task.num_outputs, [round(p, 4) for p in task.predict(torch.zeros(2)).tolist()]
        (2, [0.5, 0.1667, 0.3333])
        >>> int(task.grade(torch.tensor([0.5, 2.0])))  # g = [0.5, 0.5 - softplus(2.0)]
        1
    """

    prediction_key = "probabilities"

    def __init__(self, num_classes: int) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"Expected `num_classes` (task.num_classes) to be the number of grades, an integer "
                f"larger than 1 (6 for ISUP 0-5), but got {num_classes!r}."
            )
        self.num_classes = num_classes
        self.num_outputs = num_classes - 1

    def cumulative_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., C-1]`` head outputs to the non-increasing logits of ``P(grade > k)``
        (float32)."""
        z = self._checked(logits).float()
        gaps = F.softplus(z[..., 1:])
        return torch.cat([z[..., :1], z[..., :1] - gaps.cumsum(-1)], dim=-1)

    def cumulative_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., C-1]`` head outputs to ``P(grade > k)`` for ``k = 0..C-2``, non-increasing."""
        return torch.sigmoid(self.cumulative_logits(logits))

    def log_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """``[..., C-1]`` head outputs to the log-probability of each grade, ``[..., C]``.

        ``P(grade = k) = sigmoid(g_{k-1}) - sigmoid(g_k)`` is computed in log space as
        ``logsigmoid(g_{k-1}) + logsigmoid(-g_k) + log(1 - exp(-d_k))`` with the gap
        ``d_k = g_{k-1} - g_k > 0``, so no probability is a difference of two nearly equal
        numbers. A gap below float32's smallest normal number is clamped to it (a grade
        probability of about ``1e-38``, not zero).
        """
        g = self.cumulative_logits(logits)
        tiny = torch.finfo(g.dtype).tiny
        first = F.logsigmoid(-g[..., :1])
        last = F.logsigmoid(g[..., -1:])
        gaps = (g[..., :-1] - g[..., 1:]).clamp_min(tiny)
        middle = F.logsigmoid(g[..., :-1]) + F.logsigmoid(-g[..., 1:]) + _log1mexp(gaps)
        return torch.cat([first, middle, last], dim=-1)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of the target grade under the cumulative-logit model."""
        log_p = self.log_probabilities(logits)
        return -log_p[self._grade_index(target)]

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Grade probabilities ``[C]`` (non-negative, summing to 1)."""
        return self.log_probabilities(logits).exp()

    def grade(self, logits: torch.Tensor) -> torch.Tensor:
        """The predicted grade (int64, 0-d for ``[C-1]`` logits): the number of
        ``P(grade > k) > 0.5``, the median of ``predict``'s distribution."""
        return (self.cumulative_logits(logits) > 0).sum(-1)

    def metrics(self) -> dict[str, Metric]:
        return {
            "qwk": MulticlassCohenKappa(num_classes=self.num_classes, weights="quadratic"),
            "accuracy": MulticlassAccuracy(num_classes=self.num_classes, average="micro"),
        }

    def metric_inputs(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``([1]`` predicted grade, ``[1]`` target grade``)``: torchmetrics would take the
        arg-max of probabilities, so the metrics get the median grade itself."""
        index = self._grade_index(target)
        return self.grade(logits.detach()).reshape(1), target.new_tensor([index], dtype=torch.long)

    def _checked(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.ndim == 0 or logits.shape[-1] != self.num_outputs:
            n = self.num_outputs
            raise ValueError(
                f"Expected head outputs [..., {n}] (num_classes - 1) for {self!r}, got "
                f"{tuple(logits.shape)}; build the aggregator with num_outputs={n}."
            )
        return logits

    def _grade_index(self, target: torch.Tensor) -> int:
        """The target as a Python grade index; raises naming the value and the range."""
        value = float(target.reshape(())) if target.numel() == 1 else None
        if value is None or not value.is_integer() or not 0 <= value < self.num_classes:
            shown = target.tolist() if target.numel() < 8 else f"shape {tuple(target.shape)}"
            raise ValueError(
                f"Expected one integer grade in 0..{self.num_classes - 1} as the target of "
                f"{self!r}, got {shown}; check the manifest's `label` column or task.num_classes."
            )
        return int(value)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(-x))`` for ``x > 0``, accurate for small and large ``x`` (Maechler 2012).

    Each branch sees only inputs on its own side of ``log 2``, so the branch ``torch.where``
    drops has finite gradients (an infinite one there would turn the kept gradient into NaN).
    """
    small, large = x.clamp(max=_LOG2), x.clamp(min=_LOG2)
    return torch.where(x < _LOG2, torch.log(-torch.expm1(-small)), torch.log1p(-torch.exp(-large)))


def median_grade(probabilities: torch.Tensor) -> torch.Tensor:
    """The median grade of grade probabilities ``[..., C]``: the number of ``k`` with
    ``P(grade > k) > 0.5`` (int64, ``[...]``). Equals ``OrdinalTask.grade`` of the logits that
    ``OrdinalTask.predict`` turned into these probabilities.

    Example:
        >>> int(median_grade(torch.tensor([0.1, 0.44, 0.46])))
        1
    """
    tail = probabilities.flip(-1).cumsum(-1).flip(-1)[..., 1:]  # P(grade > k), k = 0..C-2
    return (tail > 0.5).sum(-1)
