"""Metrics torchmetrics does not have under the name we need."""

from __future__ import annotations

import torch
from torchmetrics.classification import BinaryStatScores

__all__ = ["BinaryBalancedAccuracy"]


class BinaryBalancedAccuracy(BinaryStatScores):
    """Balanced accuracy of binary predictions: the mean of sensitivity and specificity.

    Inputs as for ``BinaryStatScores``: probabilities (or logits) ``[N]`` thresholded at
    ``threshold``, and ``{0, 1}`` targets ``[N]``. A class absent from the targets counts as 0.

    Example:
        >>> metric = BinaryBalancedAccuracy()
        >>> metric(torch.tensor([0.9, 0.8, 0.2, 0.7]), torch.tensor([1, 1, 0, 0]))
        tensor(0.7500)
    """

    higher_is_better = True
    full_state_update = False

    def compute(self) -> torch.Tensor:
        """``(tp / (tp + fn) + tn / (tn + fp)) / 2`` over everything seen."""
        tp, fp, tn, fn = self._final_state()
        sensitivity = tp / (tp + fn).clamp(min=1)
        specificity = tn / (tn + fp).clamp(min=1)
        return (sensitivity + specificity).float() / 2
