"""Optimiser parameter groups, the warm-up + cosine schedule, and the AdamW implementation."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import timm
import torch
from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision
from slide_batches import make_slides, make_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_wsi import SlideModule
from lightning_wsi.models.aggregators import build_aggregator
from lightning_wsi.models.module import _adamw_implementation
from lightning_wsi.models.optim import WarmupCosine, param_groups


def test_groups_split_by_part_and_decay() -> None:
    encoder, aggregator = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm(4)), nn.Linear(4, 1)
    groups = {g["name"]: g for g in param_groups(encoder, aggregator, 1e-5, 1e-3, 0.05)}
    assert set(groups) == {"encoder", "encoder_no_decay", "aggregator", "aggregator_no_decay"}
    assert [p.shape for p in groups["encoder"]["params"]] == [(4, 3, 3, 3)]
    assert len(groups["encoder_no_decay"]["params"]) == 3  # conv bias, norm weight and bias
    assert groups["encoder"]["lr"] == 1e-5 and groups["aggregator"]["lr"] == 1e-3
    assert groups["aggregator"]["weight_decay"] == 0.05
    assert groups["aggregator_no_decay"]["weight_decay"] == 0.0


def test_frozen_parameters_are_left_out() -> None:
    encoder = nn.Linear(4, 4).requires_grad_(False)
    groups = param_groups(encoder, nn.Linear(4, 1), 1e-5, 1e-3, 0.0)
    assert [g["name"] for g in groups] == ["aggregator", "aggregator_no_decay"]


def test_warmup_then_cosine() -> None:
    f = WarmupCosine(total_steps=20, warmup_steps=4)
    assert [f(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert f(4) == 1.0
    assert f(12) == pytest.approx(0.5)  # half-way through the 16 decay steps
    assert f(20) == pytest.approx(0.0, abs=1e-12)
    decay = [f(s) for s in range(4, 21)]
    assert all(a > b for a, b in zip(decay, decay[1:], strict=False))
    assert f(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 16)))


def test_unknown_length_keeps_the_rate_after_warmup() -> None:
    f = WarmupCosine(total_steps=None, warmup_steps=2)
    assert [f(s) for s in (0, 1, 2, 1000)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


# ----------------------------------------------------------------- weight decay as timm decides it


def _names(module: nn.Module, params: list[nn.Parameter]) -> set[str]:
    ids = {id(p) for p in params}
    return {n for n, p in module.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])  # the split must not depend on the value
def test_vit_tokens_and_position_embeddings_skip_weight_decay(weight_decay: float) -> None:
    encoder = timm.create_model("test_vit", num_classes=0, img_size=32)
    assert {"cls_token", "pos_embed"} <= encoder.no_weight_decay()
    groups = {
        g["name"]: g for g in param_groups(encoder, nn.Linear(64, 1), 1e-4, 1e-3, weight_decay)
    }
    decay = _names(encoder, groups["encoder"]["params"])
    no_decay = _names(encoder, groups["encoder_no_decay"]["params"])
    assert {"cls_token", "pos_embed"} <= no_decay
    assert {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight"} <= decay
    assert "blocks.0.attn.qkv.bias" in no_decay and "norm.weight" in no_decay
    assert not decay & no_decay
    assert len(decay) + len(no_decay) == len(list(encoder.parameters()))
    assert groups["encoder"]["weight_decay"] == weight_decay
    assert groups["encoder_no_decay"]["weight_decay"] == 0.0


class _TokenAggregator(nn.Module):
    """An aggregator with a learned 2-D token that it keeps out of weight decay, as timm does."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 4))
        self.head = nn.Linear(4, 1)

    def no_weight_decay(self) -> set[str]:
        return {"token"}


def test_aggregator_no_weight_decay_is_honoured() -> None:
    aggregator = _TokenAggregator()
    groups = {g["name"]: g for g in param_groups(nn.Linear(4, 4), aggregator, 1e-4, 1e-3, 0.1)}
    assert _names(aggregator, groups["aggregator"]["params"]) == {"head.weight"}
    assert _names(aggregator, groups["aggregator_no_decay"]["params"]) == {"token", "head.bias"}


# ----------------------------------------------------------------- AdamW implementation


def _precision(name: str) -> dict[str, Any]:
    """Trainer arguments for a precision; "16-mixed-scaler" forces fp16 with a GradScaler on the
    CPU, where Lightning 2.6 turns ``precision="16-mixed"`` into bf16-mixed."""
    if name == "16-mixed-scaler":
        return {"plugins": [MixedPrecision("16-mixed", "cpu")]}
    return {"precision": name}


