"""The collectives of slide-parallel training, in plain ``torch.distributed``.

Shards of one slide differ in size (K not divisible by the world size, a slide with fewer tiles
than K), so rows are padded to the largest shard for the collective and cut back after it. Every
function here is a collective: all ranks of the group must call it, in the same order.

``group`` is the process group of the ranks sharing the slide (``None``: the world); ranks, sources
and destinations are counted within it, so its rank 0 aggregates.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning_utilities.core.apply_func import apply_to_collection

__all__ = [
    "ShardInfo",
    "all_gather_rows",
    "broadcast_output",
    "exchange_shard_info",
    "gather_rows",
    "interleave",
    "interleave_group_outputs",
    "scatter_rows",
]


_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class ShardInfo:
    """What every rank holds of the current step: shard sizes in rank order, feature layout, flags.

    Attributes:
        sizes: Rows (tiles) per rank, in rank order; their sum is the slide's K.
        offsets: Start of each rank's rows in the concatenation.
        width: Feature size ``D`` (from any rank that encoded tiles; 0 if none did).
        dtype: Feature dtype, as ``width``.
        failed: Ranks that failed before the exchange (their step raised or their loader did).
        needs_grad: Whether any rank's features carry a graph back into an encoder; ``False``
            for a frozen encoder, which then needs no ``dL/df``.
        bad_tiles: Tiles the loaders left out of the sample, all ranks together.
        max_bad_tiles: How many the sample tolerates (the loaders' ``max_bad_tiles``).
        problem_ranks: Ranks whose loader reported the slide itself unusable.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        width: int = 0,
        dtype: torch.dtype = torch.float32,
        failed: Sequence[int] = (),
        needs_grad: bool = True,
        bad_tiles: int = 0,
        max_bad_tiles: int = 0,
        problem_ranks: Sequence[int] = (),
    ) -> None:
        self.sizes = [int(s) for s in sizes]
        self.bad_tiles = bad_tiles
        self.max_bad_tiles = max_bad_tiles
        self.problem_ranks = list(problem_ranks)
        self.offsets = [sum(self.sizes[:r]) for r in range(len(self.sizes))]
        self.width = width
        self.dtype = dtype
        self.failed = list(failed)
        self.needs_grad = needs_grad

    @property
    def has_problems(self) -> bool:
        """Whether any rank left tiles out or could not use the slide."""
        return self.bad_tiles > 0 or bool(self.problem_ranks)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def largest(self) -> int:
        return max(self.sizes)


def exchange_shard_info(
    features: torch.Tensor | None,
    n_local: int,
    slide_id: object,
    *,
    failed: bool = False,
    needs_grad: bool | None = None,
    bad_tiles: int = 0,
    max_bad_tiles: int = 0,
    slide_problem: bool = False,
    group: dist.ProcessGroup | None = None,
) -> ShardInfo:
    """All-gather every rank's shard size and flags on the host, and check the slide is the same.

    One small all-gather of CPU integers on ``group``, which must be a group that reduces host
    tensors (gloo): nothing is read back from a device, so a CUDA step is not stalled.

    Args:
        features: This rank's ``[n_r, D]`` features, or ``None`` for a rank without tiles (a
            slide with fewer tiles than ranks, or a failed rank), which learns ``D`` and the
            dtype from the others.
        n_local: ``n_r``.
        slide_id: The slide this rank holds.
        failed: This rank failed before the exchange; every rank learns it (``ShardInfo.failed``).
        needs_grad: Whether this rank's encoder wants ``dL/df``; default: whether ``features``
            carry a graph.
        bad_tiles: Tiles this rank's loader left out of its shard.
        max_bad_tiles: How many left-out tiles the whole sample tolerates.
        slide_problem: This rank's loader reported the slide itself unusable.
        group: The host process group.

    Raises:
        RuntimeError: Ranks hold different slides; the message names them and the fix.
    """
    world = dist.get_world_size(group)
    code = zlib.crc32(str(slide_id).encode()) & 0x7FFFFFFF
    width = features.shape[1] if features is not None else -1
    dtype = _DTYPES.index(features.dtype) if features is not None else -1
    if needs_grad is None:
        needs_grad = features is not None and features.requires_grad
    mine = torch.tensor(
        [n_local, code, width, dtype, int(failed), int(needs_grad), bad_tiles, max_bad_tiles,
         int(slide_problem)]
    )  # fmt: skip
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    table = torch.stack(everyone)
    failed_ranks = [r for r in range(world) if table[r, 4]]
    if not failed_ranks and (table[:, 1] != table[0, 1]).any():
        ids: list[object] = [None] * world
        dist.all_gather_object(ids, str(slide_id), group=group)
        raise RuntimeError(
            f"Slide-parallel ranks hold different slides in one step (by rank: {ids}). Every "
            "rank must load the same slide: use SlideDataModule, or a DataLoader whose sampler "
            "gives every rank the same order (Lightning's injected DistributedSampler does, with "
            "this strategy's `distributed_sampler_kwargs`)."
        )
    width, dtype = int(table[:, 2].max()), int(table[:, 3].max())
    return ShardInfo(
        table[:, 0].tolist(),
        max(width, 0),
        _DTYPES[dtype] if dtype >= 0 else torch.float32,
        failed=failed_ranks,
        needs_grad=bool(table[:, 5].any()),
        bad_tiles=int(table[:, 6].sum()),
        max_bad_tiles=int(table[:, 7].max()),
        problem_ranks=[r for r in range(world) if table[r, 8]],
    )


