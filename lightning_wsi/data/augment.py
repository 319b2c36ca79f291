"""Per-tile training augmentation whose randomness belongs to the tile, not to the process.

Each tile draws from :func:`~lightning_wsi.data.sampling.tile_rng` (seed, epoch, slide, tile), so
a tile is flipped and jittered the same way on any rank and in any worker: a slide-parallel run
sees exactly the inputs of a single-process run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["TileAugment", "color_jitter"]


@dataclass(frozen=True)
class TileAugment:
    """Dihedral flips/rotations and optional colour jitter, drawn per tile.

    Tissue has no up or down: the 8 symmetries of the square (flips and 90° rotations) are free
    augmentation. Colour jitter imitates stain and scanner variation. The geometric part runs on
    the uint8 pixels as they are read (cheap); the colour part needs floats, so the dataset only
    draws its factors and :func:`color_jitter` applies them where the tiles become float (on the
    training device, in ``SlideDataModule.on_after_batch_transfer``).

    Args:
        dihedral: apply a random one of the 8 flips/rotations to each tile.
        color_jitter: strength s in [0, 1): brightness, contrast and saturation factors drawn from
            [1 - s, 1 + s] and a hue shift from [-s / 10, s / 10] turns; 0 disables it.

    Example:
        >>> import numpy as np
        >>> from lightning_wsi.data.sampling import tile_rng
        >>> aug = TileAugment(color_jitter=0.1)
        >>> symmetry, factors = aug.draw(tile_rng(0, 0, "slide-1", 5))
        >>> aug.geometry(np.zeros((8, 8, 3), np.uint8), symmetry).shape, factors.shape
        ((8, 8, 3), (4,))
    """

    dihedral: bool = True
    color_jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.color_jitter < 1.0:
            raise ValueError(f"color_jitter must lie in [0, 1), got {self.color_jitter}")

    def draw(self, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """One tile's symmetry (0-7) and colour factors (brightness, contrast, saturation, hue).

        Both are always drawn, so switching one part off leaves the other's draws unchanged.
        """
        symmetry = int(rng.integers(8))
        u = rng.uniform(-1.0, 1.0, size=4)
        s = self.color_jitter
        factors = np.array([1 + s * u[0], 1 + s * u[1], 1 + s * u[2], s / 10 * u[3]], np.float32)
        return (symmetry if self.dihedral else 0), factors

    @staticmethod
    def geometry(tile: np.ndarray, symmetry: int) -> np.ndarray:
        """Tile ``[H, W, C]`` under symmetry: ``symmetry % 4`` quarter turns, then a flip."""
        tile = np.rot90(tile, symmetry % 4)
        return tile[:, ::-1] if symmetry >= 4 else tile


def color_jitter(tiles: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Per-tile colour jitter of ``tiles`` ``[k, 3, H, W]`` float in [0, 1], vectorised.

    ``factors`` ``[k, 4]`` holds brightness, contrast, saturation (multiplicative) and hue (in
    turns), as :meth:`TileAugment.draw` gives them. Brightness scales, contrast blends with the
    tile's mean grey, saturation with its greyscale (as torchvision's ``adjust_*``); hue rotates
    the chroma plane of YIQ, a linear stand-in for an HSV hue shift that costs one 3x3 matrix per
    tile instead of an HSV round trip.
    """
    k = len(tiles)
    view = (k, 1, 1, 1)
    factors = factors.to(tiles)
    brightness, contrast, saturation, hue = factors.unbind(dim=1)
    luma = _LUMA.to(tiles)
    tiles = (tiles * brightness.view(view)).clamp_(0, 1)
    grey = torch.einsum("kchw,c->khw", tiles, luma).mean(dim=(1, 2)).view(view)
    tiles = (grey + contrast.view(view) * (tiles - grey)).clamp_(0, 1)
    grey = torch.einsum("kchw,c->khw", tiles, luma).unsqueeze(1)
    tiles = (grey + saturation.view(view) * (tiles - grey)).clamp_(0, 1)
    angle = 2 * torch.pi * hue
    cos, sin = torch.cos(angle), torch.sin(angle)
    rotation = torch.zeros(k, 3, 3, dtype=tiles.dtype, device=tiles.device)
    rotation[:, 0, 0] = 1
    rotation[:, 1, 1], rotation[:, 1, 2] = cos, -sin
    rotation[:, 2, 1], rotation[:, 2, 2] = sin, cos
    matrix = _YIQ_TO_RGB.to(tiles) @ rotation @ _RGB_TO_YIQ.to(tiles)
    return torch.einsum("kij,kjhw->kihw", matrix, tiles).clamp_(0, 1)


# Luma weights (ITU-R 601, as torchvision) and the RGB <-> YIQ transforms used for hue rotation.
_LUMA = torch.tensor([0.299, 0.587, 0.114])
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)
