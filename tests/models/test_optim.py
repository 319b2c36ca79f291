"""Optimiser parameter groups and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
from torch import nn

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
