"""Transformer aggregator: tile tokens plus a class token, pre-norm layers on fused attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_wsi.models.aggregators.output import AggregatorOutput
from lightning_wsi.models.aggregators.positional import grid_positions, sincos_2d

__all__ = ["TransformerAggregator"]


class TransformerAggregator(nn.Module):
    """A small pre-norm transformer over a slide's tiles, read out at a class token.

    Tiles are linearly projected to tokens (plus an optional 2D sin-cos encoding of their grid
    position, see ``positional.py``), a learned class token is prepended, and ``num_layers``
    pre-norm layers follow. All but the last attend with
    ``torch.nn.functional.scaled_dot_product_attention``, whose fused kernels never hold a
    ``[K, K]`` matrix. Only the class token is read out, so the last layer computes the class
    token's row alone: its ``[heads, K + 1]`` attention weights are explicit, which is cheap, and
    give the per-tile attention (softmax over the tiles only, averaged over heads) for heatmaps.

    Without positional encoding the output is invariant to the order of the tiles.

    Args:
        in_dim: Tile feature size ``D``.
        num_outputs: Head size ``C``.
        hidden_dim: Token size; a multiple of ``num_heads`` (and of 4 with positional encoding).
        num_layers: Number of transformer layers, at least 1.
        num_heads: Attention heads.
        mlp_ratio: Hidden size of each layer's MLP relative to ``hidden_dim``.
        dropout: Dropout on the input tokens, after attention and MLP, and before the head.
        attention_dropout: Dropout on attention weights.
        positional_encoding: Add the 2D sin-cos encoding of tile positions to tile tokens.
        tile_step: Level-0 grid step in pixels for the positions; ``None`` infers it per slide
            (the GCD of the coordinate offsets).

    Example:
        >>> agg = TransformerAggregator(in_dim=32, num_outputs=1, hidden_dim=16, num_heads=2)
        >>> out = agg(torch.randn(6, 32), torch.randint(0, 8, (6, 2)) * 256)
        >>> out.logits.shape, out.attention.shape
        (torch.Size([1]), torch.Size([6]))
    """

    def __init__(
        self,
        in_dim: int,
        num_outputs: int = 1,
        hidden_dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        positional_encoding: bool = True,
        tile_step: float | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"Expected `num_layers` of at least 1, got {num_layers}.")
        if hidden_dim % num_heads:
            raise ValueError(
                f"Expected `hidden_dim` divisible by `num_heads`, got {hidden_dim} and {num_heads}."
            )
        if positional_encoding and hidden_dim % 4:
            raise ValueError(
                "Expected `hidden_dim` to be a multiple of 4 with positional encoding, "
                f"got {hidden_dim}."
            )
        self.positional_encoding = positional_encoding
        self.tile_step = tile_step
        self.projection = nn.Linear(in_dim, hidden_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, hidden_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.token_dropout = nn.Dropout(dropout)
        self.layers = nn.ModuleList(
            _Layer(hidden_dim, num_heads, mlp_ratio, dropout, attention_dropout)
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_dim)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_dim, num_outputs))

    def no_weight_decay(self) -> set[str]:
        """Parameters left out of weight decay (timm's convention): the class token."""
        return {"cls_token"}

    def forward(
        self, features: torch.Tensor, coords: torch.Tensor | None = None
    ) -> AggregatorOutput:
        """Aggregate one slide.

        Args:
            features: ``[K, D]`` tile features.
            coords: ``[K, 2]`` level-0 ``(x, y)`` tile coordinates; needed with positional encoding.

        Returns:
            ``logits`` ``[C]`` and the class token's last-layer ``attention`` ``[K]`` (detached).
        """
        tokens = self.projection(features)
        if self.positional_encoding:
            if coords is None:
                raise ValueError("TransformerAggregator with positional encoding needs `coords`.")
            positions = grid_positions(coords, self.tile_step).to(tokens.device)
            tokens = tokens + sincos_2d(positions, tokens.shape[1]).to(tokens.dtype)
        x = self.token_dropout(torch.cat([self.cls_token.to(tokens.dtype), tokens], dim=0))
        for layer in self.layers[:-1]:
            x = layer(x)
        cls, attention = self.layers[-1].forward_cls(x)
        return AggregatorOutput(logits=self.head(self.norm(cls)), attention=attention)


class _Layer(nn.Module):
    """Pre-norm transformer layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, attention_dropout: float
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attention_dropout = attention_dropout
        self.norm1 = nn.LayerNorm(dim)
        # Query and value biases only (as BEiT): a key bias adds the same q.b to every score of a
        # query, which the softmax cancels, so its gradient is zero by construction and an
        # adaptive optimiser would only amplify float noise in it.
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.proj = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, dim = x.shape
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        qkv = F.linear(self.norm1(x), self.qkv.weight, bias)
        qkv = qkv.view(n, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)  # each [heads, N, head_dim]
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, dim]`` tokens to ``[N, dim]`` tokens, attention by the fused kernel."""
        q, k, v = self._qkv(x)
        p = self.attention_dropout if self.training else 0.0
        mixed = F.scaled_dot_product_attention(q[None], k[None], v[None], dropout_p=p)[0]
        x = x + self.proj(mixed.transpose(0, 1).reshape(x.shape))
        return x + self.mlp(self.norm2(x))

    def forward_cls(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The class token's output ``[dim]`` and its attention to the tiles ``[K]``.

        Only the first row of the attention is computed: ``[heads, N]`` scores, never ``[N, N]``.
        """
        q, k, v = self._qkv(x)
        scores = (q[:, :1] * q.shape[-1] ** -0.5) @ k.transpose(1, 2)  # [heads, 1, N]
        weights = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        tile_attention = torch.softmax(scores[:, 0, 1:].detach().float(), dim=-1).mean(dim=0)
        weights = F.dropout(weights, self.attention_dropout, self.training)
        mixed = (weights @ v)[:, 0].reshape(-1)  # [dim]
        cls = x[0] + self.proj(mixed)
        return cls + self.mlp(self.norm2(cls)), tile_attention
