"""Slide-level tasks: head size, loss, prediction and metrics, one class per task."""

from lightning_wsi.models.tasks.base import Task
from lightning_wsi.models.tasks.binary import BinaryTask
from lightning_wsi.models.tasks.factory import TASKS, build_task
from lightning_wsi.models.tasks.metrics import BinaryBalancedAccuracy
from lightning_wsi.models.tasks.multiclass import MulticlassTask
from lightning_wsi.models.tasks.ordinal import OrdinalTask, median_grade
from lightning_wsi.models.tasks.regression import RegressionTask
from lightning_wsi.models.tasks.survival import HarrellCIndex, SurvivalTask

__all__ = [
    "TASKS",
    "BinaryBalancedAccuracy",
    "BinaryTask",
    "HarrellCIndex",
    "MulticlassTask",
    "OrdinalTask",
    "RegressionTask",
    "SurvivalTask",
    "Task",
    "build_task",
    "median_grade",
]
