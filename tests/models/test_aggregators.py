"""Aggregators: shapes, attention, permutation invariance, the transformer's shortcuts."""

from __future__ import annotations

import pytest
import torch

from lightning_wsi.models.aggregators import (
    AGGREGATORS,
    AggregatorOutput,
    TransformerAggregator,
    build_aggregator,
    grid_positions,
    infer_grid_step,
    sincos_2d,
)

D = 24
SMALL = {
    "gma": {"hidden_dim": 16, "attention_dim": 8},
    "mean": {"hidden_dim": 16},
    "transformer": {"hidden_dim": 16, "num_heads": 2, "num_layers": 2},
}


def _aggregator(name: str, num_outputs: int = 3, **kwargs) -> torch.nn.Module:
    return build_aggregator(name, in_dim=D, num_outputs=num_outputs, **{**SMALL[name], **kwargs})


def _coords(k: int, step: int = 512) -> torch.Tensor:
    cells = torch.randperm(100 * 100)[:k]
    return torch.stack([cells % 100, cells // 100], dim=1).long() * step + 1000


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
@pytest.mark.parametrize("k", [1, 2, 37])
def test_output_shapes_and_attention_sums_to_one(name: str, k: int) -> None:
    out = _aggregator(name).eval()(torch.randn(k, D), _coords(k))
    assert isinstance(out, AggregatorOutput)
    assert out.logits.shape == (3,)
    assert out.attention.shape == (k,)
    assert (out.attention >= 0).all()
    torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("gma", {}), ("mean", {}), ("transformer", {"positional_encoding": False})],
)
def test_permutation_invariance(name: str, kwargs: dict) -> None:
    agg = _aggregator(name, **kwargs).eval()
    features, coords = torch.randn(50, D), _coords(50)
    perm = torch.randperm(50)
    out = agg(features, coords)
    permuted = agg(features[perm], coords[perm])
    torch.testing.assert_close(permuted.logits, out.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(permuted.attention, out.attention[perm], rtol=1e-5, atol=1e-7)


def test_transformer_with_positions_is_a_function_of_the_tile_set() -> None:
    agg = _aggregator("transformer", positional_encoding=True).eval()
    features, coords = torch.randn(30, D), _coords(30)
    perm = torch.randperm(30)
    out = agg(features, coords)
    # Tiles moved together with their coordinates: the same set, the same output.
    torch.testing.assert_close(agg(features[perm], coords[perm]).logits, out.logits)
    # Features moved to other positions: the positional encoding changes the output.
    assert not torch.allclose(agg(features[perm], coords).logits, out.logits, atol=1e-4)


def test_transformer_positions_ignore_translation_and_grid_scale() -> None:
    agg = _aggregator("transformer", positional_encoding=True).eval()
    features, coords = torch.randn(20, D), _coords(20, step=256)
    out = agg(features, coords).logits
    torch.testing.assert_close(agg(features, coords + 4096).logits, out)
    torch.testing.assert_close(agg(features, coords * 2).logits, out)  # a 2x larger level-0 tile


def test_transformer_needs_coords_with_positional_encoding() -> None:
    with pytest.raises(ValueError, match="coords"):
        _aggregator("transformer", positional_encoding=True)(torch.randn(4, D), None)


def test_transformer_cls_row_matches_full_attention_layer() -> None:
    """The last layer's class-token shortcut equals the full layer's first row."""
    agg = _aggregator("transformer", positional_encoding=False).eval()
    layer = agg.layers[-1]
    x = torch.randn(12, 16)
    cls, attention = layer.forward_cls(x)
    torch.testing.assert_close(cls, layer(x)[0], rtol=1e-5, atol=1e-6)
    q, k, _ = layer._qkv(x)
    scores = torch.einsum("hd,hnd->hn", q[:, 0], k[:, 1:]) / q.shape[-1] ** 0.5
    torch.testing.assert_close(attention, scores.softmax(dim=-1).mean(dim=0))


def test_transformer_4096_tiles_forward_on_cpu() -> None:
    agg = TransformerAggregator(in_dim=64, num_outputs=1, hidden_dim=64, num_heads=4).eval()
    features, coords = torch.randn(4096, 64), _coords(4096)
    with torch.no_grad():
        out = agg(features, coords)
    assert out.logits.shape == (1,) and torch.isfinite(out.logits).all()
    assert out.attention.shape == (4096,)
    torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("name", sorted(AGGREGATORS))
def test_gradients_reach_every_tile_feature(name: str) -> None:
    features = torch.randn(9, D, requires_grad=True)
    _aggregator(name)(features, _coords(9)).logits.sum().backward()
    assert (features.grad.abs().sum(dim=1) > 0).all()


def test_unknown_aggregator_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"\['gma', 'mean', 'transformer'\].*'attention'"):
        build_aggregator("attention", in_dim=D, num_outputs=1)


def test_transformer_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        TransformerAggregator(in_dim=D, hidden_dim=18, num_heads=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        TransformerAggregator(in_dim=D, hidden_dim=6, num_heads=2)


def test_infer_grid_step() -> None:
    coords = _coords(40, step=448)
    assert infer_grid_step(coords) == 448
    assert infer_grid_step(coords[:1]) == 1
    assert infer_grid_step(torch.tensor([[7, 7], [7, 7]])) == 1


def test_grid_positions_are_in_tiles_from_the_top_left() -> None:
    coords = torch.tensor([[1000, 2000], [1000 + 3 * 224, 2000], [1000, 2000 + 224]])
    expected = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(grid_positions(coords), expected)
    torch.testing.assert_close(grid_positions(coords, step=112), expected * 2)


def test_sincos_2d_is_the_mae_encoding() -> None:
    positions = torch.tensor([[2.0, 5.0]])
    enc = sincos_2d(positions, dim=8)
    omega = torch.tensor([1.0, 0.01])  # 10000 ** (-i / 2) for i = 0, 1
    expected = torch.cat(
        [(2 * omega).sin(), (2 * omega).cos(), (5 * omega).sin(), (5 * omega).cos()]
    )
    torch.testing.assert_close(enc[0], expected)
