"""Per-tile augmentation: the 8 symmetries, colour jitter, randomness owned by the tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_wsi.data.augment import TileAugment, _jitter
from lightning_wsi.data.sampling import tile_rng


def test_dihedral_draws_all_eight_symmetries_and_keeps_pixels():
    tile = torch.rand(1, 3, 6, 6)
    seen = set()
    for t in range(200):
        out = TileAugment()(tile, [tile_rng(0, 0, "s", t)])
        seen.add(out.numpy().tobytes())
        assert torch.equal(out.flatten().sort().values, tile.flatten().sort().values)
    assert len(seen) == 8


def test_same_tile_same_draw_whatever_the_stack():
    tiles = torch.rand(5, 3, 8, 8)
    aug = TileAugment(color_jitter=0.3)
    whole = aug(tiles, [tile_rng(1, 2, "s", t) for t in range(5)])
    part = aug(tiles[2:4], [tile_rng(1, 2, "s", t) for t in (2, 3)])
    torch.testing.assert_close(part, whole[2:4], rtol=0, atol=1e-6)


def test_neutral_jitter_is_identity_and_jitter_changes_colour():
    tiles = torch.rand(4, 3, 8, 8)
    one, zero = torch.ones(4), torch.zeros(4)
    torch.testing.assert_close(_jitter(tiles, one, one, one, zero), tiles, rtol=0, atol=1e-5)
    grey = _jitter(tiles, one, one, zero, zero)  # saturation 0: every pixel grey
    torch.testing.assert_close(grey[:, 0], grey[:, 1], rtol=0, atol=1e-6)
    shifted = _jitter(tiles, one, one, one, torch.full((4,), 0.05))
    assert (shifted - tiles).abs().mean() > 0.01


def test_jitter_strength_is_validated():
    with pytest.raises(ValueError, match="color_jitter"):
        TileAugment(color_jitter=1.5)
    rngs = [np.random.default_rng(0)]
    with pytest.raises(ValueError, match="one generator per tile"):
        TileAugment()(torch.rand(2, 3, 4, 4), rngs)
