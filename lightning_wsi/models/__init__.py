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
from lightning_wsi.models.lora import (
    apply_lora,
    export_merged_encoder,
    load_adapters,
    merge_lora,
    save_adapters,
)
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
    "apply_lora",
    "build_aggregator",
    "build_encoder",
    "build_task",
    "create_encoder",
    "export_merged_encoder",
    "freeze_batchnorm",
    "load_adapters",
    "load_encoder_weights",
    "merge_lora",
    "save_adapters",
]
