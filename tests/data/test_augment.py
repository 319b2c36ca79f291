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


def test_jitter_in_chunks_keeps_uint8_and_rounds_the_float_jitter():
    from lightning_wsi.data.transfer import jitter_tiles, normalize, normalize_tiles

    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 31)))
    tiles = torch.randint(0, 256, (7, 3, 16, 16), dtype=torch.uint8, generator=gen)
    factors = torch.stack([
        torch.empty(7).uniform_(0.7, 1.3, generator=gen) for _ in range(3)
    ] + [torch.empty(7).uniform_(-0.05, 0.05, generator=gen)], dim=1)  # fmt: skip
    out = jitter_tiles({"tiles": tiles, "color_jitter": factors, "slide_id": "s"}, chunk=3)
    assert out["tiles"].dtype == torch.uint8 and "color_jitter" not in out
    expected = color_jitter(tiles.float() / 255, factors).mul(255).round().to(torch.uint8)
    assert torch.equal(out["tiles"], expected)  # chunks of 3 = the whole slide at once
    assert out["slide_id"] == "s"
    plain = jitter_tiles({"tiles": tiles})["tiles"]
    assert plain is tiles  # nothing to jitter: no copy
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    assert torch.equal(
        normalize(tiles, mean, std), normalize_tiles({"tiles": tiles}, mean, std)["tiles"]
    )
