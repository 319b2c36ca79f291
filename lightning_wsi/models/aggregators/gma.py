"""Gated attention MIL pooling (Ilse, Tomczak and Welling, ICML 2018)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_wsi.models.aggregators.output import AggregatorOutput

__all__ = ["GatedAttention"]


class GatedAttention(nn.Module):
    """Gated attention MIL: project tiles, score them, softmax over tiles, weighted sum, head.

    With ``h_k = ReLU(W f_k)`` the score of tile ``k`` is ``w^T (tanh(V h_k) * sigmoid(U h_k))``;
    the attention is the softmax of the scores over the slide's tiles and the slide embedding is
    ``sum_k a_k h_k``, which a linear head maps to logits. Permutation-invariant by construction.

    Args:
        in_dim: Tile feature size ``D``.
        num_outputs: Head size ``C``.
        hidden_dim: Size of the projected tile embeddings ``h_k``.
        attention_dim: Size of the gated attention branch.
        dropout: Dropout on the projected embeddings and before the head.

    Example:
        >>> agg = GatedAttention(in_dim=32, num_outputs=2, hidden_dim=16, attention_dim=8)
        >>> out = agg(torch.randn(5, 32))
        >>> out.logits.shape, out.attention.shape
        (torch.Size([2]), torch.Size([5]))
    """

    def __init__(
        self,
        in_dim: int,
        num_outputs: int = 1,
        hidden_dim: int = 256,
        attention_dim: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.projection = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout)
        )
        self.attention_v = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(hidden_dim, attention_dim), nn.Sigmoid())
        # No bias: a constant added to every score cancels in the softmax, so its gradient is
        # zero by construction and an adaptive optimiser would only amplify float noise in it.
        self.attention_w = nn.Linear(attention_dim, 1, bias=False)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, num_outputs))

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor | None = None
    ) -> AggregatorOutput:
        """Aggregate one slide.

        Args:
            features: ``[K, D]`` tile features.
            coords: ``[K, 2]`` tile coordinates; unused (gated attention has no positions).

        Returns:
            ``logits`` ``[C]`` and ``attention`` ``[K]``.
        """
        h = self.projection(features)
        scores = self.attention_w(self.attention_v(h) * self.attention_u(h)).squeeze(-1)
        attention = torch.softmax(scores, dim=0)
        return AggregatorOutput(logits=self.head(attention @ h), attention=attention)
