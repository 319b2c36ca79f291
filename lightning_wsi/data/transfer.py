"""Turn a loaded slide batch into model input on the device: uint8 -> float, jitter, normalise.

Tiles travel from disk to the device as uint8: a quarter of the bytes of float32 through loader
workers' shared memory, pinned memory and PCIe, and no float pass on the CPU. They become float
where the model runs (``SlideDataModule.on_after_batch_transfer`` calls this).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from lightning_wsi.data.augment import color_jitter

__all__ = ["normalize_tiles"]


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
