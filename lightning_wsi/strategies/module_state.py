"""State outside the gradients that slide-parallel ranks must agree on: BatchNorm statistics and
metrics.

BatchNorm with batch statistics (``SlideModule(freeze_batchnorm=False)``) updates its running
mean and variance from the tiles each rank encodes, so the ranks' buffers would drift apart and a
checkpoint would keep rank 0's. ``BatchNormStats.sync`` averages them after every step, weighted by
each rank's shard size: for the running mean this is exactly the update one process holding all K
tiles would make (the global batch mean is the size-weighted mean of the shard means); for the
variance it leaves out the spread between shard means. ``SyncBatchNorm`` is refused instead: one
collective per ``encode`` call deadlocks when ranks encode a different number of times.

Metrics: every rank evaluates the same slide and computes the same metric values, so gathering
the metric states over ranks (torchmetrics' default) would count each slide once per rank.
``keep_metrics_local`` switches that gathering off.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import Metric

__all__ = ["BatchNormStats", "keep_metrics_local"]


class BatchNormStats:
    """The running statistics of a module's BatchNorm layers that track them (not frozen ones).

    Args:
        module: The module whose ``_BatchNorm`` layers (with running statistics) are kept equal.
    """

    def __init__(self, module: nn.Module) -> None:
        self.layers = [
            m
            for m in module.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ]

    def __bool__(self) -> bool:
        return bool(self.layers)

    def sync(self, n_local: int, total: int, group: dist.ProcessGroup | None = None) -> None:
        """Make every rank's running statistics the shard-size-weighted mean over ranks.

        One SUM all-reduce (float64, so the weights do not round the statistics). The batch
        counters are rank 0's, which always holds the largest shard.
        """
        stats = [t for m in self.layers for t in (m.running_mean, m.running_var)]
        counters = [m.num_batches_tracked for m in self.layers]
        weight = n_local / max(total, 1)
        is_zero = float(dist.get_rank(group) == 0)
        flat = torch.cat(
            [t.detach().double().reshape(-1) * weight for t in stats]
            + [c.detach().double().reshape(-1) * is_zero for c in counters]
        )
        dist.all_reduce(flat, group=group)
        pieces = flat.split([t.numel() for t in stats] + [c.numel() for c in counters])
        for t, piece in zip(stats + counters, pieces, strict=True):
            t.copy_(piece.view_as(t).round() if not t.is_floating_point() else piece.view_as(t))


def keep_metrics_local(module: nn.Module) -> None:
    """Stop every torchmetrics ``Metric`` in ``module`` from gathering its state over ranks."""
    for m in module.modules():
        if isinstance(m, Metric):
            m.sync_on_compute = False
            m._to_sync = False
            m.dist_sync_on_step = False
