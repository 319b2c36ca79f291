"""Sum gradients over ranks in buckets launched while the encoder's backward is still running.

The encoder's gradients are the expensive part of the all-reduce (a ResNet-18 is 45 MB), and
backward produces them from the last layer to the first. Parameters are grouped into buckets in
that order; a bucket's SUM all-reduce starts (asynchronously) as soon as all its gradients are
final, so communication overlaps the rest of the backward, as DDP does. Buckets start strictly in
index order and only when complete, so every rank issues the same collectives in the same order
whatever it computed: a rank without tiles, or a parameter that gets no gradient, simply leaves its
buckets to ``finish``. The rest (the aggregator, whose gradient only rank 0 has) follows in
buckets of its own, and ``finish`` waits for everything before backward returns.

A parameter without a gradient contributes zeros and a zero flag; it gets the summed gradient if
any rank had one and stays ``None`` if none had, as in one process. Adding exact zeros leaves rank
0's aggregator gradient bit-identical. After the sum, each gradient is a view into its bucket.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GradientSum"]

_BUCKET_BYTES = 25 * 2**20  # DDP's default bucket size


class GradientSum:
    """Bucketed, overlapped SUM all-reduce of ``params``' gradients.

    Args:
        params: Every trainable parameter, each rank passing the same list in the same order:
            those backward reaches first (the encoder's, last layer first) before the others.
        overlapped: How many leading ``params`` belong to the encoder, whose buckets may start
            during its backward; the remaining ones start in ``finish``.
        bucket_bytes: Upper bound of a bucket's size.
    """

    def __init__(
        self,
        params: Sequence[nn.Parameter],
        overlapped: int,
        bucket_bytes: int = _BUCKET_BYTES,
    ) -> None:
        self.params = list(params)
        self.buckets: list[list[int]] = []
        for start, stop in ((0, overlapped), (overlapped, len(self.params))):
            self._bucket(range(start, stop), bucket_bytes)
        self._bucket_of = {id(self.params[i]): b for b, idx in enumerate(self.buckets) for i in idx}
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._on_ready) for p in self.params[:overlapped]
        ]
        self._active = False
        self._missing: list[int] = []
        self._seen: set[int] = set()
        self._next = 0
        self._inflight: list[tuple[int, torch.Tensor, dist.Work]] = []

    def _bucket(self, indices: range, bucket_bytes: int) -> None:
        current: list[int] = []
        size = 0
        for i in indices:
            p = self.params[i]
            nbytes = p.numel() * p.element_size()
            key = (p.dtype, p.device)
            if current and (size + nbytes > bucket_bytes or key != self._key(current[0])):
                self.buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
        if current:
            self.buckets.append(current)

    def _key(self, i: int) -> tuple[torch.dtype, torch.device]:
        return self.params[i].dtype, self.params[i].device

    def begin(self) -> None:
        """Arm the hooks: the next backward's final gradients start their buckets."""
        self._missing = [len(b) for b in self.buckets]
        self._seen = set()
        self._next = 0
        self._inflight = []
        self._active = True

    def _on_ready(self, param: torch.Tensor) -> None:
        if not self._active or id(param) in self._seen:
            return
        self._seen.add(id(param))
        self._missing[self._bucket_of[id(param)]] -= 1
        while self._next < len(self.buckets) and self._missing[self._next] == 0:
            self._launch(self._next)

    def _launch(self, b: int) -> None:
        group = [self.params[i] for i in self.buckets[b]]
        dtype, device = group[0].dtype, group[0].device
        flags = torch.tensor([p.grad is not None for p in group], dtype=dtype, device=device)
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
            + [flags]
        )
        self._inflight.append((b, flat, dist.all_reduce(flat, async_op=True)))
        self._next = b + 1

    def finish(self) -> None:
        """Start what is left, in order, wait for all, and make the sums the gradients."""
        self._active = False
        if not self._missing:  # finish without begin: a plain synchronous sum
            self._missing = [len(b) for b in self.buckets]
            self._next, self._inflight = 0, []
        while self._next < len(self.buckets):
            self._launch(self._next)
        for b, flat, work in self._inflight:
            work.wait()
            group = [self.params[i] for i in self.buckets[b]]
            values, counts = flat[: -len(group)], flat[-len(group) :]
            sizes = [p.numel() for p in group]
            for p, chunk, count in zip(group, values.split(sizes), counts.tolist(), strict=True):
                p.grad = chunk.view_as(p) if count else None
        self._missing, self._inflight = [], []

    def remove(self) -> None:
        """Detach the hooks from the parameters."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
