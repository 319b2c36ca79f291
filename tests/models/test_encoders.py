"""Encoders: the timm factory, freezing, local weights, checkpointing and channels-last."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from lightning_wsi.models.encoders import (
    build_encoder,
    create_encoder,
    encoder_feature_dim,
    freeze_all_but_last_blocks,
    load_encoder_weights,
)


def _trainable(module: nn.Module) -> set[str]:
    return {name for name, p in module.named_parameters() if p.requires_grad}


def test_create_encoder_returns_pooled_features() -> None:
    enc = create_encoder("test_resnet")
    assert enc(torch.randn(3, 3, 32, 32)).shape == (3, enc.num_features)


def test_unknown_model_name_says_what_came() -> None:
    with pytest.raises(ValueError, match="timm model name.*'no_such_net'"):
        create_encoder("no_such_net")


def test_feature_dim_of_a_plain_module_by_dummy_forward() -> None:
    net = nn.Sequential(nn.Conv2d(3, 7, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).train()
    assert encoder_feature_dim(net) == 7
    assert net.training  # the dummy forward restored the mode
    with pytest.raises(ValueError, match=r"\[k, D\]"):
        encoder_feature_dim(nn.Conv2d(3, 7, 3))


def test_freeze_keeps_everything_frozen_and_in_eval_mode() -> None:
    enc = build_encoder("test_resnet", freeze=True)
    assert _trainable(enc) == set()
    assert not enc.training


def test_last_block_of_a_resnet() -> None:
    enc = create_encoder("test_resnet")
    freeze_all_but_last_blocks(enc, 1)
    assert _trainable(enc) == {n for n, _ in enc.named_parameters() if n.startswith("layer4.")}
    freeze_all_but_last_blocks(enc, 5)  # stem + 4 blocks: everything
    assert _trainable(enc) == {n for n, _ in enc.named_parameters()}


@pytest.mark.parametrize(("pool", "head"), [("token", set()), ("avg", {"fc_norm"})])
def test_last_blocks_of_a_vit(pool: str, head: set[str]) -> None:
    enc = create_encoder("test_vit", img_size=32, global_pool=pool)
    freeze_all_but_last_blocks(enc, 2)
    prefixes = ("blocks.4.", "blocks.5.", "norm.", *(f"{h}." for h in head))
    expected = {n for n, _ in enc.named_parameters() if n.startswith(prefixes)}
    assert _trainable(enc) == expected
    assert expected  # the final norm (or fc_norm) trains with the last block


def test_last_blocks_out_of_range_or_without_matcher() -> None:
    with pytest.raises(ValueError, match="between 1 and 5.*got 6"):
        freeze_all_but_last_blocks(create_encoder("test_resnet"), 6)
    with pytest.raises(ValueError, match="group_matcher"):
        freeze_all_but_last_blocks(nn.Sequential(nn.Conv2d(3, 4, 3)), 1)
    with pytest.raises(ValueError, match="at most one"):
        build_encoder("test_resnet", freeze=True, train_last_n_blocks=1)


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix", "with_classifier"])
def test_load_local_weights(tmp_path: Path, wrap: str) -> None:
    source = timm.create_model("test_resnet", num_classes=10 if wrap == "with_classifier" else 0)
    state = source.state_dict()
    if wrap == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    enc = build_encoder("test_resnet", checkpoint_path=path)
    source.reset_classifier(0)
    _assert_same_weights(enc, source)


def test_load_weights_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_encoder_weights(create_encoder("test_resnet"), tmp_path / "missing.pth")
    path = tmp_path / "vit.pth"
    torch.save(create_encoder("test_vit", img_size=32).state_dict(), path)
    with pytest.raises(ValueError, match="does not match.*missing keys"):
        load_encoder_weights(create_encoder("test_resnet"), path)


def _outputs_and_grads(enc: nn.Module, tiles: torch.Tensor) -> tuple[torch.Tensor, list]:
    out = enc(tiles)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in enc.parameters()]


@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
@pytest.mark.parametrize("option", ["grad_checkpointing", "channels_last"])
def test_options_do_not_change_outputs_or_gradients(name: str, option: str) -> None:
    kwargs = {"img_size": 32} if name == "test_vit" else {}
    plain = build_encoder(name, encoder_kwargs=kwargs)
    other = build_encoder(name, encoder_kwargs=kwargs, **{option: True})
    other.load_state_dict(plain.state_dict())
    tiles = torch.randn(4, 3, 32, 32)
    if option == "channels_last":
        tiles_other = tiles.contiguous(memory_format=torch.channels_last)
    else:
        tiles_other = tiles
        assert other.grad_checkpointing
    out, grads = _outputs_and_grads(plain, tiles)
    out_other, grads_other = _outputs_and_grads(other, tiles_other)
    torch.testing.assert_close(out_other, out, rtol=1e-5, atol=1e-5)
    for g, g_other in zip(grads, grads_other, strict=True):
        torch.testing.assert_close(g_other, g, rtol=1e-4, atol=1e-5)


def test_grad_checkpointing_needs_timm() -> None:
    with pytest.raises(ValueError, match="set_grad_checkpointing"):
        build_encoder(nn.Sequential(nn.Conv2d(3, 4, 3)), grad_checkpointing=True)
