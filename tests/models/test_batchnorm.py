"""FrozenBatchNorm: running statistics in every mode, affine parameters still trainable."""

from __future__ import annotations

import copy

import timm
import torch
from timm.layers import BatchNormAct2d
from torch import nn

from lightning_wsi.models.batchnorm import FrozenBatchNorm, FrozenBatchNormAct, freeze_batchnorm


def _trained_bn(channels: int = 6) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    for _ in range(3):
        bn(torch.randn(8, channels, 4, 4) * 3 + 1)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    return bn


def test_frozen_bn_in_train_mode_equals_bn_in_eval_mode_and_keeps_its_buffers() -> None:
    bn = _trained_bn()
    frozen = FrozenBatchNorm.from_batchnorm(copy.deepcopy(bn)).train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    x = torch.randn(5, 6, 4, 4)
    torch.testing.assert_close(frozen(x), bn.eval()(x))
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_affine_parameters_stay_trainable_parameters() -> None:
    frozen = FrozenBatchNorm.from_batchnorm(_trained_bn())
    assert {name for name, _ in frozen.named_parameters()} == {"weight", "bias"}
    frozen(torch.randn(3, 6, 2, 2)).sum().backward()
    assert frozen.weight.grad is not None and frozen.bias.grad is not None
    assert frozen.running_mean.grad is None


def test_freeze_batchnorm_replaces_every_layer_and_keeps_the_state_dict() -> None:
    net = timm.create_model("test_resnet", num_classes=0)
    net(torch.randn(4, 3, 32, 32))  # moves the running statistics away from their init
    reference = copy.deepcopy(net).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    frozen = freeze_batchnorm(net).train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in frozen.modules())
    assert set(frozen.state_dict()) == set(state)
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, state[key]), key
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(frozen(x), reference(x))


def test_freeze_batchnorm_handles_timm_batchnorm_act() -> None:
    bn_act = BatchNormAct2d(6, act_layer=nn.ReLU)
    bn_act(torch.randn(8, 6, 4, 4) * 2 + 1)
    frozen = freeze_batchnorm(nn.Sequential(copy.deepcopy(bn_act)))[0]
    assert isinstance(frozen, FrozenBatchNormAct)
    x = torch.randn(4, 6, 4, 4)
    torch.testing.assert_close(frozen.train()(x), bn_act.eval()(x))


def test_layers_without_running_statistics_are_left_alone() -> None:
    bn = nn.BatchNorm2d(4, track_running_stats=False)
    assert freeze_batchnorm(bn) is bn
