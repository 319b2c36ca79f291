"""Models: tile encoders, slide aggregators, tasks and the SlideModule that trains them."""

from lightning_wsi.models.aggregators import (
    AGGREGATORS,
    AggregatorOutput,
    GatedAttention,
    MeanPooling,
    TransformerAggregator,
    build_aggregator,
)
from lightning_wsi.models.batchnorm import FrozenBatchNorm, freeze_batchnorm
from lightning_wsi.models.encoders import build_encoder, create_encoder, load_encoder_weights
from lightning_wsi.models.module import SlideModule
from lightning_wsi.models.tasks import (
    TASKS,
    BinaryTask,
    MulticlassTask,
    RegressionTask,
    Task,
    build_task,
)

__all__ = [
    "AGGREGATORS",
    "TASKS",
    "AggregatorOutput",
    "BinaryTask",
    "FrozenBatchNorm",
    "GatedAttention",
    "MeanPooling",
    "MulticlassTask",
    "RegressionTask",
    "SlideModule",
    "Task",
    "TransformerAggregator",
    "build_aggregator",
    "build_encoder",
    "build_task",
    "create_encoder",
    "freeze_batchnorm",
    "load_encoder_weights",
]
