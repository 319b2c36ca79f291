"""Pretrain the foundation study's small ViT on lesion-free synthetic tissue.

``python -m lightning_wsi.pretrain [--out PATH] [--steps N] [overrides ...]`` writes the
"foundation" weights that ``experiment=foundation_study`` fine-tunes (or keeps frozen): a
``.safetensors`` file in timm's key layout, which ``encoder.checkpoint_path`` loads strictly.
Everything about the encoder and the tiles comes from the composed training config
(``experiment=foundation_study`` plus any Hydra overrides given), so the weights fit the
experiment by construction: the architecture (``encoder.name``, ``encoder.kwargs``), the tile
size and mpp, and the normalisation (``encoder.mean``/``std``, else ``encoder.norm_from``'s timm
config). The pretraining settings are the config's ``pretrain`` node; flags override them.

The pretext never needs the study's signal. Its tiles come from negative synthetic slides only
(``make_synthetic_slide(positive=False)``, drawn in memory from seeds of their own, none of them
a slide of the study's dataset), so no lesion (a dense cluster of large, dark nuclei) is ever
shown. Each tile has two supervised targets: which slide it came from (a slide's stain vectors
and strength, colour cast, collagen fibre angle and spacing, cellularity) and the share of the
tile that is fat (the slide's ground-truth pale-tissue mask). A supervised pretext is used rather
than a self-supervised one because it learns in a few CPU minutes and its success is measured on
fresh tiles (positions from a stream of their own, on the same slides, so crops may overlap the
training ones): slide accuracy against chance, fat-share error against predicting the mean.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import timm
import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image
from torch import nn

from lightning_wsi.data.synthetic import make_synthetic_slide
from lightning_wsi.models.encoders import build_encoder

__all__ = [
    "PretrainResult",
    "PretrainSettings",
    "TissueTiles",
    "compose_study",
    "ensure_pretrained",
    "main",
    "pretrain",
]

EXPERIMENT = "foundation_study"
FORMAT = "lightning-wsi/pretrain-v1"  # safetensors metadata: what wrote the file
_SEED_TAG = 0x5EED  # pretext slides' seeds: a stream of their own, apart from the datasets'
_MIN_TISSUE = 0.5  # a tile is a tissue tile from this share of tissue on, as in tiling
_SITE_STRIDE = 4  # px between candidate tile corners


@dataclass(frozen=True)
class PretrainSettings:
    """How the pretext trains (the ``pretrain`` node of the experiment config).

    Attributes:
        slides: negative synthetic slides drawn for the pretext (classes of the slide target).
        steps: optimiser steps.
        batch_size: tiles per step.
        lr: AdamW peak learning rate (linear warm-up over 5% of the steps, then cosine to 0).
        weight_decay: AdamW weight decay.
        fat_weight: weight of the fat-share loss (mean squared error) beside the slide loss.
        eval_tiles: fresh tiles (a random stream of their own) scored at the end.
        seed: slides, tile positions and initial weights.
    """

    slides: int = 24
    steps: int = 600
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    fat_weight: float = 10.0
    eval_tiles: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("slides", "steps", "batch_size", "eval_tiles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"pretrain.{name} must be a positive integer, got {value!r}")
        if self.slides < 2:
            raise ValueError(
                f"pretrain.slides must be at least 2 (a slide target), got {self.slides}"
            )
        for name in ("lr", "weight_decay", "fat_weight"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"pretrain.{name} must be a finite number >= 0, got {value!r}")

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None) -> PretrainSettings:
        """Settings from a config mapping; an unknown key is an error naming the valid ones."""
        values = dict(node or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown key(s) pretrain.{', pretrain.'.join(unknown)}; valid: {sorted(known)}"
            )
        return cls(**values)


@dataclass(frozen=True)
class PretrainResult:
    """What a pretraining run wrote and how well the pretext was learnt on fresh tiles."""

    path: Path
    slide_accuracy: float  # chance: 1 / slides
    fat_mae: float  # mean absolute error of the fat share
    fat_mae_baseline: float  # predicting the training tiles' mean fat share
    seconds: float


class TissueTiles:
    """Random tissue tiles of lesion-free synthetic slides, with their pretext targets.

    Slides are drawn at ``mpp`` in memory; a tile is ``tile`` px square at any corner on a
    ``_SITE_STRIDE`` px grid where at least half of it is tissue (the slide's ground truth).
    """

    def __init__(self, n_slides: int, tile: int, mpp: float, seed: int) -> None:
        self.tile = tile
        self.images: list[np.ndarray] = []  # [H, W, 3] uint8 per slide
        self.sites: list[np.ndarray] = []  # [n, 2] (y, x) tile corners per slide
        self.fat: list[np.ndarray] = []  # [n] fat share of each site's tile
        for i in range(n_slides):
            slide_seed = int(np.random.SeedSequence([seed, i, _SEED_TAG]).generate_state(1)[0])
            slide = make_synthetic_slide(slide_seed, positive=False, mpp=mpp)
            sites, fat = _tile_sites(slide.tissue_mask, slide.pale_mask, slide.image.shape, tile)
            if not len(sites):
                raise ValueError(
                    f"pretext slide {i} (seed {slide_seed}) has no {tile}-px tile with "
                    f"{_MIN_TISSUE:.0%} tissue at {mpp} µm/px; use a smaller tile_size or mpp"
                )
            self.images.append(slide.image)
            self.sites.append(sites)
            self.fat.append(fat)

    def sample(
        self, n: int, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``n`` random tiles: uint8 ``[n, 3, tile, tile]``, slide index ``[n]`` int64, fat
        share ``[n]`` float32."""
        slides = rng.integers(0, len(self.images), n)
        tiles = np.empty((n, self.tile, self.tile, 3), np.uint8)
        fat = np.empty(n, np.float32)
        for j, s in enumerate(slides):
            i = rng.integers(0, len(self.sites[s]))
            y, x = self.sites[s][i]
            tiles[j] = self.images[s][y : y + self.tile, x : x + self.tile]
            fat[j] = self.fat[s][i]
        pixels = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()
        return pixels, torch.from_numpy(slides.astype(np.int64)), torch.from_numpy(fat)

    def mean_fat(self) -> float:
        """The mean fat share over every candidate tile (the baseline prediction)."""
        return float(np.mean([f.mean() for f in self.fat]))


def _tile_sites(
    tissue: np.ndarray, pale: np.ndarray, shape: tuple[int, ...], tile: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tile corners ``[n, 2]`` (y, x) with at least ``_MIN_TISSUE`` tissue, and their fat share.

    The ground-truth masks (any resolution) are resized to the image's pixel grid ``shape``.
    """
    h, w = shape[:2]
    if h < tile or w < tile:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    t_frac = _window_mean(_on_grid(tissue, h, w), tile)
    f_frac = _window_mean(_on_grid(pale, h, w), tile)
    ys, xs = np.nonzero(t_frac[::_SITE_STRIDE, ::_SITE_STRIDE] >= _MIN_TISSUE)
    ys, xs = ys * _SITE_STRIDE, xs * _SITE_STRIDE
    return np.stack([ys, xs], 1).astype(np.int64), f_frac[ys, xs].astype(np.float32)


def _on_grid(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """A boolean mask as a float32 ``[h, w]`` share per image pixel (bilinear)."""
    image = Image.fromarray(mask.astype(np.float32))
    return np.asarray(image.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)


def _window_mean(field: np.ndarray, tile: int) -> np.ndarray:
    """Mean of ``field`` over every ``tile`` x ``tile`` window, indexed by its top-left corner:
    ``[h - tile + 1, w - tile + 1]`` (a summed-area table)."""
    table = np.pad(field.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    total = (
        table[tile:, tile:] - table[:-tile, tile:] - table[tile:, :-tile] + table[:-tile, :-tile]
    )
    return total / tile**2


def compose_study(overrides: Sequence[str] = ()) -> DictConfig:
    """The training config of ``experiment=foundation_study`` with ``overrides`` applied."""
    from hydra import compose, initialize_config_module

    given = [o for o in overrides if not o.startswith("experiment=")]
    experiment = next((o for o in overrides if o.startswith("experiment=")), None)
    with initialize_config_module("lightning_wsi.conf", version_base="1.3"):
        return compose("train", overrides=[experiment or f"experiment={EXPERIMENT}", *given])


def normalisation(encoder_cfg: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The tiles' mean and std as the data module takes them: explicit ``mean``/``std``, else
    ``norm_from``'s timm pretrained config, else ImageNet's."""
    mean, std = timm.data.IMAGENET_DEFAULT_MEAN, timm.data.IMAGENET_DEFAULT_STD
    norm_from = encoder_cfg.get("norm_from")
    if norm_from:
        found = timm.get_pretrained_cfg(norm_from)
        if found is None:
            raise ValueError(
                f"encoder.norm_from={norm_from!r}: timm knows no pretrained config of that name; "
                "set encoder.mean and encoder.std"
            )
        mean, std = found.mean, found.std
    mean = encoder_cfg.get("mean") or mean
    std = encoder_cfg.get("std") or std
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


class _Pretext(nn.Module):
    """The encoder with two heads: slide logits ``[n, slides]`` and fat share ``[n]``."""

    def __init__(self, encoder: nn.Module, dim: int, slides: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.slide_head = nn.Linear(dim, slides)
        self.fat_head = nn.Linear(dim, 1)

    def forward(self, tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(tiles)
        return self.slide_head(features), self.fat_head(features).squeeze(1)


def _encoder(cfg: DictConfig) -> nn.Module:
    """A plain timm encoder as the experiment builds it, before any weights are loaded."""
    kwargs = OmegaConf.to_container(cfg.encoder.kwargs, resolve=True) if cfg.encoder.kwargs else {}
    return build_encoder(cfg.encoder.name, encoder_kwargs=kwargs, freeze_batchnorm=False)


def _schedule(step: int, total: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine to 0: a factor of the peak lr."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(
    cfg: DictConfig, out: str | Path, settings: PretrainSettings, log_every: int = 50
) -> PretrainResult:
    """Train the experiment's encoder on the pretext and write its weights to ``out``.

    Args:
        cfg: the composed training config (``encoder``, ``tile_size``, ``mpp`` are read).
        out: a ``.safetensors`` path, written atomically (its folder is created).
        settings: the pretext's settings.
        log_every: print the running loss every this many steps (0: never).

    Returns:
        The path and the pretext scores on fresh tiles.
    """
    out = _safetensors_path(out)
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    data = TissueTiles(settings.slides, int(cfg.tile_size), float(cfg.mpp), settings.seed)
    fresh = data.sample(settings.eval_tiles, np.random.default_rng([settings.seed, 1]))
    mean, std = normalisation(cfg.encoder)
    encoder = _encoder(cfg)
    model = _Pretext(encoder, encoder.num_features, settings.slides)
    optimizer = torch.optim.AdamW(
        model.parameters(), settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _schedule(step, settings.steps)
    )
    print(
        f"pretraining {cfg.encoder.name} ({sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} "
        f"M parameters) on {settings.slides} lesion-free slides, {cfg.tile_size} px tiles at "
        f"{cfg.mpp} µm/px: {settings.steps} steps of {settings.batch_size} tiles",
        flush=True,
    )
    model.train()
    for step in range(settings.steps):
        tiles, slides, fat = data.sample(settings.batch_size, rng)
        logits, fat_hat = model(_normalise(tiles, mean, std))
        loss = nn.functional.cross_entropy(logits, slides)
        loss = loss + settings.fat_weight * nn.functional.mse_loss(fat_hat, fat)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if log_every and ((step + 1) % log_every == 0 or step + 1 == settings.steps):
            took = time.perf_counter() - started
            print(f"step {step + 1}/{settings.steps}  loss {loss.item():.3f}  ({took:.0f} s)")
    accuracy, fat_mae = _evaluate(model, fresh, mean, std)
    baseline = float((fresh[2] - data.mean_fat()).abs().mean())
    metadata = {
        "format": FORMAT,
        "encoder": str(cfg.encoder.name),
        "encoder_kwargs": str(OmegaConf.to_container(cfg.encoder.kwargs, resolve=True)),
        "tile_size": str(cfg.tile_size),
        "mpp": str(cfg.mpp),
        "pretext": "slide identity + fat share of lesion-free synthetic tiles",
        "settings": str(asdict(settings)),
        "fresh_tiles_slide_accuracy": f"{accuracy:.4f}",
        "fresh_tiles_fat_mae": f"{fat_mae:.4f}",
    }
    _save(encoder, out, metadata)
    return PretrainResult(out, accuracy, fat_mae, baseline, time.perf_counter() - started)


def _normalise(tiles: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[n, 3, H, W]`` to float ``(x / 255 - mean) / std``, as the data module does."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return (tiles.float() / 255.0 - m) / s


@torch.no_grad()
def _evaluate(
    model: _Pretext, fresh: tuple[torch.Tensor, ...], mean: Sequence[float], std: Sequence[float]
) -> tuple[float, float]:
    """Slide accuracy and fat-share mean absolute error on the fresh tiles."""
    model.eval()
    tiles, slides, fat = fresh
    hits, errors = 0, 0.0
    for start in range(0, len(tiles), 256):
        logits, fat_hat = model(_normalise(tiles[start : start + 256], mean, std))
        hits += int((logits.argmax(1) == slides[start : start + 256]).sum())
        errors += float((fat_hat.clamp(0, 1) - fat[start : start + 256]).abs().sum())
    return hits / len(tiles), errors / len(tiles)


def _safetensors_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(
            f"--out {path}: the weights are written as safetensors; give a path ending in "
            "'.safetensors'"
        )
    return path


def _save(encoder: nn.Module, out: Path, metadata: dict[str, str]) -> None:
    """The encoder's state dict (timm's keys) to ``out`` via a temporary file and a rename, so
    a reader never sees half a file."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in encoder.state_dict().items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_pretrained(cfg: DictConfig) -> Path | None:
    """Pretrain ``encoder.checkpoint_path`` with ``cfg.pretrain`` if the file is missing.

    For the training command: a config without a ``pretrain`` node, or without a
    ``checkpoint_path``, is left alone (``None``); an existing file is used as it is (delete it,
    or point ``encoder.checkpoint_path`` elsewhere, after changing ``pretrain.*``).

    Returns:
        The weights file, or ``None`` when the config asks for no pretraining.
    """
    node = cfg.get("pretrain")
    path = cfg.encoder.get("checkpoint_path") if node is not None else None
    if not path:
        return None
    path = Path(path)
    if path.is_file():
        return path
    print(f"{path} is missing: pretraining it first (python -m lightning_wsi.pretrain)")
    result = pretrain(cfg, path, PretrainSettings.from_config(node))
    _print_result(result, PretrainSettings.from_config(node))
    return path


def _print_result(result: PretrainResult, settings: PretrainSettings) -> None:
    print(
        f"pretext on {settings.eval_tiles} fresh tiles: slide accuracy "
        f"{result.slide_accuracy:.3f} (chance {1 / settings.slides:.3f}), fat share MAE "
        f"{result.fat_mae:.3f} (predicting the mean: "
        f"{result.fat_mae_baseline:.3f})\nweights: {result.path} ({result.seconds:.0f} s)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_wsi.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides of the training config, e.g. tile_size=96"
    )
    parser.add_argument(
        "--out", type=Path, help="default: the experiment's encoder.checkpoint_path"
    )
    for f in fields(PretrainSettings):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(
            flag, type=type(f.default), help=f"default: the config's pretrain.{f.name}"
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command; returns the exit code (2 with one line for bad input)."""
    args = _parser().parse_args(argv)
    try:
        cfg = compose_study(args.overrides)
        settings = PretrainSettings.from_config(cfg.get("pretrain"))
        given = {f.name: getattr(args, f.name) for f in fields(PretrainSettings)}
        settings = replace(settings, **{k: v for k, v in given.items() if v is not None})
        out = args.out or cfg.encoder.get("checkpoint_path")
        if not out:
            raise ValueError("no output path: give --out PATH.safetensors")
        result = pretrain(cfg, out, settings)
    except (ValueError, OSError, HydraException, OmegaConfBaseException) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    _print_result(result, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