def _refuses_fused_clipping(trainer: L.Trainer) -> bool:
    """Whether Lightning's own precision plugin raises when clipping under a fused AdamW."""
    fused = torch.optim.AdamW([nn.Parameter(torch.ones(2, 2))], fused=True)
    try:
        trainer.precision_plugin.clip_gradients(fused, trainer.gradient_clip_val or 0.0)
    except RuntimeError as error:
        assert "performs unscaling of gradients internally" in str(error)
        return True
    return False


@pytest.mark.parametrize("clip", [None, 0.0, 1.0])
@pytest.mark.parametrize(
    "precision", ["32-true", "bf16-true", "bf16-mixed", "16-mixed", "16-mixed-scaler"]
)
def test_adamw_is_fused_unless_the_precision_plugin_refuses_it_for_clipping(
    precision: str, clip: float | None
) -> None:
    trainer = make_trainer(gradient_clip_val=clip, **_precision(precision))
    groups = param_groups(nn.Linear(4, 4), nn.Linear(4, 1), 1e-4, 1e-3, 0.01)
    mixed = precision.endswith(("mixed", "scaler"))
    expected = {"foreach": True} if mixed and clip else {"fused": True}
    assert _adamw_implementation(groups, trainer) == expected
    assert _refuses_fused_clipping(trainer) == ("foreach" in expected)  # mirrors Lightning
    assert _adamw_implementation(groups) == {"fused": True}  # no trainer: a module on its own


def test_a_grad_scaler_that_does_not_refuse_still_gets_foreach() -> None:
    """FSDP's fp16 plugin skips ``unscale_`` for a fused optimiser and would clip scaled grads."""
    with warnings.catch_warnings():  # its default scaler is a CUDA one, disabled on this CPU
        warnings.simplefilter("ignore")
        plugin = FSDPPrecision("16-mixed")
    assert plugin.scaler is not None
    groups = param_groups(nn.Linear(4, 4), nn.Linear(4, 1), 1e-4, 1e-3, 0.01)
    clipping = SimpleNamespace(precision_plugin=plugin, gradient_clip_val=0.5)
    assert _adamw_implementation(groups, clipping) == {"foreach": True}
    no_clip = SimpleNamespace(precision_plugin=plugin, gradient_clip_val=None)
    assert _adamw_implementation(groups, no_clip) == {"fused": True}


class _RecordClippedNorm(SlideModule):
    """Records the total gradient norm right after Lightning clipped it."""

    clipped_norms: list[float]

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        norms = [p.grad.float().norm() for p in self.parameters() if p.grad is not None]
        self.clipped_norms.append(float(torch.stack(norms).norm()))


