"""Combine gradients over ranks: the encoder's summed in buckets launched during its backward,
the aggregator's sent from rank 0.

The encoder's gradients are the expensive part (a ResNet-18 is 45 MB), and backward produces them
from the last layer to the first. They are grouped into buckets in that order; a bucket's SUM
all-reduce starts (asynchronously) as soon as all its gradients are final, so communication overlaps
the rest of the backward, as DDP does. Buckets start strictly in index order and only when
complete, so every rank issues the same collectives in the same order whatever it computed: a rank
without tiles, or a parameter that gets no gradient, simply leaves its buckets to ``finish``. The
other parameters (the aggregator and head) have a gradient on rank 0 only, so their buckets are
broadcast from rank 0: half the traffic of an all-reduce and bit-identical to rank 0's values.

With groups of ranks training different slides in one step (``num_slides`` > 1, see
``SlideParallelStrategy(slide_group_size=...)``), every bucket is SUM all-reduced over the world
and divided by the number of slides: the encoder's gradient summed over a group is its slide's,
the aggregator's exists on each group's rank 0 only (zeros elsewhere), so the result is the MEAN
over the step's slides, as one process accumulating over them computes it.

Nothing here reads a device tensor on the host. Bucket layout and buffers are built once (per set
of trainable parameters) and reused every step; each gradient becomes a view into its bucket with
the parameter's own strides (a channels-last kernel keeps a channels-last gradient, which fused
optimisers walk as raw memory). Which parameters got a gradient on which rank is host knowledge; the
caller exchanges it on the host (``local_presence`` in, the combined bits to ``finish``), so a
parameter without a gradient anywhere stays ``None`` as in one process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GradientSync"]

_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


class _Bucket:
    """Parameters sharing one flat buffer, each with a view of the parameter's shape and strides."""

    def __init__(self, params: list[nn.Parameter], indices: list[int]) -> None:
        self.indices = indices
        self.params = params
        dtype, device = params[0].dtype, params[0].device
        self.flat = torch.zeros(sum(p.numel() for p in params), dtype=dtype, device=device)
        self.slots = []
        offset = 0
        for p in params:
            piece = self.flat.narrow(0, offset, p.numel())
            self.slots.append(
                piece.as_strided(p.shape, p.stride()) if _dense(p) else piece.view(p.shape)
            )
            offset += p.numel()

    def fill(self) -> None:
        """Copy this rank's gradients into the buffer; zeros where a parameter has none."""
        for p, slot in zip(self.params, self.slots, strict=True):
            if p.grad is None:
                slot.zero_()
            elif p.grad.data_ptr() != slot.data_ptr() or p.grad.stride() != slot.stride():
                slot.copy_(p.grad)


