"""Slide aggregators: ``forward(features [K, D], coords [K, 2] | None) -> AggregatorOutput``."""

from lightning_wsi.models.aggregators.factory import AGGREGATORS, build_aggregator
from lightning_wsi.models.aggregators.gma import GatedAttention
from lightning_wsi.models.aggregators.mean import MeanPooling
from lightning_wsi.models.aggregators.output import AggregatorOutput
from lightning_wsi.models.aggregators.positional import grid_positions, infer_grid_step, sincos_2d
from lightning_wsi.models.aggregators.transformer import TransformerAggregator

__all__ = [
    "AGGREGATORS",
    "AggregatorOutput",
    "GatedAttention",
    "MeanPooling",
    "TransformerAggregator",
    "build_aggregator",
    "grid_positions",
    "infer_grid_step",
    "sincos_2d",
]
