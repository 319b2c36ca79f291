"""Multiclass slide classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAUROC, MulticlassRecall

from lightning_wsi.models.tasks.base import Task

__all__ = ["MulticlassTask"]


class MulticlassTask(Task):
    """Classification into ``num_classes`` classes: cross-entropy; macro AUROC, balanced accuracy.

    The target is a 0-d int64 class index; the prediction is the softmax over classes. Balanced
    accuracy is the macro-averaged recall of the arg-max prediction.

    Args:
        num_classes: Number of classes, at least 2.
        label_smoothing: Cross-entropy label smoothing.

    Example:
        >>> task = MulticlassTask(num_classes=3)
        >>> task.num_outputs, task.predict(torch.zeros(3)).tolist()
        (3, [0.3333333432674408, 0.3333333432674408, 0.3333333432674408])
    """

    prediction_key = "probabilities"

    def __init__(self, num_classes: int, label_smoothing: float = 0.0) -> None:
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(
                f"Expected `num_classes` to be an integer larger than 1, but got {num_classes!r}."
            )
        self.num_classes = num_classes
        self.num_outputs = num_classes
        self.label_smoothing = label_smoothing

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits[None], target.long().reshape(1), label_smoothing=self.label_smoothing
        )

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits.float(), dim=-1)

    def metrics(self) -> dict[str, Metric]:
        return {
            "auroc": MulticlassAUROC(num_classes=self.num_classes, average="macro"),
            "balanced_accuracy": MulticlassRecall(num_classes=self.num_classes, average="macro"),
        }

    def metric_inputs(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predict(logits.detach())[None], target.long().reshape(1)
