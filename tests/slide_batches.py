"""Slides as the data module yields them, built from random tensors, and a quiet CPU Trainer."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


def _grid_coords(k: int, step: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct level-0 coordinates on a grid of ``step`` pixels, in random order."""
    cells = torch.randperm(64 * 64, generator=generator)[:k]
    return torch.stack([cells % 64, cells // 64], dim=1).long() * step


def make_slides(
    n: int,
    k: int = 8,
    tile_size: int = 32,
    seed: int = 0,
    task: str = "binary",
    num_classes: int = 3,
) -> list[dict[str, Any]]:
    """``n`` slide mappings with a learnable signal.

    Tiles are noise. For classification, a slide of class ``c > 0`` has a quarter of its tiles (at
    least one) with colour channel ``(c - 1) % 3`` raised, the "lesion"; class 0 has none. For
    regression, slide ``i`` has ``i % 3`` quarters of its tiles raised in the red channel and its
    target is the raised share.
    """
    g = torch.Generator().manual_seed(seed)
    quarter = max(1, k // 4)
    slides = []
    for i in range(n):
        tiles = torch.randn(k, 3, tile_size, tile_size, generator=g) * 0.5
        if task == "regression":
            n_lesion, channel = (i % 3) * quarter, 0
            target = torch.tensor(n_lesion / k, dtype=torch.float32)
        else:
            label = i % (2 if task == "binary" else num_classes)
            n_lesion, channel = (quarter if label else 0), (label - 1) % 3
            target = torch.tensor(label, dtype=torch.long)
        lesion = torch.randperm(k, generator=g)[:n_lesion]
        tiles[lesion, channel] += 2.0
        slides.append(
            {
                "tiles": tiles,
                "coords": _grid_coords(k, 448, g),
                "target": target,
                "slide_id": f"slide_{seed}_{i}",
            }
        )
    return slides


def make_trainer(**kwargs: Any) -> L.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or summary."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return L.Trainer(**{**defaults, **kwargs})
