"""Per-tile training augmentation whose randomness belongs to the tile, not to the process.

Each tile draws from :func:`~lightning_wsi.data.sampling.tile_rng` (seed, epoch, slide, tile), so
a tile is flipped and jittered the same way on any rank and in any worker: a slide-parallel run
sees exactly the inputs of a single-process run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TileAugment"]


@dataclass(frozen=True)
class TileAugment:
    """Dihedral flips/rotations and optional colour jitter of a stack of tiles.

    Tissue has no up or down: the 8 symmetries of the square (flips and 90° rotations) are free
    augmentation. Colour jitter imitates stain and scanner variation.

    Args:
        dihedral: apply a random one of the 8 flips/rotations to each tile.
        color_jitter: strength s in [0, 1): brightness, contrast and saturation factors drawn from
            [1 - s, 1 + s] and a hue shift from [-s / 10, s / 10]; 0 disables it.

    Example:
        >>> import torch
        >>> from lightning_wsi.data.sampling import tile_rng
        >>> tiles = torch.rand(4, 3, 8, 8)
        >>> rngs = [tile_rng(0, 0, "slide-1", t) for t in range(4)]
        >>> TileAugment(color_jitter=0.1)(tiles, rngs).shape
        torch.Size([4, 3, 8, 8])
    """

    dihedral: bool = True
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must lie in [0, 1), got {self.color_jitter}")

    def __call__(self, tiles: torch.Tensor, rngs: Sequence[np.random.Generator]) -> torch.Tensor:
        """Augment ``tiles`` ``[k, 3, H, W]`` float in [0, 1], one generator per tile."""
        if len(rngs) != len(tiles):
            raise ValueError(f"need one generator per tile, got {len(rngs)} for {len(tiles)}")
        if len(tiles) == 0:
            return tiles
        s = self.color_jitter
        draws = [(int(rng.integers(8)), rng.uniform(-1.0, 1.0, size=4)) for rng in rngs]
        if self.dihedral:
            tiles = torch.stack(
                [
                    _dihedral(tile, symmetry)
                    for tile, (symmetry, _) in zip(tiles, draws, strict=True)
                ]
            )
        if s > 0:
            u = torch.as_tensor(np.stack([d for _, d in draws]), dtype=tiles.dtype)
            tiles = _jitter(
                tiles, 1 + s * u[:, 0], 1 + s * u[:, 1], 1 + s * u[:, 2], s / 10 * u[:, 3]
            )
        return tiles


def _dihedral(tile: torch.Tensor, symmetry: int) -> torch.Tensor:
    """One of the 8 symmetries of the square: ``symmetry % 4`` quarter turns, then a flip."""
    tile = torch.rot90(tile, symmetry % 4, dims=(1, 2))
    return torch.flip(tile, dims=(2,)) if symmetry >= 4 else tile


# Luma weights (ITU-R 601, as torchvision) and the RGB <-> YIQ transforms used for hue rotation.
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


def _jitter(
    tiles: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor,
) -> torch.Tensor:
    """Per-tile colour jitter, vectorised over the stack; factors are ``[k]``, hue in turns.

    Brightness scales, contrast blends with the tile's mean grey, saturation with its greyscale
    (as torchvision's ``adjust_*``); hue rotates the chroma plane of YIQ, a linear approximation
    of an HSV hue shift that costs one 3x3 matrix per tile instead of an HSV round trip.
    """
    k = len(tiles)
    view = (k, 1, 1, 1)
    luma = _LUMA.to(tiles)
    tiles = (tiles * brightness.view(view)).clamp_(0, 1)
    grey = torch.einsum("kchw,c->khw", tiles, luma).mean(dim=(1, 2)).view(view)
    tiles = (grey + contrast.view(view) * (tiles - grey)).clamp_(0, 1)
    grey = torch.einsum("kchw,c->khw", tiles, luma).unsqueeze(1)
    tiles = (grey + saturation.view(view) * (tiles - grey)).clamp_(0, 1)
    angle = 2 * torch.pi * hue
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(k, 3, 3, dtype=tiles.dtype)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    matrix = _YIQ_TO_RGB.to(tiles) @ rotation @ _RGB_TO_YIQ.to(tiles)
    return torch.einsum("kij,kjhw->kihw", matrix, tiles).clamp_(0, 1)
