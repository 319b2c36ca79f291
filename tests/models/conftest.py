"""Fixtures for model tests: in-memory slides and a quiet CPU Trainer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from slide_batches import make_slides, make_trainer


@pytest.fixture
def slides() -> Callable[..., list[dict[str, Any]]]:
    return make_slides


@pytest.fixture
def trainer() -> Callable[..., L.Trainer]:
    return make_trainer


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
