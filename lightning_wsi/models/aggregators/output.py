"""What every aggregator returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AggregatorOutput"]


@dataclass
class AggregatorOutput:
    """The slide-level output of an aggregator.

    Attributes:
        logits: ``[C]`` raw outputs of the head for one slide (``C`` = the task's ``num_outputs``).
        attention: ``[K]`` non-negative weight per tile, summing to 1 (for heatmaps), or ``None``
            for an aggregator without a notion of attention.

    Example:
        >>> out = AggregatorOutput(logits=torch.zeros(1), attention=torch.full((4,), 0.25))
        >>> out.logits.shape, float(out.attention.sum())
        (torch.Size([1]), 1.0)
    """

    logits: torch.Tensor
    attention: torch.Tensor | None = None
