"""Mean pooling, the simplest MIL baseline."""

from __future__ import annotations

import torch
from torch import nn

from lightning_wsi.models.aggregators.output import AggregatorOutput

__all__ = ["MeanPooling"]


class MeanPooling(nn.Module):
    """Average the (projected) tile features, then a linear head; attention is uniform ``1/K``.

    Args:
        in_dim: Tile feature size ``D``.
        num_outputs: Head size ``C``.
        hidden_dim: Size of a ReLU projection applied to each tile before averaging, or ``None``
            to average the features themselves.
        dropout: Dropout after the projection and before the head.

    Example:
        >>> out = MeanPooling(in_dim=32, num_outputs=1, hidden_dim=None)(torch.randn(4, 32))
        >>> out.logits.shape, out.attention.tolist()
        (torch.Size([1]), [0.25, 0.25, 0.25, 0.25])
    """

    def __init__(
        self, in_dim: int, num_outputs: int = 1, hidden_dim: int | None = 256, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if hidden_dim is None:
            self.projection: nn.Module = nn.Identity()
            hidden_dim = in_dim
        else:
            self.projection = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, num_outputs))

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor | None = None
    ) -> AggregatorOutput:
        """Aggregate one slide.

        Args:
            features: ``[K, D]`` tile features.
            coords: ``[K, 2]`` tile coordinates; unused.

        Returns:
            ``logits`` ``[C]`` and a uniform ``attention`` ``[K]``.
        """
        pooled = self.projection(features).mean(dim=0)
        k = features.shape[0]
        attention = torch.full((k,), 1.0 / k, dtype=features.dtype, device=features.device)
        return AggregatorOutput(logits=self.head(pooled), attention=attention)
