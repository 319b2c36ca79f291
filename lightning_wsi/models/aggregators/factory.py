"""Build an aggregator by name."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_wsi.models.aggregators.gma import GatedAttention
from lightning_wsi.models.aggregators.mean import MeanPooling
from lightning_wsi.models.aggregators.transformer import TransformerAggregator

__all__ = ["AGGREGATORS", "build_aggregator"]

AGGREGATORS: dict[str, type[nn.Module]] = {
    "gma": GatedAttention,
    "transformer": TransformerAggregator,
    "mean": MeanPooling,
}


def build_aggregator(name: str, in_dim: int, num_outputs: int, **kwargs: Any) -> nn.Module:
    """Create an aggregator (with its head) by name.

    Args:
        name: One of ``AGGREGATORS``: "gma", "transformer", "mean".
        in_dim: Tile feature size ``D``.
        num_outputs: Head size ``C``.
        **kwargs: Passed to the aggregator class (``hidden_dim``, ``dropout``, ...).

    Returns:
        The aggregator, called as ``aggregator(features [K, D], coords [K, 2])``.

    Example:
        >>> type(build_aggregator("gma", in_dim=64, num_outputs=1)).__name__
        'GatedAttention'
    """
    if name not in AGGREGATORS:
        raise ValueError(f"Expected an aggregator name in {sorted(AGGREGATORS)}, got {name!r}.")
    return AGGREGATORS[name](in_dim=in_dim, num_outputs=num_outputs, **kwargs)
