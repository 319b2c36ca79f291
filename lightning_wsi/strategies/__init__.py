"""Strategies: slide-parallel training (feature gather, rank-0 aggregation, gradient scatter)."""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_wsi.strategies.failures import SlideParallelError
from lightning_wsi.strategies.slide_parallel import SlideParallelStrategy

SlideParallelStrategy.register_strategies(StrategyRegistry)

__all__ = ["SlideParallelError", "SlideParallelStrategy"]
