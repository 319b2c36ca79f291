"""AdamW parameter groups for encoder and aggregator, and a warm-up + cosine schedule."""

from __future__ import annotations

import math
from typing import Any

from timm.models import group_parameters
from timm.optim import param_groups_weight_decay
from torch import nn

__all__ = ["WarmupCosine", "layer_ids", "param_groups"]


def param_groups(
    encoder: nn.Module,
    aggregator: nn.Module,
    encoder_lr: float,
    aggregator_lr: float,
    weight_decay: float,
    layer_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Optimiser parameter groups: one learning rate per part, weight decay as timm decides it.

    A part's parameters go to its no-decay group by timm's own rule
    (``timm.optim.param_groups_weight_decay``): biases and normalisation scales (every parameter
    with at most one dimension or named ``*.bias``) and the parameters the part's
    ``no_weight_decay()`` names, such as a ViT's ``cls_token``, ``reg_token`` and ``pos_embed``
    (timm's ``create_optimizer_v2`` leaves them out of weight decay the same way). Frozen
    parameters (``requires_grad=False``) and empty groups are left out, so a frozen encoder
    contributes no group at all. The split does not depend on ``weight_decay``: with 0 both
    groups still exist.

    Layer-wise learning-rate decay (``layer_decay``, BEiT's recipe): the encoder's parameters are
    grouped by timm's layer grouping (``group_parameters`` with the model's
    ``group_matcher(coarse=False)``: stem 0, one id per block, the final norm with the last
    block), and layer ``i`` of ``0..L`` gets ``encoder_lr * layer_decay ** (L - i)``: the last
    block keeps ``encoder_lr``, each block below it a factor ``layer_decay`` less. Each group's
    ``lr`` is that value, so a ``LambdaLR`` (``WarmupCosine``) scales every layer alike. The
    decay / no-decay split stays as above, within each layer.

    Args:
        encoder: The tile encoder.
        aggregator: The aggregator with its head.
        encoder_lr: Learning rate of the encoder's parameters.
        aggregator_lr: Learning rate of the aggregator's parameters.
        weight_decay: Decoupled weight decay of the matrices and kernels.
        layer_decay: Layer-wise decay factor in (0, 1] of the encoder's learning rate, or None
            (one rate for the whole encoder).

    Returns:
        Groups for ``torch.optim.AdamW``, each with a ``name`` such as ``"encoder"`` or
        ``"aggregator_no_decay"`` (with ``layer_decay``: ``"encoder_layer3"``,
        ``"encoder_layer3_no_decay"``, ...).

    Raises:
        ValueError: ``layer_decay`` is out of (0, 1], or the encoder has no ``group_matcher``.

    Example:
        >>> groups = param_groups(nn.Linear(4, 4), nn.Linear(4, 1), 1e-4, 1e-3, 0.01)
        >>> [(g["name"], g["lr"], len(g["params"])) for g in groups]
        [('encoder', 0.0001, 1), ('encoder_no_decay', 0.0001, 1), ('aggregator', 0.001, 1), ('aggregator_no_decay', 0.001, 1)]
    """  # noqa: E501
    if layer_decay is None:
        groups = _part_groups("encoder", encoder, encoder_lr, weight_decay)
    else:
        groups = _layer_groups(encoder, encoder_lr, weight_decay, layer_decay)
    return groups + _part_groups("aggregator", aggregator, aggregator_lr, weight_decay)


def _part_groups(
    name: str, module: nn.Module, lr: float, weight_decay: float, only: set[int] | None = None
) -> list[dict[str, Any]]:
    """``module``'s decay and no-decay groups at ``lr`` (only the parameters whose ids are in
    ``only``, when given); empty groups left out."""
    decay, no_decay = _split_decay(module)
    if only is not None:
        decay = [p for p in decay if id(p) in only]
        no_decay = [p for p in no_decay if id(p) in only]
    groups = []
    if decay:
        groups.append({"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append(
            {"name": f"{name}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0}
        )
    return groups


def _layer_groups(
    encoder: nn.Module, encoder_lr: float, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """The encoder's groups per timm layer, at ``encoder_lr * layer_decay ** (last - layer)``."""
    layers = layer_ids(encoder, layer_decay)
    last = max(layers.values(), default=0)
    params = dict(encoder.named_parameters())
    groups = []
    for layer in sorted(set(layers.values())):
        ids = {id(params[n]) for n, i in layers.items() if i == layer}
        lr = encoder_lr * layer_decay ** (last - layer)
        groups += _part_groups(f"encoder_layer{layer}", encoder, lr, weight_decay, only=ids)
    return groups


def layer_ids(encoder: nn.Module, layer_decay: float) -> dict[str, int]:
    """timm's layer id of every encoder parameter name (stem 0, blocks 1.., the final norm with
    the last block), for layer-wise decay; checks ``layer_decay`` and the encoder on the way."""
    if isinstance(layer_decay, bool) or not isinstance(layer_decay, int | float):
        raise ValueError(f"Expected `layer_decay` in (0, 1], got {layer_decay!r}.")
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"Expected `layer_decay` in (0, 1], got {layer_decay!r}.")
    matcher = getattr(encoder, "group_matcher", None)
    if not callable(matcher):
        raise ValueError(
            f"`layer_decay` needs an encoder with timm's `group_matcher()` to find its layers, "
            f"got {type(encoder).__name__}; use a timm model or set layer_decay=null."
        )
    return group_parameters(encoder, matcher(coarse=False), reverse=True)


def _split_decay(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``module``'s trainable parameters with and without weight decay, in module order."""
    skip = getattr(module, "no_weight_decay", None)
    names = set(skip()) if callable(skip) else set()
    # Any non-zero decay marks timm's decayed group: with 0 it puts every parameter in one group.
    split = param_groups_weight_decay(module, weight_decay=1.0, no_weight_decay_list=names)
    decay = [p for g in split if g["weight_decay"] for p in g["params"]]
    no_decay = [p for g in split if not g["weight_decay"] for p in g["params"]]
    return decay, no_decay


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
