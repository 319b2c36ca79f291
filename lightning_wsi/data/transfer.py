"""Turn a loaded slide batch into model input on the device: uint8 -> float, jitter, normalise.

Tiles travel from disk to the device as uint8: a quarter of the bytes of float32 through loader
workers' shared memory, pinned memory and PCIe, and no float pass on the CPU. They become float
where the model runs (``SlideDataModule.on_after_batch_transfer`` calls this). For a module that
normalises its own input (``SlideModule``), they stay uint8 on the device too, colour-jittered
there a chunk at a time, and become float only in the chunk being encoded: a slide's tiles then
cost 1 byte per value on the device instead of 4, whatever K.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_wsi.data.augment import color_jitter

__all__ = ["JITTER_CHUNK", "jitter_tiles", "normalize", "normalize_tiles"]

JITTER_CHUNK = 256  # tiles colour-jittered at a time: the float copy never holds the whole slide


def normalize_tiles(
    batch: Mapping[str, Any], mean: Sequence[float], std: Sequence[float]
) -> dict[str, Any]:
    """The batch with ``tiles`` as normalised float32 ``[k, 3, H, W]``.

    uint8 tiles are scaled to [0, 1], colour-jittered with the batch's per-tile ``color_jitter``
    factors ``[k, 4]`` if present, then normalised with ``mean`` and ``std``. Float tiles are taken
    as already normalised and pass unchanged, so a user's own loader of float tiles works too.

    Example:
        >>> import torch
        >>> batch = {"tiles": torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)}
        >>> normalize_tiles(batch, mean=(0.5,) * 3, std=(0.25,) * 3)["tiles"].unique()
        tensor([2.])
    """
    tiles = batch["tiles"]
    if tiles.dtype != torch.uint8:
        return dict(batch)
    out = tiles.float().div_(255.0)
    if batch.get("color_jitter") is not None:
        out = color_jitter(out, batch["color_jitter"])
    mean_t = torch.as_tensor(mean, dtype=out.dtype, device=out.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=out.dtype, device=out.device).view(1, 3, 1, 1)
    result = {k: v for k, v in batch.items() if k != "color_jitter"}
    result["tiles"] = out.sub_(mean_t).div_(std_t)
    return result


def normalize(tiles: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 ``[k, 3, H, W]`` tiles as normalised float32: ``(tiles / 255 - mean) / std``."""
    out = tiles.float().div_(255.0)
    mean_t = torch.as_tensor(mean, dtype=out.dtype, device=out.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=out.dtype, device=out.device).view(1, 3, 1, 1)
    return out.sub_(mean_t).div_(std_t)


def jitter_tiles(batch: Mapping[str, Any], chunk: int = JITTER_CHUNK) -> dict[str, Any]:
    """The batch with its uint8 ``tiles`` colour-jittered by its ``color_jitter`` factors
    ``[k, 4]``, still uint8 (rounded, as torchvision's ``ColorJitter`` does on uint8 images),
    ``chunk`` tiles at a time so no float copy of the whole slide is made. Without factors, or
    with float tiles, the tiles pass unchanged; ``color_jitter`` is removed either way.
    """
    result = {k: v for k, v in batch.items() if k != "color_jitter"}
    tiles, factors = batch["tiles"], batch.get("color_jitter")
    if factors is None or tiles.dtype != torch.uint8:
        return result
    out = torch.empty_like(tiles)
    for start in range(0, len(tiles), chunk):
        part = tiles[start : start + chunk].float().div_(255.0)
        jittered = color_jitter(part, factors[start : start + chunk])
        out[start : start + chunk] = jittered.mul_(255.0).round_().to(torch.uint8)
    result["tiles"] = out
    return result
