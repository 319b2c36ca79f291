"""BatchNorm that always normalises with its running statistics.

Why: a BatchNorm layer in training mode normalises each tile by the statistics of the tiles it is
batched with, so a tile's features depend on which other tiles share its forward pass.
Slide-parallel training splits a slide's K tiles over ranks and chunks, and only a batch-independent
encoder gives the same gradients as one process holding all K tiles. Setting ``eval()`` is not
enough: Lightning 2.x does not call ``train()`` when fit starts and restores each submodule's
``training`` flag after validation, and any later ``train()`` call would switch batch statistics
back on. Replacing the layer makes the behaviour a property of the module, whatever its mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d
from torch import nn

__all__ = ["FrozenBatchNorm", "FrozenBatchNormAct", "freeze_batchnorm"]


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed running statistics and (optionally) trainable affine parameters.

    Unlike timm's ``FrozenBatchNorm2d``, ``weight`` and ``bias`` stay ``nn.Parameter``s, so an
    encoder trained end-to-end still learns its BatchNorm scales and shifts; ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` are buffers that no forward pass changes. Parameter
    and buffer names match ``nn.BatchNorm2d``, so state dicts load either way. Works for inputs of
    any rank (``[N, C]``, ``[N, C, H, W]``, ...), like ``F.batch_norm``. It is deliberately not a
    ``_BatchNorm`` subclass, so ``SyncBatchNorm.convert_sync_batchnorm`` leaves it alone.

    Args:
        num_features: Number of channels ``C``.
        eps: Added to the variance for numerical stability.
        affine: Whether the layer has ``weight`` and ``bias``.

    Example:
        >>> bn = FrozenBatchNorm(8)
        >>> bn.train()(torch.randn(4, 8, 5, 5)).shape
        torch.Size([4, 8, 5, 5])
        >>> bool(bn.running_mean.eq(0).all()), int(bn.num_batches_tracked)
        (True, 0)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm:
        """Build a frozen copy of ``bn`` that shares its parameter and buffer tensors.

        Args:
            bn: A BatchNorm layer that tracks running statistics.

        Returns:
            The frozen layer; ``bn``'s ``weight`` and ``bias`` Parameters are reused as they are.
        """
        frozen = cls(bn.num_features, eps=bn.eps, affine=bn.affine)
        frozen._copy_state(bn)
        return frozen

    def _copy_state(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        if bn.affine:
            self.weight = bn.weight
            self.bias = bn.bias
        self.running_mean = bn.running_mean
        self.running_var = bn.running_var
        if bn.num_batches_tracked is not None:
            self.num_batches_tracked = bn.num_batches_tracked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` ``[N, C, ...]`` with the running statistics."""
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.weight is not None}"


class FrozenBatchNormAct(FrozenBatchNorm):
    """Frozen stand-in for timm's ``BatchNormAct2d``: frozen BatchNorm, then dropout and activation.

    Example:
        >>> layer = FrozenBatchNormAct.from_batchnorm(BatchNormAct2d(8))
        >>> layer(torch.randn(2, 8, 3, 3)).min() >= 0  # ReLU by default
        tensor(True)
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_features, eps=eps, affine=affine)
        self.drop: nn.Module = nn.Identity()
        self.act: nn.Module = nn.Identity()

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNormAct:
        frozen = super().from_batchnorm(bn)
        frozen.drop = getattr(bn, "drop", nn.Identity())
        frozen.act = getattr(bn, "act", nn.Identity())
        return frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """BatchNorm with running statistics, then ``drop`` and ``act`` as in ``BatchNormAct2d``."""
        return self.act(self.drop(super().forward(x)))


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer in ``module`` by a ``FrozenBatchNorm`` (in place).

    Layers that track no running statistics (``track_running_stats=False``) have nothing to freeze
    and are left as they are. The replacements reuse the original Parameters, so an optimiser built
    before or after the call sees the same tensors.

    Args:
        module: Any module; the module itself is replaced too if it is a BatchNorm layer.

    Returns:
        ``module`` with frozen BatchNorm layers, or the replacement if ``module`` itself was one.

    Example:
        >>> net = freeze_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        >>> type(net[1]).__name__
        'FrozenBatchNorm'
    """
    replacement = _frozen_copy(module)
    if replacement is not None:
        return replacement
    for name, child in module.named_children():
        new_child = freeze_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _frozen_copy(module: nn.Module) -> FrozenBatchNorm | None:
    if not isinstance(module, nn.modules.batchnorm._BatchNorm):
        return None
    if module.running_mean is None or module.running_var is None:
        return None
    if isinstance(module, BatchNormAct2d):
        return FrozenBatchNormAct.from_batchnorm(module)
    return FrozenBatchNorm.from_batchnorm(module)
