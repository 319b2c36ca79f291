"""Build a task by name."""

from __future__ import annotations

from lightning_wsi.models.tasks.base import Task
from lightning_wsi.models.tasks.binary import BinaryTask
from lightning_wsi.models.tasks.multiclass import MulticlassTask
from lightning_wsi.models.tasks.ordinal import OrdinalTask
from lightning_wsi.models.tasks.regression import RegressionTask
from lightning_wsi.models.tasks.survival import SurvivalTask

__all__ = ["TASKS", "build_task"]

TASKS: dict[str, type[Task]] = {
    "binary": BinaryTask,
    "multiclass": MulticlassTask,
    "ordinal": OrdinalTask,
    "regression": RegressionTask,
    "survival": SurvivalTask,
}


def build_task(name: str, num_classes: int | None = None) -> Task:
    """Create a task by name.

    Args:
        name: One of ``TASKS``: "binary", "multiclass", "regression".
        num_classes: Number of classes; required for "multiclass", must be 2 or ``None`` for
            "binary", ``None`` for "regression".

    Returns:
        The task.

    Example:
        >>> build_task("multiclass", num_classes=4).num_outputs
        4
    """
    if name not in TASKS:
        raise ValueError(f"Expected a task name in {sorted(TASKS)}, got {name!r}.")
    if name in ("multiclass", "ordinal"):
        if num_classes is None:
            raise ValueError(
                f"Task {name!r} needs `num_classes` (an integer larger than 1; 6 for ISUP "
                "grades 0-5)."
            )
        return TASKS[name](num_classes=num_classes)
    if name == "binary" and num_classes not in (None, 2):
        raise ValueError(
            f"Task 'binary' has 2 classes, got num_classes={num_classes}; use task='multiclass'."
        )
    if name in ("regression", "survival") and num_classes is not None:
        raise ValueError(f"Task {name!r} takes no `num_classes`, got {num_classes}.")
    return TASKS[name]()