@pytest.mark.parametrize(
    ("precision", "clip", "implementation"),
    [
        ("bf16-mixed", 1.0, "foreach"),  # trainer=gpu's precision and clipping
        ("16-mixed-scaler", 1.0, "foreach"),  # fp16 with a GradScaler: unscale, clip, step
        ("16-mixed-scaler", None, "fused"),  # the fused kernel unscales itself
    ],
)
def test_mixed_precision_with_clipping_trains(
    precision: str, clip: float | None, implementation: str
) -> None:
    module = _RecordClippedNorm(
        "test_resnet", "gma", "binary", aggregator_kwargs={"hidden_dim": 16, "attention_dim": 8}
    )
    module.clipped_norms = []
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = make_trainer(max_steps=2, gradient_clip_val=clip, **_precision(precision))
    trainer.fit(module, DataLoader(make_slides(2, k=4), batch_size=None))
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults[implementation] is True
    after = dict(module.named_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    moved = {n for n, p in after.items() if not torch.equal(p, before[n])}
    assert any(n.startswith("encoder.") for n in moved)
    assert any(n.startswith("aggregator.") for n in moved)
    assert len(module.clipped_norms) == 2
    if clip:  # clipped the true (unscaled) gradients, not the loss-scaled ones
        assert all(0 < norm <= clip * 1.001 for norm in module.clipped_norms)


def test_the_transformer_aggregators_class_token_gets_no_weight_decay() -> None:
    aggregator = build_aggregator("transformer", 16, 1, hidden_dim=16, num_heads=2, num_layers=1)
    groups = {g["name"]: g for g in param_groups(nn.Linear(4, 4), aggregator, 1e-5, 1e-3, 0.05)}
    no_decay = {id(p) for p in groups["aggregator_no_decay"]["params"]}
    decay = {id(p) for p in groups["aggregator"]["params"]}
    assert id(aggregator.cls_token) in no_decay
    assert id(aggregator.projection.weight) in decay


# ----------------------------------------------------------------- layer-wise learning-rate decay


def _lr_of(encoder: nn.Module, groups: list[dict[str, Any]]) -> dict[str, float]:
    names = {id(p): n for n, p in encoder.named_parameters()}
    return {names[id(p)]: g["lr"] for g in groups for p in g["params"] if id(p) in names}


def test_layer_decay_gives_each_vit_layer_its_rate() -> None:
    """test_vit has timm layers 0 (stem) to 6 (blocks.5 with the final norm): layer i gets
    ``encoder_lr * layer_decay ** (6 - i)``."""
    encoder = timm.create_model("test_vit", num_classes=0, img_size=32)
    groups = param_groups(encoder, nn.Linear(64, 1), 1e-3, 1e-2, 0.05, layer_decay=0.5)
    lr = _lr_of(encoder, groups)
    assert len(lr) == len(list(encoder.parameters()))  # each in exactly one group
    assert lr["cls_token"] == lr["pos_embed"] == lr["patch_embed.proj.weight"] == 1e-3 * 0.5**6
    for b in range(6):
        assert lr[f"blocks.{b}.attn.qkv.weight"] == 1e-3 * 0.5 ** (5 - b)
        assert lr[f"blocks.{b}.norm2.bias"] == 1e-3 * 0.5 ** (5 - b)
    assert lr["norm.weight"] == 1e-3
    by_name = {g["name"]: g for g in groups}
    assert _names(encoder, by_name["encoder_layer0_no_decay"]["params"]) == {
        "cls_token", "pos_embed", "patch_embed.proj.bias"
    }  # fmt: skip
    assert _names(encoder, by_name["encoder_layer0"]["params"]) == {"patch_embed.proj.weight"}
    assert by_name["encoder_layer3"]["weight_decay"] == 0.05
    assert by_name["encoder_layer3_no_decay"]["weight_decay"] == 0.0
    assert [(by_name[n]["lr"], by_name[n]["weight_decay"]) for n in
            ("aggregator", "aggregator_no_decay")] == [(1e-2, 0.05), (1e-2, 0.0)]  # fmt: skip
    assert len(groups) == 7 * 2 + 2


def test_layer_decay_scales_with_the_warmup_cosine_schedule() -> None:
    module = SlideModule(
        "test_vit", "gma", "binary", encoder_kwargs={"img_size": 32}, encoder_lr=1e-3,
        layer_decay=0.75, warmup_steps=2,
    )  # fmt: skip
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    base = {g["name"]: g["initial_lr"] for g in optimizer.param_groups}
    assert base["encoder_layer0"] == 1e-3 * 0.75**6 and base["encoder_layer6"] == 1e-3
    assert base["aggregator"] == 1e-3  # SlideModule's default aggregator_lr
    for factor in (1 / 3, 2 / 3, 1.0):  # WarmupCosine's warm-up, then 1 (no known length)
        assert [g["lr"] for g in optimizer.param_groups] == [
            pytest.approx(base[g["name"]] * factor, rel=1e-12) for g in optimizer.param_groups
        ]
        optimizer.step()
        scheduler.step()


def test_layer_decay_needs_a_layered_encoder_and_a_rate_in_range() -> None:
    with pytest.raises(ValueError, match=r"`layer_decay` needs an encoder with timm's "
                       r"`group_matcher\(\)` .*got Sequential; .*layer_decay=null"):  # fmt: skip
        param_groups(nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 1), 1e-4, 1e-3, 0.0, 0.75)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match=r"got Sequential"):  # at construction, not at fit
        SlideModule(encoder, "mean", "binary", layer_decay=0.75)
    for bad in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError, match=rf"Expected `layer_decay` in \(0, 1\], got {bad}"):
            SlideModule("test_resnet", "gma", "binary", layer_decay=bad)
    with pytest.raises(ValueError, match=r"got freeze_encoder=True: .*set layer_decay=null"):
        SlideModule("test_resnet", "gma", "binary", freeze_encoder=True, layer_decay=0.75)
