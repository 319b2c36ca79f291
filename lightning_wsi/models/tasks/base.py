"""The interface every task implements: head size, loss, prediction, metrics."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torchmetrics import Metric

__all__ = ["Task"]


class Task(ABC):
    """What a slide-level task needs from the model and gives to it.

    A task is plain configuration (no parameters): the number of outputs the aggregator's head must
    produce, the loss of one slide, how logits become a prediction, and fresh torchmetrics objects.
    Metrics are updated with ``metric_inputs(logits, target)``, one slide at a time. A new task
    (e.g. survival with a discrete-time NLL and a C-index) subclasses this and, if its target is not
    a single value, overrides ``metric_inputs``.

    Attributes:
        num_outputs: Head size ``C``.
        prediction_key: Name of the prediction in ``SlideModule.predict_step``'s output.
    """

    num_outputs: int
    prediction_key: str = "probabilities"

    @abstractmethod
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of one slide.

        Args:
            logits: ``[C]`` head outputs.
            target: The slide's target (0-d for the built-in tasks).

        Returns:
            A 0-d tensor.
        """

    @abstractmethod
    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Turn ``[C]`` logits into the task's prediction (probabilities or a value)."""

    @abstractmethod
    def metrics(self) -> dict[str, Metric]:
        """Fresh metric objects by short name (``"auroc"``); logged as ``{stage}/{name}``."""

    def metric_inputs(
        self, logits: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched ``(preds, target)`` of one slide for ``Metric.update``."""
        return self.predict(logits.detach())[None], target[None]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"
