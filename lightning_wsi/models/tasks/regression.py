"""Slide-level regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric, PearsonCorrCoef

from lightning_wsi.models.tasks.base import Task

__all__ = ["RegressionTask"]


class RegressionTask(Task):
    """Regression of one value per slide: MSE loss; Pearson correlation, MSE and MAE.

    The target is a 0-d float; the prediction is the head's single output.

    Example:
        >>> task = RegressionTask()
        >>> float(task.loss(torch.tensor([1.0]), torch.tensor(3.0)))
        4.0
    """

    prediction_key = "prediction"

    def __init__(self) -> None:
        self.num_outputs = 1

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(logits.reshape(()), target.to(logits.dtype).reshape(()))

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().reshape(())

    def metrics(self) -> dict[str, Metric]:
        return {"pearson": PearsonCorrCoef(), "mse": MeanSquaredError(), "mae": MeanAbsoluteError()}

    def metric_inputs(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predict(logits.detach())[None], target.float().reshape(1)
