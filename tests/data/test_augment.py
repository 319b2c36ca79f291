"""Per-tile augmentation: the 8 symmetries, colour jitter, randomness owned by the tile."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_wsi.data.augment import TileAugment, color_jitter
from lightning_wsi.data.sampling import tile_rng


def test_dihedral_draws_all_eight_symmetries_and_keeps_pixels():
    tile = np.random.default_rng().integers(0, 256, (6, 6, 3), dtype=np.uint8)
    aug, seen = TileAugment(), set()
    for t in range(200):
        symmetry, _ = aug.draw(tile_rng(0, 0, "s", t))
        out = aug.geometry(tile, symmetry)
        seen.add(np.ascontiguousarray(out).tobytes())
        assert np.array_equal(np.sort(out, axis=None), np.sort(tile, axis=None))
    assert len(seen) == 8
    assert TileAugment(dihedral=False).draw(tile_rng(0, 0, "s", 3))[0] == 0


def test_same_tile_same_draw_on_any_process():
    a = TileAugment(color_jitter=0.3).draw(tile_rng(1, 2, "s", 7))
    b = TileAugment(color_jitter=0.3).draw(tile_rng(1, 2, "s", 7))
    assert a[0] == b[0] and np.array_equal(a[1], b[1])
    c = TileAugment(color_jitter=0.3).draw(tile_rng(1, 3, "s", 7))
    assert not np.array_equal(a[1], c[1])


def test_neutral_jitter_is_identity_and_jitter_changes_colour():
    tiles = torch.rand(4, 3, 8, 8)
    neutral = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(4, 1)
    torch.testing.assert_close(color_jitter(tiles, neutral), tiles, rtol=0, atol=1e-5)
    grey = color_jitter(tiles, torch.tensor([[1.0, 1.0, 0.0, 0.0]]).repeat(4, 1))
    torch.testing.assert_close(grey[:, 0], grey[:, 1], rtol=0, atol=1e-6)  # saturation 0
    shifted = color_jitter(tiles, torch.tensor([[1.0, 1.0, 1.0, 0.05]]).repeat(4, 1))
    assert (shifted - tiles).abs().mean() > 0.01
    one = color_jitter(tiles[1:2], torch.tensor([[1.2, 0.8, 1.1, 0.02]]))
    many = color_jitter(tiles, torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.2, 0.8, 1.1, 0.02]] * 2))
    torch.testing.assert_close(many[1:2], one, rtol=0, atol=1e-6)  # per tile, not per stack


def test_jitter_strength_is_validated():
    with pytest.raises(ValueError, match="color_jitter"):
        TileAugment(color_jitter=1.5)