class GradientSync:
    """Bucketed gradient combination over ranks: SUM for the encoder, broadcast for the rest;
    with ``num_slides`` > 1, SUM of everything divided by ``num_slides``.

    Args:
        params: Every trainable parameter, each rank passing the same list in the same order:
            those backward reaches first (the encoder's, last layer first) before the others.
        overlapped: How many leading ``params`` belong to the encoder, whose buckets are summed
            and may start during its backward; the remaining ones are rank 0's alone and are
            broadcast from it in ``finish``.
        bucket_bytes: Upper bound of a bucket's size.
        group: The process group of the collectives (default: the world).
        num_slides: Slides (groups of ranks) that contribute to one step; above 1, the remaining
            parameters' buckets are summed too and every gradient is divided by it.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        overlapped: int,
        bucket_bytes: int = _BUCKET_BYTES,
        group: dist.ProcessGroup | None = None,
        num_slides: int = 1,
    ) -> None:
        if num_slides < 1:
            raise ValueError(f"Expected a positive `num_slides`, got {num_slides}.")
        self.params = list(params)
        self.overlapped = overlapped
        self.group = group
        self.num_slides = num_slides
        self.buckets: list[_Bucket] = []
        for start, stop in ((0, overlapped), (overlapped, len(self.params))):
            self._bucket(range(start, stop), bucket_bytes)
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket.params}
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_ready) for p in self.params[:overlapped]
        ]
        self._active = False
        self._missing: list[int] = []
        self._seen: set[int] = set()
        self._next = 0
        self._inflight: list[dist.Work | None] = []

    def _bucket(self, indices: range, bucket_bytes: int) -> None:
        current: list[int] = []
        size = 0
        for i in indices:
            p = self.params[i]
            nbytes = p.numel() * p.element_size()
            key = (p.dtype, p.device)
            first = self.params[current[0]] if current else None
            if first is not None and (
                size + nbytes > bucket_bytes or key != (first.dtype, first.device)
            ):
                self.buckets.append(_Bucket([self.params[j] for j in current], current))
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            self.buckets.append(_Bucket([self.params[j] for j in current], current))

    def begin(self) -> None:
        """Arm the hooks: the next backward's final gradients start their buckets."""
        self._missing = [len(b.params) for b in self.buckets]
        self._seen = set()
        self._next = 0
        self._inflight = []
        self._active = True

    def _on_ready(self, param: torch.Tensor) -> None:
        if not self._active or id(param) in self._seen:
            return
        self._seen.add(id(param))
        self._missing[self._bucket_of[id(param)]] -= 1
        while (
            self._next < len(self.buckets)
            and self.buckets[self._next].indices[0] < self.overlapped
            and self._missing[self._next] == 0
        ):
            self._launch(self._next)

    def _launch(self, b: int) -> None:
        bucket = self.buckets[b]
        bucket.fill()
        if bucket.indices[0] < self.overlapped or self.num_slides > 1:
            work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)
        else:
            work = dist.broadcast(bucket.flat, src=_global_rank(0, self.group), group=self.group,
                                  async_op=True)  # fmt: skip
        self._inflight.append(work)
        self._next = b + 1

    def foreign_gradient_error(self, rank: int) -> RuntimeError | None:
        """On a rank other than 0, an error if a parameter outside the encoder got a gradient
        here: its buckets are broadcast from rank 0, so this rank's part would be lost."""
        names = [i for i, p in enumerate(self.params[self.overlapped :]) if p.grad is not None]
        if not names:
            return None
        return RuntimeError(
            f"{len(names)} parameter(s) outside the module's `encoder` got a gradient on rank "
            f"{rank}, where only `encode` runs; their gradients come from rank 0 alone. Put every "
            "module that `encode` uses under the `encoder` attribute."
        )

    def local_presence(self) -> list[bool]:
        """Which parameters have a gradient on this rank (host knowledge, no device read)."""
        return [p.grad is not None for p in self.params]

    def launch_rest(self) -> None:
        """Start the buckets backward has not started, in order (all of them without ``begin``).

        After this call every rank has issued the same collectives; host exchanges may follow.
        """
        self._active = False
        if not self._missing:  # no begin: a plain synchronous combination
            self._next, self._inflight = 0, []
            self._missing = [len(b.params) for b in self.buckets]
        while self._next < len(self.buckets):
            self._launch(self._next)

    def finish(self, presence: Sequence[bool] | None = None) -> None:
        """Start what is left, wait for all, and make the results the gradients.

        Args:
            presence: Per parameter, whether any rank had a gradient for it (the encoder's) or
                rank 0 had one (the rest; with ``num_slides`` > 1, any group's rank 0); ``None``
                takes this rank's own. A parameter without one keeps ``grad = None``.
        """
        self.launch_rest()
        for work in self._inflight:
            if work is not None:
                work.wait()
        if self.num_slides > 1:  # the mean over the step's slides
            for bucket in self.buckets:
                bucket.flat.div_(self.num_slides)
        present = list(presence) if presence is not None else self.local_presence()
        for bucket in self.buckets:
            for i, p, slot in zip(bucket.indices, bucket.params, bucket.slots, strict=True):
                p.grad = slot if present[i] else None
        self._missing, self._inflight = [], []

    def remove(self) -> None:
        """Detach the hooks from the parameters."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def layout_key(params: Sequence[nn.Parameter]) -> tuple:
    """What the bucket layout depends on: the parameters, their memory layout, dtype and device."""
    return tuple((id(p), p.stride(), p.dtype, p.device) for p in params)


def _dense(p: torch.Tensor) -> bool:
    """Whether ``p`` covers exactly ``numel`` elements of memory (strides of a permuted layout)."""
    if p.numel() == 0 or any(s < 0 for s in p.stride()):
        return False
    span = 1 + sum((n - 1) * s for n, s in zip(p.shape, p.stride(), strict=True))
    return span == p.numel()


def _global_rank(group_rank: int, group: dist.ProcessGroup | None) -> int:
    if group is None:
        return group_rank
    return dist.get_global_rank(group, group_rank)
