"""2D sine-cosine positional encoding of tiles from their slide coordinates.

Tile coordinates are level-0 pixels, and a slide's tiles lie on a grid whose step is the level-0
size of a tile: it differs between scanners (a 0.25 mpp slide has twice the step of a 0.5 mpp one at
the same magnification). Positions are therefore measured in tiles, relative to the top-left tile of
the set, so one unit is one tile on every slide and the encoding does not depend on where the tissue
lies on the glass. The encoding is the fixed 2D sin-cos of MAE (He et al. 2022): half the channels
encode the column, half the row, each as sines and cosines at geometrically spaced frequencies.
"""

from __future__ import annotations

import torch

__all__ = ["grid_positions", "infer_grid_step", "sincos_2d"]


def infer_grid_step(coords: torch.Tensor) -> int:
    """The grid step of integer tile coordinates: the GCD of all offsets from the first tile.

    Args:
        coords: ``[K, 2]`` tile coordinates on a regular grid.

    Returns:
        The step in coordinate units; 1 when it cannot be told (a single tile, all tiles equal).

    Example:
        >>> infer_grid_step(torch.tensor([[100, 50], [612, 50], [356, 818]]))
        256
    """
    offsets = (coords.round().long() - coords[:1].round().long()).abs().flatten()
    offsets = offsets[offsets > 0]
    if offsets.numel() == 0:
        return 1
    while offsets.numel() > 1:  # pairwise GCD tree: log2(K) vectorised steps
        if offsets.numel() % 2:
            offsets = torch.cat([offsets, offsets[-1:]])
        offsets = torch.gcd(offsets[0::2], offsets[1::2])
    return int(offsets.item())


def grid_positions(coords: torch.Tensor, step: float | None = None) -> torch.Tensor:
    """Tile positions in units of tiles, relative to the set's top-left corner.

    Args:
        coords: ``[K, 2]`` level-0 ``(x, y)`` coordinates.
        step: Level-0 size of one grid step in pixels; ``None`` infers it (``infer_grid_step``).

    Returns:
        ``[K, 2]`` float positions (column, row), the minimum of each being 0.

    Example:
        >>> grid_positions(torch.tensor([[512, 256], [768, 256], [512, 1024]])).tolist()
        [[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]]
    """
    if step is None:
        step = infer_grid_step(coords)
    coords = coords.to(torch.float64)
    return ((coords - coords.min(dim=0).values) / step).to(torch.float32)


def sincos_2d(positions: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D sine-cosine encoding.

    Args:
        positions: ``[K, 2]`` (column, row) positions.
        dim: Encoding size, a multiple of 4.
        temperature: Longest wavelength, in position units, is ``2 pi temperature``.

    Returns:
        ``[K, dim]``: ``[sin(x w), cos(x w), sin(y w), cos(y w)]``,
        ``w_i = temperature^(-i / (dim / 4))``.

    Example:
        >>> sincos_2d(torch.zeros(3, 2), dim=8)[0].tolist()
        [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    """
    if dim % 4:
        raise ValueError(f"Expected the positional encoding size to be a multiple of 4, got {dim}.")
    quarter = dim // 4
    omega = temperature ** (
        -torch.arange(quarter, dtype=torch.float32, device=positions.device) / quarter
    )
    angles_x = positions[:, :1].float() * omega
    angles_y = positions[:, 1:2].float() * omega
    return torch.cat([angles_x.sin(), angles_x.cos(), angles_y.sin(), angles_y.cos()], dim=1)
