"""SlideParallelStrategy: one slide's tiles encoded across ranks, aggregated on rank 0, exactly.

Training step, on N ranks holding the same slide (DESIGN.md, "The method"):

1. rank r encodes its contiguous shard of the K tiles: ``f_r = encode(tiles_r)`` ``[n_r, D]``;
2. the shards' features (and coordinates) are gathered on rank 0, which runs
   ``aggregate(f, coords)`` and ``slide_loss`` on a detached copy ``f`` ``[K, D]``;
3. in ``backward``, rank 0 backpropagates the loss to ``dL/df``, splits it by shard and scatters
   the slices; rank r backpropagates ``(f_r * g_r).sum()`` through its encoder;
4. all gradients are summed over ranks (``grad_sync.py``: buckets that start during the
   encoder's backward): encoder gradients add up to the single-process gradient, aggregator
   gradients exist on rank 0 only and others add zeros.

Every rank then takes the same optimiser step. Step 4 is complete when ``backward`` returns, which
is where Lightning's closure ends and gradient clipping and ``on_before_optimizer_step`` begin.
With ``encode_chunk_size`` each rank encodes without autograd in chunks and re-encodes chunk by
chunk in ``backward`` (``chunked.py``), so activation memory no longer grows with K.

The LightningModule provides the model side (the protocol, see ``SlideParallelStrategy``); this
module holds no model code and the module holds no distributed code.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from typing_extensions import override

from lightning_wsi.data.sampling import shard_bounds
from lightning_wsi.strategies.chunked import RngState, backward_in_chunks, encode_in_chunks
from lightning_wsi.strategies.collectives import (
    ShardInfo,
    all_gather_rows,
    exchange_shard_info,
    gather_rows,
    scatter_rows,
)
from lightning_wsi.strategies.grad_sync import GradientSum

__all__ = ["SlideParallelStrategy"]

_TRAIN_PROTOCOL = ("encode", "aggregate", "slide_loss")
_EVAL_PROTOCOL = {"val": "evaluate_output", "test": "evaluate_output", "predict": "predict_output"}


@dataclass
class _Pending:
    """What ``training_step`` leaves for ``backward``."""

    info: ShardInfo
    features: torch.Tensor  # this rank's [n_r, D]; with a graph unless chunked
    leaf: torch.Tensor | None  # rank 0: the gathered [K, D] features the aggregator saw
    tiles: torch.Tensor | None = None  # chunked: the shard, to encode again
    states: list[RngState] | None = None  # chunked: RNG state before each chunk


class SlideParallelStrategy(DDPStrategy):
    """Train on every tile of a slide across N processes with the gradient of one process.

    ``Trainer(strategy="slide_parallel", devices=N)`` (also ``"slide_parallel_spawn"``,
    ``"slide_parallel_fork"`` and ``"slide_parallel_notebook"`` for the other start methods), or
    ``SlideParallelStrategy(encode_chunk_size=64)`` for options. Built on Lightning's DDP strategy
    for process launch, cluster environments (torchrun, SLURM), process groups (gloo on CPU, NCCL
    on GPU), checkpointing and precision, but the model is not wrapped in
    ``DistributedDataParallel``: features and gradients are exchanged as described in the module
    docstring. ``devices=1`` with ``encode_chunk_size`` trains a whole slide on one device.

    Protocol for the LightningModule (``lightning_wsi.SlideModule`` implements it):

    - ``encode(tiles [k, 3, H, W]) -> [k, D]``: the tile encoder, on this rank's shard;
    - ``aggregate(features [K, D], coords [K, 2]) -> output``: run on rank 0 only;
    - ``slide_loss(output, batch) -> 0-d tensor``: the slide's loss, on rank 0;
    - optional ``log_train_loss(loss)``: logs the training loss (default: ``train/loss``);
    - for validation/test ``evaluate_output(output, batch, stage)``, for predict
      ``predict_output(output, batch)``: called on every rank with rank 0's output, so every rank
      logs the same metrics; optional ``encode_in_chunks(tiles) -> [k, D]`` for evaluation.

    ``batch`` is the slide mapping (``tiles``, ``coords``, ``target``, ``slide_id``); in the
    calls after aggregation its ``coords`` are those of all K tiles. Every rank must load the same
    slide: ``SlideDataModule`` gives each rank only its shard; any other loader of whole slides
    works too (the strategy's sampler arguments give every rank every slide, and each rank keeps
    its shard of the tiles), at the price of reading all tiles on every rank.

    Args:
        encode_chunk_size: Encode at most this many tiles at a time on each rank, with gradient
            caching in training; ``None`` encodes a rank's shard at once.
        bucket_cap_mb: Size of the gradient buckets whose all-reduce starts during the
            encoder's backward (the encoder is the module's ``encoder`` attribute, if any).
        process_group_backend: ``"gloo"``, ``"nccl"``, ...; default by device.
        timeout: Timeout of the collectives.
        start_method: ``"popen"``, ``"spawn"``, ``"fork"`` or ``"forkserver"``.
    """

    strategy_name = "slide_parallel"
    slide_parallel = True  # tells SlideDataModule to shard tiles rather than split slides

    def __init__(
        self,
        encode_chunk_size: int | None = None,
        bucket_cap_mb: float = 25.0,
        accelerator: L.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        cluster_environment: ClusterEnvironment | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        if encode_chunk_size is not None and encode_chunk_size < 1:
            raise ValueError(
                f"Expected a positive `encode_chunk_size` (or None), got {encode_chunk_size}."
            )
        if bucket_cap_mb <= 0:
            raise ValueError(f"Expected a positive `bucket_cap_mb`, got {bucket_cap_mb}.")
        self.encode_chunk_size = encode_chunk_size
        self.bucket_cap_mb = bucket_cap_mb
        self._pending: _Pending | None = None
        self._sync_blocked = False
        self._grad_sum: GradientSum | None = None
        self._grad_sum_key: tuple[int, ...] = ()

    # ------------------------------------------------------------------ set-up

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every rank iterates over every slide in the same order; tiles are sharded instead.
        return {"num_replicas": 1, "rank": 0}

    @override
    def connect(self, model: L.LightningModule) -> None:
        """Check the module's protocol before any process starts or joins a group."""
        module = model
        missing = [name for name in _TRAIN_PROTOCOL if not callable(getattr(module, name, None))]
        if missing:
            raise TypeError(
                f"SlideParallelStrategy needs a LightningModule with `encode(tiles) -> [k, D]`, "
                f"`aggregate(features, coords)` and `slide_loss(output, batch)` (as "
                f"lightning_wsi.SlideModule has); {type(module).__name__} lacks "
                f"{', '.join(f'`{m}`' for m in missing)}."
            )
        if not module.automatic_optimization:
            raise TypeError(
                "SlideParallelStrategy supports automatic optimisation only; "
                f"{type(module).__name__} sets `automatic_optimization = False`."
            )
        super().connect(model)

    @override
    def configure_ddp(self) -> None:
        # No DistributedDataParallel: this strategy exchanges features and gradients itself.
        # Start every rank from rank 0's parameters and buffers, as DDP would.
        _sync_module_states(self.model)

    @override
    @contextmanager
    def block_backward_sync(self) -> Generator[None, None, None]:
        """Accumulate local gradients without the all-reduce (non-final accumulation steps)."""
        self._sync_blocked = True
        try:
            yield
        finally:
            self._sync_blocked = False

    # ------------------------------------------------------------------ training

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.lightning_module
        batch = _batch(args, kwargs)
        chunk = self.encode_chunk_size
        with self.precision_plugin.train_step_context():
            tiles, coords = self._local_shard(batch)
            features, states = None, None
            if len(tiles) and chunk is not None:
                features, states = encode_in_chunks(module.encode, tiles, chunk, self.root_device)
            elif len(tiles):
                features = module.encode(tiles)
            info, features, all_features, all_coords = self._gather(
                features, len(tiles), coords, batch
            )
            loss, leaf = None, None
            if self.global_rank == 0:
                leaf = all_features.detach().requires_grad_(torch.is_grad_enabled())
                output = module.aggregate(leaf, all_coords)
                loss = module.slide_loss(output, {**batch, "coords": all_coords})
        value = self._broadcast_loss(loss)
        log = getattr(module, "log_train_loss", None)
        if callable(log):
            log(value)
        else:
            module.log("train/loss", value, on_step=True, on_epoch=True, batch_size=1)
        self._pending = _Pending(
            info=info,
            features=features,
            leaf=leaf,
            tiles=tiles if chunk is not None else None,
            states=states,
        )
        return loss if loss is not None else value

    @override
    def backward(
        self, closure_loss: torch.Tensor, optimizer: torch.optim.Optimizer | None, *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:  # fmt: skip
        pending, self._pending = self._pending, None
        if pending is None:  # not from this strategy's training_step
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        module = self.lightning_module
        self.pre_backward(closure_loss)
        # On every rank, so that hooks run and a gradient scaler is initialised everywhere; only
        # rank 0's loss has a graph.
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        full_grad = None
        if self.global_rank == 0:
            self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
            assert pending.leaf is not None
            full_grad = pending.leaf.grad
            if full_grad is None:  # the loss does not depend on the features
                full_grad = torch.zeros_like(pending.leaf)
        grad = scatter_rows(full_grad, pending.info, like=pending.features)
        gradient_sum = None if self._sync_blocked else self._gradient_sum(module)
        begin = gradient_sum.begin if gradient_sum is not None else None
        if pending.states is not None:
            assert pending.tiles is not None and self.encode_chunk_size is not None
            backward_in_chunks(
                module.encode,
                pending.tiles,
                grad,
                self.encode_chunk_size,
                pending.states,
                self.precision_plugin.train_step_context,
                before_last=begin,
            )
        elif pending.features.requires_grad:
            if begin is not None:
                begin()
            torch.autograd.backward(pending.features, grad.to(pending.features.dtype))
        if gradient_sum is not None:
            gradient_sum.finish()
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def _gradient_sum(self, module: nn.Module) -> GradientSum:
        """The bucketed gradient sum for the current trainable parameters (rebuilt if they
        change, e.g. a callback unfreezing the encoder). The encoder's parameters, last layer
        first, lead so that their buckets start during its backward."""
        encoder = getattr(module, "encoder", None)
        first = [p for p in encoder.parameters() if p.requires_grad][::-1] if isinstance(
            encoder, nn.Module
        ) else []  # fmt: skip
        ids = {id(p) for p in first}
        rest = [p for p in module.parameters() if p.requires_grad and id(p) not in ids][::-1]
        key = tuple(id(p) for p in first + rest)
        if self._grad_sum is None or self._grad_sum_key != key:
            if self._grad_sum is not None:
                self._grad_sum.remove()
            self._grad_sum = GradientSum(
                first + rest, overlapped=len(first), bucket_bytes=int(self.bucket_cap_mb * 2**20)
            )
            self._grad_sum_key = key
        return self._grad_sum

    @override
    def teardown(self) -> None:
        if self._grad_sum is not None:
            self._grad_sum.remove()
            self._grad_sum, self._grad_sum_key = None, ()
        super().teardown()

    # ------------------------------------------------------------------ evaluation

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step("val", self.precision_plugin.val_step_context, args, kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._evaluation_step("test", self.precision_plugin.test_step_context, args, kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        context = self.precision_plugin.predict_step_context
        return self._evaluation_step("predict", context, args, kwargs)

    def _evaluation_step(
        self,
        stage: str,
        context: Callable[[], AbstractContextManager],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        module = self.lightning_module
        method = getattr(module, _EVAL_PROTOCOL[stage], None)
        if not callable(method):
            raise TypeError(
                f"SlideParallelStrategy runs the {stage} step as encode on every rank, aggregate "
                f"on rank 0, then `{_EVAL_PROTOCOL[stage]}(output, batch"
                f"{', stage' if stage != 'predict' else ''})` on every rank; "
                f"{type(module).__name__} lacks `{_EVAL_PROTOCOL[stage]}`."
            )
        batch = _batch(args, kwargs)
        with context(), torch.no_grad():
            tiles, coords = self._local_shard(batch)
            features = self._encode_for_evaluation(module, tiles) if len(tiles) else None
            info, features, all_features, _ = self._gather(features, len(tiles), None, batch)
            all_coords = None  # every rank needs them for the per-slide outputs
            if coords is not None:
                all_coords = all_gather_rows(coords.to(self.root_device), info)
            output = None
            if self.global_rank == 0:
                output = module.aggregate(all_features, all_coords)
        output = self._broadcast_output(output)
        full_batch = {k: v for k, v in batch.items() if k not in ("tiles", "tile_index")}
        full_batch["coords"] = all_coords
        if stage == "predict":
            return method(output, full_batch)
        return method(output, full_batch, stage)

    def _encode_for_evaluation(self, module: nn.Module, tiles: torch.Tensor) -> torch.Tensor:
        chunked = getattr(module, "encode_in_chunks", None)
        if callable(chunked) and self.encode_chunk_size is None:
            return chunked(tiles)
        if self.encode_chunk_size is None:
            return module.encode(tiles)
        return torch.cat([module.encode(c) for c in tiles.split(self.encode_chunk_size)])

    # ------------------------------------------------------------------ helpers

    def _local_shard(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's tiles and coords; a whole slide (not sharded by the loader) is cut here."""
        tiles, coords = batch["tiles"], batch.get("coords")
        total = int(batch.get("num_tiles", len(tiles)))
        if self.world_size > 1 and len(tiles) == total:
            start, stop = shard_bounds(total, self.global_rank, self.world_size)
            tiles = tiles[start:stop]
            coords = coords[start:stop] if coords is not None else None
        return tiles, coords

    def _gather(
        self,
        features: torch.Tensor | None,
        n_local: int,
        coords: torch.Tensor | None,
        batch: Mapping[str, Any],
    ) -> tuple[ShardInfo, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Shard sizes, this rank's features (``[0, D]`` for a rank without tiles), and on rank 0
        the features ``[K, D]`` and coords ``[K, 2]`` of all ranks."""
        info = exchange_shard_info(features, n_local, batch.get("slide_id"), self.root_device)
        if features is None:
            features = torch.zeros((0, info.width), dtype=info.dtype, device=self.root_device)
        all_features = gather_rows(features.detach(), info)
        all_coords = None
        if coords is not None:
            all_coords = gather_rows(coords.to(self.root_device), info)
        return info, features, all_features, all_coords

    def _broadcast_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The slide's loss (detached, float32) on every rank."""
        value = torch.zeros((), dtype=torch.float32, device=self.root_device)
        if loss is not None:
            value.copy_(loss.detach())
        torch.distributed.broadcast(value, src=0)
        return value

    def _broadcast_output(self, output: Any) -> Any:
        """Rank 0's aggregator output on every rank (tensors on this rank's device)."""
        if self.world_size == 1:
            return output
        output = self.broadcast(move_data_to_device(output, "cpu"), src=0)
        return move_data_to_device(output, self.root_device)

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (
            ("slide_parallel", "popen"),
            ("slide_parallel_spawn", "spawn"),
            ("slide_parallel_fork", "fork"),
            ("slide_parallel_notebook", "fork"),
        ):
            if name not in strategy_registry:
                strategy_registry.register(
                    name,
                    cls,
                    description=f"Slide-parallel training with start method {start_method!r}",
                    start_method=start_method,
                )


def _batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Mapping[str, Any]:
    batch = args[0] if args else kwargs.get("batch")
    if not isinstance(batch, Mapping) or "tiles" not in batch:
        raise TypeError(
            "SlideParallelStrategy expects one slide per batch: a mapping with `tiles` "
            "[k, 3, H, W], `coords`, `target` and `slide_id` (DataLoader(..., batch_size=None)); "
            f"got {type(batch).__name__}."
        )
    return batch
