"""AdamW parameter groups for encoder and aggregator, and a warm-up + cosine schedule."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

__all__ = ["WarmupCosine", "param_groups"]


def param_groups(
    encoder: nn.Module,
    aggregator: nn.Module,
    encoder_lr: float,
    aggregator_lr: float,
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Optimiser parameter groups: one learning rate per part, no weight decay on 1-D tensors.

    Biases and normalisation scales (every parameter with at most one dimension) get no weight
    decay, as usual for AdamW. Frozen parameters (``requires_grad=False``) and empty groups are left
    out, so a frozen encoder contributes no group at all.

    Args:
        encoder: The tile encoder.
        aggregator: The aggregator with its head.
        encoder_lr: Learning rate of the encoder's parameters.
        aggregator_lr: Learning rate of the aggregator's parameters.
        weight_decay: Decoupled weight decay of the matrices and kernels.

    Returns:
        Groups for ``torch.optim.AdamW``, each with a ``name`` such as ``"encoder"`` or
        ``"aggregator_no_decay"``.

    Example:
        >>> groups = param_groups(nn.Linear(4, 4), nn.Linear(4, 1), 1e-4, 1e-3, 0.01)
        >>> [(g["name"], g["lr"], len(g["params"])) for g in groups]
        [('encoder', 0.0001, 1), ('encoder_no_decay', 0.0001, 1), ('aggregator', 0.001, 1), ('aggregator_no_decay', 0.001, 1)]
    """  # noqa: E501
    groups = []
    for name, module, lr in (
        ("encoder", encoder, encoder_lr),
        ("aggregator", aggregator, aggregator_lr),
    ):
        trainable = [p for p in module.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim > 1]
        no_decay = [p for p in trainable if p.ndim <= 1]
        if decay:
            groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay})
        if no_decay:
            groups.append(
                {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}
            )
    return groups


class WarmupCosine:
    """Learning-rate factor for ``LambdaLR``: linear warm-up from 0, then cosine decay to 0.

    Step ``s`` (0-based, the number of optimiser steps taken) gets ``(s + 1) / (warmup_steps + 1)``
    during warm-up and ``0.5 (1 + cos(pi t))`` after it, ``t`` running from 0 to 1 over the
    remaining steps. With ``total_steps=None`` (an unknown length) the factor stays 1 after warm-up.
    A plain object, so ``LambdaLR.state_dict()`` saves it and a resumed run continues at the same
    step.

    Args:
        total_steps: Optimiser steps of the whole run (``trainer.estimated_stepping_batches``).
        warmup_steps: Steps of linear warm-up.

    Example:
        >>> f = WarmupCosine(total_steps=10, warmup_steps=1)
        >>> [round(f(s), 3) for s in (0, 1, 5, 9)]
        [0.5, 1.0, 0.587, 0.03]
    """

    def __init__(self, total_steps: int | None, warmup_steps: int) -> None:
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.total_steps is None:
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / decay_steps)
        return 0.5 * (1.0 + math.cos(math.pi * t))
