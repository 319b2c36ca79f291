"""The collectives of slide-parallel training, in plain ``torch.distributed``.

Shards of one slide differ in size (K not divisible by the world size, a slide with fewer tiles
than K), so rows are padded to the largest shard for the collective and cut back after it. Every
function here is a collective: all ranks of the group must call it, in the same order.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = [
    "ShardInfo",
    "all_gather_rows",
    "exchange_shard_info",
    "gather_rows",
    "scatter_rows",
]


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class ShardInfo:
    """What every rank holds of the current slide: shard sizes in rank order, feature layout.

    Attributes:
        sizes: Rows (tiles) per rank, in rank order; their sum is the slide's K.
        offsets: Start of each rank's rows in the concatenation.
        width: Feature size ``D`` (from any rank that encoded tiles; 0 if none did).
        dtype: Feature dtype, as ``width``.
    """

    def __init__(
        self, sizes: Sequence[int], width: int = 0, dtype: torch.dtype = torch.float32
    ) -> None:
        self.sizes = [int(s) for s in sizes]
        self.offsets = [sum(self.sizes[:r]) for r in range(len(self.sizes))]
        self.width = width
        self.dtype = dtype

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def largest(self) -> int:
        return max(self.sizes)


def exchange_shard_info(
    features: torch.Tensor | None, n_local: int, slide_id: object, device: torch.device
) -> ShardInfo:
    """All-gather every rank's shard size, and check that all ranks hold the same slide.

    Args:
        features: This rank's ``[n_r, D]`` features, or ``None`` for a rank without tiles (a
            slide with fewer tiles than ranks), which learns ``D`` and the dtype from the others.
        n_local: ``n_r``.
        slide_id: The slide this rank holds.
        device: Where the collective's tensors live (the process group's device).

    Raises:
        RuntimeError: Ranks hold different slides; the message names them and the fix.
    """
    world = dist.get_world_size()
    code = zlib.crc32(str(slide_id).encode()) & 0x7FFFFFFF
    width = features.shape[1] if features is not None else -1
    dtype = _DTYPES.index(features.dtype) if features is not None else -1
    mine = torch.tensor([n_local, code, width, dtype], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    table = torch.stack(everyone).cpu()
    if (table[:, 1] != table[0, 1]).any():
        ids: list[object] = [None] * world
        dist.all_gather_object(ids, str(slide_id))
        raise RuntimeError(
            f"Slide-parallel ranks hold different slides in one step (by rank: {ids}). Every "
            "rank must load the same slide: use SlideDataModule, or a DataLoader whose sampler "
            "gives every rank the same order (Lightning's injected DistributedSampler does, with "
            "this strategy's `distributed_sampler_kwargs`)."
        )
    width, dtype = int(table[:, 2].max()), int(table[:, 3].max())
    return ShardInfo(
        table[:, 0].tolist(), max(width, 0), _DTYPES[dtype] if dtype >= 0 else torch.float32
    )


def _padded(rows: torch.Tensor, n: int) -> torch.Tensor:
    if rows.shape[0] == n:
        return rows.contiguous()
    out = rows.new_zeros((n, *rows.shape[1:]))
    out[: rows.shape[0]] = rows
    return out


def gather_rows(rows: torch.Tensor, info: ShardInfo, dst: int = 0) -> torch.Tensor | None:
    """Concatenate every rank's ``rows`` ``[n_r, ...]`` on rank ``dst`` in rank order.

    Returns:
        ``[sum n_r, ...]`` on ``dst``, ``None`` elsewhere.
    """
    padded = _padded(rows, info.largest)
    if dist.get_rank() != dst:
        dist.gather(padded, None, dst=dst)
        return None
    buffers = [torch.empty_like(padded) for _ in info.sizes]
    dist.gather(padded, buffers, dst=dst)
    return torch.cat([b[:n] for b, n in zip(buffers, info.sizes, strict=True)])


def all_gather_rows(rows: torch.Tensor, info: ShardInfo) -> torch.Tensor:
    """Concatenate every rank's ``rows`` ``[n_r, ...]`` on every rank, in rank order."""
    padded = _padded(rows, info.largest)
    buffers = [torch.empty_like(padded) for _ in info.sizes]
    dist.all_gather(buffers, padded)
    return torch.cat([b[:n] for b, n in zip(buffers, info.sizes, strict=True)])


def scatter_rows(
    full: torch.Tensor | None, info: ShardInfo, like: torch.Tensor, src: int = 0
) -> torch.Tensor:
    """Split ``full`` ``[sum n_r, ...]`` on rank ``src`` by shard and send rank r its rows.

    Args:
        full: The rows to split, on ``src``; ignored elsewhere.
        info: Shard sizes.
        like: A tensor with this rank's trailing shape, dtype and device.

    Returns:
        This rank's ``[n_r, ...]`` rows.
    """
    rank = dist.get_rank()
    out = like.new_empty((info.largest, *like.shape[1:]))
    if rank == src:
        assert full is not None
        pieces = [_padded(p, info.largest) for p in full.split(info.sizes)]
        dist.scatter(out, pieces, src=src)
    else:
        dist.scatter(out, None, src=src)
    return out[: info.sizes[rank]]
