"""Binary slide classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import BinaryAUROC

from lightning_wsi.models.tasks.base import Task
from lightning_wsi.models.tasks.metrics import BinaryBalancedAccuracy

__all__ = ["BinaryTask"]


class BinaryTask(Task):
    """Binary classification with one logit: BCE with logits; AUROC and balanced accuracy.

    The target is a 0-d class index (0 or 1, any dtype); the prediction is the probability of
    class 1, ``sigmoid(logit)``.

    Args:
        pos_weight: Weight of positive slides in the loss (BCE's ``pos_weight``), e.g.
            ``n_negative / n_positive`` for an imbalanced cohort.

    Example:
        >>> task = BinaryTask()
        >>> task.num_outputs, round(float(task.loss(torch.tensor([0.0]), torch.tensor(1))), 4)
        (1, 0.6931)
        >>> task.predict(torch.tensor([0.0]))
        tensor(0.5000)
    """

    prediction_key = "probabilities"

    def __init__(self, pos_weight: float | None = None) -> None:
        self.num_outputs = 1
        self.pos_weight = pos_weight

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pos_weight = None
        if self.pos_weight is not None:
            pos_weight = torch.tensor(self.pos_weight, dtype=logits.dtype, device=logits.device)
        return F.binary_cross_entropy_with_logits(
            logits.reshape(()), target.to(logits.dtype).reshape(()), pos_weight=pos_weight
        )

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits.float().reshape(()))

    def metrics(self) -> dict[str, Metric]:
        return {"auroc": BinaryAUROC(), "balanced_accuracy": BinaryBalancedAccuracy()}

    def metric_inputs(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predict(logits.detach())[None], target.long().reshape(1)