def _padded(rows: torch.Tensor, n: int) -> torch.Tensor:
    if rows.shape[0] == n:
        return rows.contiguous()
    out = rows.new_zeros((n, *rows.shape[1:]))
    out[: rows.shape[0]] = rows
    return out


def _global_rank(group_rank: int, group: dist.ProcessGroup | None) -> int:
    """The world rank of ``group``'s rank ``group_rank`` (what torch's ``src``/``dst`` take)."""
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def gather_rows(
    rows: torch.Tensor, info: ShardInfo, dst: int = 0, group: dist.ProcessGroup | None = None
) -> torch.Tensor | None:
    """Concatenate every rank's ``rows`` ``[n_r, ...]`` on rank ``dst`` (of ``group``) in rank
    order.

    Returns:
        ``[sum n_r, ...]`` on ``dst``, ``None`` elsewhere.
    """
    padded = _padded(rows, info.largest)
    target = _global_rank(dst, group)
    if dist.get_rank(group) != dst:
        dist.gather(padded, None, dst=target, group=group)
        return None
    buffers = [torch.empty_like(padded) for _ in info.sizes]
    dist.gather(padded, buffers, dst=target, group=group)
    return torch.cat([b[:n] for b, n in zip(buffers, info.sizes, strict=True)])


def all_gather_rows(
    rows: torch.Tensor, info: ShardInfo, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Concatenate every rank's ``rows`` ``[n_r, ...]`` on every rank of ``group``, in rank
    order."""
    padded = _padded(rows, info.largest)
    buffers = [torch.empty_like(padded) for _ in info.sizes]
    dist.all_gather(buffers, padded, group=group)
    return torch.cat([b[:n] for b, n in zip(buffers, info.sizes, strict=True)])


def scatter_rows(
    full: torch.Tensor | None,
    info: ShardInfo,
    like: torch.Tensor,
    src: int = 0,
    group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Split ``full`` ``[sum n_r, ...]`` on rank ``src`` (of ``group``) by shard and send rank r
    its rows.

    Args:
        full: The rows to split, on ``src``; ignored elsewhere.
        info: Shard sizes.
        like: A tensor with this rank's trailing shape, dtype and device.
        src: The sending rank, counted in ``group``.
        group: The ranks sharing the slide (``None``: the world).

    Returns:
        This rank's ``[n_r, ...]`` rows.
    """
    rank = dist.get_rank(group)
    out = like.new_empty((info.largest, *like.shape[1:]))
    source = _global_rank(src, group)
    if rank == src:
        assert full is not None
        pieces = [_padded(p, info.largest) for p in full.split(info.sizes)]
        dist.scatter(out, pieces, src=source, group=group)
    else:
        dist.scatter(out, None, src=source, group=group)
    return out[: info.sizes[rank]]


class _Slot:
    """Where a tensor sat in a broadcast output: its index in the list of values."""

    def __init__(self, index: int) -> None:
        self.index = index


def broadcast_output(
    output: Any,
    device: torch.device,
    *,
    error: str | None = None,
    host_group: dist.ProcessGroup | None = None,
    group: dist.ProcessGroup | None = None,
) -> tuple[Any, str | None]:
    """Rank 0's output (any nesting of tensors, dataclasses, mappings, sequences) on every rank
    of ``group``.

    The structure, with shapes and dtypes in place of tensors, goes over ``host_group`` as a small
    pickled object together with rank 0's error, if any; the values follow as one device
    broadcast per dtype (usually one). Device tensors are never pickled or read on the host.

    Args:
        output: Rank 0's output; ignored elsewhere.
        device: Where the values arrive on every rank.
        error: Rank 0's error message, if its step failed (``output`` is then ignored).
        host_group: The host process group for the structure (the same ranks as ``group``).
        group: The ranks sharing the slide, for the values (``None``: the world).

    Returns:
        The output on this rank's device (``None`` if rank 0 failed) and rank 0's error.
    """
    tensors: list[torch.Tensor] = []

    def slot(t: torch.Tensor) -> _Slot:
        tensors.append(t)
        return _Slot(len(tensors) - 1)

    rank = dist.get_rank(group)
    source = _global_rank(0, group)
    meta: list[Any] = [None]
    if rank == 0:
        skeleton = apply_to_collection(output, torch.Tensor, slot) if error is None else None
        meta = [(error, skeleton, [(tuple(t.shape), t.dtype) for t in tensors])]
    dist.broadcast_object_list(meta, src=source, group=host_group)
    error, skeleton, specs = meta[0]
    if error is not None:
        return None, error
    values: list[torch.Tensor | None] = [None] * len(specs)
    for dtype in dict.fromkeys(d for _, d in specs):
        members = [i for i, (_, d) in enumerate(specs) if d == dtype]
        sizes = [math.prod(specs[i][0]) for i in members]
        if rank == 0:
            flat = torch.cat([tensors[i].detach().reshape(-1).to(device) for i in members])
        else:
            flat = torch.empty(sum(sizes), dtype=dtype, device=device)
        dist.broadcast(flat, src=source, group=group)
        for i, piece in zip(members, flat.split(sizes), strict=True):
            values[i] = piece.view(specs[i][0])
    return apply_to_collection(skeleton, _Slot, lambda s: values[s.index]), None


def interleave_group_outputs(
    outputs: list[Any], count: int, leads: bool, host_group: dist.ProcessGroup | None
) -> list[Any]:
    """Every slide group's per-slide outputs on every rank, in the order of the slides.

    Group ``g`` of ``count`` evaluated the slides ``g, g + count, ...``, so its ``i``-th output
    is slide ``i * count + g``. One all-gather of pickled objects over the world's
    ``host_group``; only each group's rank 0 (``leads``) sends its list, the others nothing.

    Args:
        outputs: This rank's outputs (host objects, e.g. CPU predictions), in its order.
        count: Number of groups.
        leads: This rank is its group's rank 0.
        host_group: A world-wide group that carries host objects (gloo).
    """
    everyone: list[Any] = [None] * dist.get_world_size(host_group)
    dist.all_gather_object(everyone, outputs if leads else None, group=host_group)
    lists = [part for part in everyone if part is not None]
    if len(lists) != count:
        raise RuntimeError(f"Expected outputs from {count} slide groups, got {len(lists)}.")
    return interleave(lists)


def interleave(lists: Sequence[Sequence[Any]]) -> list[Any]:
    """``lists[0][0], lists[1][0], ..., lists[0][1], lists[1][1], ...``: the items of groups that
    took every ``len(lists)``-th item of one order, back in that order (the first groups may
    hold one item more than the last)."""
    longest = max((len(part) for part in lists), default=0)
    return [part[i] for i in range(longest) for part in lists if i < len(part)]
