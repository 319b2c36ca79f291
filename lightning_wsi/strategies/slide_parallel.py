"""SlideParallelStrategy: one slide's tiles encoded across ranks, aggregated on rank 0, exactly.

Training step, on N ranks holding the same slide (DESIGN.md, "The method"):

1. rank r encodes its contiguous shard of the K tiles: ``f_r = encode(tiles_r)`` ``[n_r, D]``;
2. the shards' features (and coordinates) are gathered on rank 0, which runs
   ``aggregate(f, coords)`` and ``slide_loss`` on a detached copy ``f`` ``[K, D]``;
3. in ``backward``, rank 0 backpropagates the loss to ``dL/df``, splits it by shard and scatters
   the slices; rank r backpropagates ``(f_r * g_r).sum()`` through its encoder;
4. encoder gradients are summed over ranks (``grad_sync.py``: buckets that start during the
   encoder's backward) and add up to the single-process gradient; aggregator gradients exist
   on rank 0 only and are broadcast from it.

Every rank then takes the same optimiser step. Step 4 is complete when ``backward`` returns, which
is where Lightning's closure ends and gradient clipping and ``on_before_optimizer_step`` begin.
With ``encode_chunk_size`` each rank encodes without autograd in chunks and re-encodes chunk by
chunk in ``backward`` (``chunked.py``), so activation memory no longer grows with K. With it,
``SlideDataModule`` sends a large shard as parts of ``train_part_size`` tiles, which the step
joins: encoded as they arrive, kept in a spill file for the re-encode (``streaming.py``), so the
tiles on the host no longer grow with K either.

Slide groups (``slide_group_size=S``): the N ranks form G = N / S groups of S consecutive ranks.
Each group trains its own slide of the step exactly as above, within the group (its rank 0
aggregates; every per-slide collective runs on the group's process group), and one world-wide
SUM all-reduce of all trainable gradients divided by G makes the step's gradient the MEAN over its
G slides, as one process accumulating over those G slides computes it (Lightning divides each
micro-batch's loss by ``accumulate_grad_batches``): a learning rate means the same at any G, and
with accumulation the mean is over G x ``accumulate_grad_batches`` slides. A group whose slide is
dropped (unreadable, too many bad tiles) adds zero and still counts in the G, as a dropped slide
counts in one process's accumulation window. The per-step world exchanges are host flags (a
failure anywhere, usable slides), the logged loss (the mean over the step's usable slides), the
gradients and the backward's flags; evaluation uses no world collective per step, as groups
evaluate different numbers of slides.

The LightningModule provides the model side (the protocol, see ``SlideParallelStrategy``); this
module holds no model code and the module holds no distributed code.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Generator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_wsi.data.parts import NO_TILE, SlideParts, whole_slide_batch
from lightning_wsi.data.problems import (
    dropped_prediction,
    merge_into_batch,
    set_slide_problem,
    slide_problem,
)
from lightning_wsi.data.sampling import SlideGroup, shard_bounds, slide_group
from lightning_wsi.strategies.chunked import RngState, backward_in_chunks, encode_in_chunks
from lightning_wsi.strategies.collectives import (
    ShardInfo,
    all_gather_rows,
    broadcast_output,
    exchange_shard_info,
    gather_rows,
    interleave_group_outputs,
    scatter_rows,
)
from lightning_wsi.strategies.failures import (
    CatchLoadErrors,
    SlideParallelError,
    describe,
    load_error,
    raise_together,
)
from lightning_wsi.strategies.grad_sync import GradientSync, layout_key
from lightning_wsi.strategies.lifecycle import (
    SlideProcessGroups,
    join_process_group,
    launcher_for,
    leave_process_group,
    new_slide_groups,
)
from lightning_wsi.strategies.module_state import BatchNormStats, keep_metrics_local
from lightning_wsi.strategies.randomness import rank_stream, stream_seed
from lightning_wsi.strategies.streaming import STREAM_KEY, SlideStreams, TileStream

__all__ = ["SlideParallelStrategy"]

_TRAIN_PROTOCOL = ("encode", "aggregate", "slide_loss")
_EVAL_PROTOCOL = {"val": "evaluate_output", "test": "evaluate_output", "predict": "predict_output"}


@dataclass
class _Pending:
    """What ``training_step`` leaves for ``backward``."""

    info: ShardInfo
    features: torch.Tensor  # this rank's [n_r, D]; with a graph unless chunked
    leaf: torch.Tensor | None  # rank 0: the gathered [K, D] features the aggregator saw
    tiles: torch.Tensor | TileStream | None = None  # chunked: the shard, to encode again
    states: list[RngState] | None = None  # chunked: RNG state before each chunk
    error: BaseException | None = None  # rank 0: its aggregator or loss raised
    skip: bool = False  # no rank could use the slide: nothing to backpropagate


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

    Beyond the gradient: each rank encodes in its own seeded random stream (``randomness.py``),
    so dropout and drop-path masks differ between ranks as they would between tiles on one
    device; an exception on any rank, in the step or in its loader, stops every rank at the same
    step with the original message (``failures.py``); trainable BatchNorm statistics are
    averaged over ranks after every step and metrics are not gathered twice
    (``module_state.py``). The small exchanges of host values (shard sizes, flags, which
    parameters got gradients) use a gloo group, so a CUDA step is never stalled by a read-back.

    With ``slide_group_size=S`` groups of S ranks train G = N / S slides per step (module
    docstring): the sampler arguments give group g the slides g, g + G, ... (Lightning's injected
    ``DistributedSampler`` pads the training order so every group steps equally), and
    ``SlideDataModule`` does the same with each rank's shard. In evaluation each group evaluates
    its slides; torchmetrics states are gathered over one rank of every group, so a metric counts
    every slide once, and ``predict`` returns every slide's prediction on every rank, in order.
    (For a validation loader of your own, Lightning's injected sampler repeats slides to even
    out the groups when their number is not a multiple of G, as under DDP; ``SlideDataModule``
    and prediction do not.) Values logged without ``sync_dist`` are each group's own.

    Args:
        encode_chunk_size: Encode at most this many tiles at a time on each rank, with gradient
            caching in training; ``None`` encodes a rank's shard at once.
        bucket_cap_mb: Size of the gradient buckets whose all-reduce starts during the
            encoder's backward (the encoder is the module's ``encoder`` attribute, if any; the
            other parameters' gradients exist on rank 0 only and are broadcast from it).
        process_group_backend: ``"gloo"``, ``"nccl"``, ...; default by device.
        timeout: Timeout of the collectives.
        start_method: ``"popen"``, ``"spawn"``, ``"fork"`` or ``"forkserver"``.
        slide_group_size: Ranks that share one slide (S, a divisor of the world size); the
            world trains N / S slides per step and the gradient is their mean. ``None``: one
            group of all ranks; ``1``: each rank its own slide (slide data parallel).
        spill_dir: Where a training slide that arrives in parts (``SlideDataModule``'s
            ``train_part_size``, with ``encode_chunk_size``) keeps its tiles between the
            encode and the re-encode (``streaming.py``); ``None``: the temporary folder
            (``TMPDIR``). Node-local disk is best.
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
        slide_group_size: int | None = None,
        spill_dir: str | os.PathLike | None = None,
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
        if slide_group_size is not None and (
            isinstance(slide_group_size, bool)
            or not isinstance(slide_group_size, int)
            or slide_group_size < 1
        ):
            raise ValueError(
                f"strategy.slide_group_size must be a positive integer that divides the world "
                f"size, or null for one group of all ranks; got {slide_group_size!r}."
            )
        self.slide_group_size = slide_group_size
        self.spill_dir = spill_dir
        self.encode_chunk_size = encode_chunk_size
        self.bucket_cap_mb = bucket_cap_mb
        self._pending: _Pending | None = None
        self._window_has_grads = False  # a slide of this accumulation window backpropagated
        self._sync_blocked = False
        self._grad_sync: GradientSync | None = None
        self._grad_sync_key: tuple = ()
        self._host_group: dist.ProcessGroup | None = None  # the world's, for host values
        self._groups = SlideProcessGroups()  # this rank's slide group's process groups
        self._step_groups = (1, 1)  # groups with a usable slide, with tiles: this step (host)
        self._batchnorm: BatchNormStats | None = None
        self._eval_parts = SlideParts()  # this rank's view of the slide being evaluated
        self._seed = 0
        self._owns_process_group = False

    # ------------------------------------------------------------------ set-up

    @property
    def slide_group(self) -> SlideGroup:
        """This rank's slide group: which (``index`` of ``count``), its rank in it (``rank``, its
        shard) and the group size (``size``)."""
        return slide_group(self.global_rank, self.world_size, self.slide_group_size)

    @property
    def _leads(self) -> bool:
        """This rank aggregates its group's slide (rank 0 of the group)."""
        return self.slide_group.rank == 0

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        # Every rank of a group iterates over the group's slides in the same order; tiles are
        # sharded instead. One group: every rank, every slide.
        group = self.slide_group
        return {"num_replicas": group.count, "rank": group.index}

    @override
    def connect(self, model: L.LightningModule) -> None:
        """Check the module's protocol and the options before any process starts or joins."""
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
        if self._layer_sync is not None:
            raise ValueError(
                "Trainer(sync_batchnorm=True) cannot be used with SlideParallelStrategy: "
                "SyncBatchNorm needs every rank to encode the same number of times. Keep "
                "BatchNorm frozen (SlideModule's default), or use freeze_batchnorm=False, whose "
                "running statistics this strategy averages over ranks after every step."
            )
        super().connect(model)

    @override
    def _configure_launcher(self) -> None:
        # Called when the Trainer is built, devices and nodes known: a bad group size fails here,
        # before any process starts.
        slide_group(0, self.num_nodes * self.num_processes, self.slide_group_size)
        self._launcher = launcher_for(self)  # fork-safe with OMP_NUM_THREADS set (lifecycle.py)

    @override
    def setup_distributed(self) -> None:
        # Joined on a store kept across runs; destroyed again in teardown (lifecycle.py).
        self._owns_process_group = join_process_group(self)
        super().setup_distributed()
        # Host values (shard sizes, flags, which parameters got gradients) travel on a gloo
        # group: NCCL would need device tensors and a read-back that stalls the host.
        backend = dist.get_backend()
        self._host_group = None if backend == "gloo" else dist.new_group(backend="gloo")
        self._groups = new_slide_groups(self.slide_group, self._host_group, backend == "gloo")
        self._seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed()))

    @override
    def setup(self, trainer: L.Trainer) -> None:
        super().setup(trainer)
        module = self.lightning_module
        if self.slide_group.count == 1:
            keep_metrics_local(module)  # every rank computes every slide's metrics itself
        else:  # one rank of every group: each slide once
            _gather_metrics_over(module, self._groups.metrics)
        # Every rank of a group logs the same value (its rank 0's output, broadcast): with one
        # group, syncing would only average equal numbers, so Lightning's advice to pass
        # sync_dist=True does not apply; with several it averages over the groups' slides.
        warnings.filterwarnings(
            "ignore", message=r"It is recommended to use `self\.log\(.*sync_dist"
        )
        self._batchnorm = BatchNormStats(module)

    @override
    def configure_ddp(self) -> None:
        # No DistributedDataParallel: this strategy exchanges features and gradients itself.
        # Start every rank from rank 0's parameters and buffers, as DDP would.
        _sync_module_states(self.model)

    @property
    def streams_training_parts(self) -> bool:
        """With gradient caching, a training slide may come as parts, joined into one step
        (``streaming.py``): ``SlideDataModule`` then reads ``train_part_size`` tiles at a time."""
        return self.encode_chunk_size is not None

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """Turn an exception while loading a batch into a marker batch the step reports on every
        rank (``failures.CatchLoadErrors``); one process raises it as it is. A training loader
        whose slides come in parts is wrapped to give one batch per slide
        (``streaming.SlideStreams``)."""
        dataloader = super().process_dataloader(dataloader)
        parted = _streams_parts(dataloader)
        if self.world_size > 1:
            dataloader = CatchLoadErrors(dataloader)
        if parted:
            return SlideStreams(dataloader, self._part_to_device, self.spill_dir)
        return dataloader

    def _part_to_device(self, part: Any) -> Any:
        """What the training loop does to a batch before the step, for a slide's later parts.

        The loop does it outside the step's precision context, and so must this: under
        bf16-mixed autocast, colour jitter's matrix products would otherwise run in bf16 for
        these parts and in float32 for the first."""
        with torch.autocast(self.root_device.type, enabled=False):
            part = self.precision_plugin.convert_input(part)
            part = self.lightning_module._on_before_batch_transfer(part, dataloader_idx=0)
            return self.batch_to_device(part, dataloader_idx=0)

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
        batch_idx = int(args[1] if len(args) > 1 else kwargs.get("batch_idx", 0))
        chunk = self.encode_chunk_size
        error = load_error(batch)
        tiles, coords, features, states = None, None, None, None
        with self.precision_plugin.train_step_context():
            if error is None:
                try:
                    seed = stream_seed(
                        self._seed, self.global_rank, module.trainer.current_epoch, batch_idx
                    )
                    stream = batch.get(STREAM_KEY)
                    if isinstance(stream, TileStream):  # parts from the loader, joined here
                        stream.begin(batch)  # type: ignore[arg-type]
                        with rank_stream(seed, self.root_device):
                            features, states = self._encode_shard(module, stream, chunk)
                        tiles, coords = stream, batch.get("coords")
                    else:
                        tiles, coords = self._local_shard(batch)
                        if len(tiles):
                            with rank_stream(seed, self.root_device):
                                features, states = self._encode_shard(module, tiles, chunk)
                except Exception as err:  # noqa: BLE001 - every rank raises it below
                    error, features = err, None
            info = self._exchange(features, tiles, batch, error)
            if self._training_verdict(info, batch, error) is not None:  # the group skips it
                empty = torch.zeros((0, info.width), dtype=info.dtype, device=self.root_device)
                self._pending = _Pending(info=info, features=empty, leaf=None, skip=True)
                zero = torch.zeros((), dtype=torch.float32, device=self.root_device)
                if self.slide_group.count > 1:
                    self._log_step_loss(module, zero)  # the world's exchange, with nothing
                return zero
            features, all_features, all_coords = self._gather(info, features, coords)
            loss, leaf = None, None
            if self._leads:
                try:
                    needs_grad = torch.is_grad_enabled() and info.needs_grad
                    leaf = all_features.detach().requires_grad_(needs_grad)
                    output = module.aggregate(leaf, all_coords)
                    loss = module.slide_loss(output, {**batch, "coords": all_coords})
                except Exception as err:  # noqa: BLE001 - reported in backward, on every rank
                    error, loss = err, None
        value = self._broadcast_loss(loss)
        self._log_step_loss(module, value)
        self._pending = _Pending(
            info=info,
            features=features,
            leaf=leaf,
            tiles=tiles if chunk is not None else None,
            states=states,
            error=error,
        )
        return loss if loss is not None else value

    def _encode_shard(
        self, module: L.LightningModule, tiles: torch.Tensor | TileStream, chunk: int | None
    ) -> tuple[torch.Tensor | None, list[RngState] | None]:
        """This rank's features ``[n_r, D]`` (``None`` without tiles): in chunks without
        autograd (with the RNG state before each) or at once with autograd."""
        if chunk is not None:
            features, states = encode_in_chunks(module.encode, tiles, chunk, self.root_device)
            return features, states if features is not None else None
        if isinstance(tiles, TileStream):
            tiles = tiles.whole()
        return (module.encode(tiles) if len(tiles) else None), None

    def _training_verdict(
        self, info: ShardInfo, batch: Mapping[str, Any], error: BaseException | None
    ) -> str | None:
        """Why this rank's group skips its slide in this training step, or ``None``; raises on
        every rank if any rank failed.

        With several groups, one SUM all-reduce of host flags over the world makes a failure in
        any group stop every rank at this step, and counts the groups with a usable slide (for
        the logged loss) and with tiles (for BatchNorm statistics).
        """
        group = self.slide_group
        if group.count == 1:
            if info.failed:
                raise_together(self._host_group, error, "training step")
            return self._slide_verdict(info, batch)
        verdict = "a rank of the group failed" if info.failed else self._slide_verdict(info, batch)
        leads = group.rank == 0
        flags = torch.tensor(
            [bool(info.failed), leads and verdict is None, leads and info.total > 0],
            dtype=torch.int64,
        )
        dist.all_reduce(flags, group=self._host_group)
        failed, usable, with_tiles = flags.tolist()
        if failed:
            raise_together(self._host_group, error, "training step")
        self._step_groups = (usable, with_tiles)
        return verdict

    def _log_step_loss(self, module: L.LightningModule, value: torch.Tensor) -> None:
        """Log the training loss (``log_train_loss`` or ``train/loss``): the slide's, or with
        several groups the mean over the step's usable slides (one device all-reduce, the same
        value on every rank; nothing is logged if no group could use its slide)."""
        if self.slide_group.count > 1:
            total = value * float(self._leads)
            dist.all_reduce(total)
            usable = self._step_groups[0]
            if usable == 0:
                return
            value = total / usable
        log = getattr(module, "log_train_loss", None)
        if callable(log):
            log(value)
        else:
            module.log("train/loss", value, on_step=True, on_epoch=True, batch_size=1)

    @override
    def backward(
        self, closure_loss: torch.Tensor, optimizer: torch.optim.Optimizer | None, *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:  # fmt: skip
        pending, self._pending = self._pending, None
        if pending is None:  # not from this strategy's training_step
            return super().backward(closure_loss, optimizer, *args, **kwargs)
        module = self.lightning_module
        if pending.skip:
            return self._skip_backward(module, pending, closure_loss)
        self._window_has_grads = True
        info, error = pending.info, pending.error
        self.pre_backward(closure_loss)
        # On every rank, so that hooks run and a gradient scaler is initialised everywhere; only
        # rank 0's loss has a graph.
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        full_grad = None
        if self._leads and error is None:
            try:
                self.precision_plugin.backward(closure_loss, module, optimizer, *args, **kwargs)
                assert pending.leaf is not None
                full_grad = pending.leaf.grad
            except Exception as err:  # noqa: BLE001 - reported below, on every rank
                error = err
        sync = None if self._sync_blocked else self._gradient_sync(module)
        if info.needs_grad:  # a frozen encoder needs no dL/df and no second encode
            if self._leads and full_grad is None:  # no path to the features, or failed
                full_grad = torch.zeros((info.total, info.width), dtype=info.dtype,
                                        device=self.root_device)  # fmt: skip
            grad = scatter_rows(full_grad, info, like=pending.features, group=self._groups.device)
            if error is None and len(grad):
                try:
                    self._encoder_backward(pending, grad, sync)
                except Exception as err:  # noqa: BLE001 - reported below, on every rank
                    error = err
        if error is None and sync is not None and not self._leads:
            error = sync.foreign_gradient_error(self.global_rank)
        self._combine(sync, error, info)
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)
        self.post_backward(closure_loss)
        return closure_loss

    def _combine(
        self, sync: GradientSync | None, error: BaseException | None, info: ShardInfo
    ) -> None:
        """The end of every backward: combine gradients (unless accumulating), exchange the host
        flags, keep BatchNorm statistics equal, and raise on every rank if any failed."""
        if sync is not None:
            sync.launch_rest()  # every rank has now issued the same collectives, in order
        failed, window, presence = self._exchange_flags(sync, error)
        if sync is not None:
            sync.finish(presence)
            self._window_has_grads = window  # any rank's: with groups, a step for all or none
        self._sync_batchnorm(info)
        if failed:
            raise_together(self._host_group, error, "backward")

    def _skip_backward(
        self, module: nn.Module, pending: _Pending, closure_loss: torch.Tensor
    ) -> torch.Tensor:
        """Backward of a slide no rank of the group could use: it adds nothing. At the end of an
        accumulation window that other slides contributed to, their local gradients still need
        combining. With several groups, the others may have used theirs: this group joins
        every world exchange of the backward (as zeros), and the gradient scaler and hooks run
        as in a backward."""
        if self.slide_group.count > 1:
            closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
            self._combine(None if self._sync_blocked else self._gradient_sync(module), None,
                          pending.info)  # fmt: skip
            return self.precision_plugin.post_backward(closure_loss, module)
        if self._sync_blocked or not self._window_has_grads:
            return closure_loss
        sync = self._gradient_sync(module)
        sync.launch_rest()
        _, _, presence = self._exchange_flags(sync, None)
        sync.finish(presence)
        return closure_loss

    def _sync_batchnorm(self, info: ShardInfo) -> None:
        """Trainable BatchNorm statistics: the shard-size-weighted mean over the group's ranks,
        and with several groups the mean over the groups that had tiles."""
        if not self._batchnorm:
            return
        group = self.slide_group
        total = info.total if group.count == 1 else info.total * max(self._step_groups[1], 1)
        self._batchnorm.sync(info.sizes[group.rank], total)

    @override
    def optimizer_step(
        self, optimizer: torch.optim.Optimizer, closure: Callable[[], Any],
        model: L.LightningModule | nn.Module | None = None, **kwargs: Any,
    ) -> Any:  # fmt: skip
        """Step unless every slide of the accumulation window was skipped (then there is no
        gradient at all, and AdamW would still decay the weights and its moments)."""
        result = closure()  # training step and backward, on every rank alike
        stepped, self._window_has_grads = self._window_has_grads, False
        if not stepped:
            return result
        return super().optimizer_step(optimizer, lambda: result, model, **kwargs)

    def _encoder_backward(
        self, pending: _Pending, grad: torch.Tensor, sync: GradientSync | None
    ) -> None:
        """Backpropagate this rank's slice of ``dL/df`` through its encoder (again in chunks)."""
        begin = sync.begin if sync is not None else None
        if pending.states is not None:
            assert pending.tiles is not None and self.encode_chunk_size is not None
            backward_in_chunks(
                self.lightning_module.encode,
                pending.tiles,
                grad,
                self.encode_chunk_size,
                pending.states,
                self.precision_plugin.train_step_context,
                before_last=begin,
            )
            if isinstance(pending.tiles, TileStream):
                pending.tiles.close()  # its spill file is not needed any more
        elif pending.features.requires_grad:
            if begin is not None:
                begin()
            torch.autograd.backward(pending.features, grad.to(pending.features.dtype))

    def _gradient_sync(self, module: nn.Module) -> GradientSync:
        """The gradient combination for the current trainable parameters (rebuilt if they or their
        memory layout change, e.g. a callback unfreezing the encoder). The encoder's parameters,
        last layer first, lead so that their buckets start during its backward; the others are
        rank 0's alone and are broadcast. A module without an ``encoder`` sums everything."""
        encoder = _encoder_of(module)
        trainable = [p for p in module.parameters() if p.requires_grad]
        if encoder is not module:
            ids = {id(p) for p in encoder.parameters()}
            first = [p for p in trainable if id(p) in ids][::-1]
            rest = [p for p in trainable if id(p) not in ids][::-1]
        else:
            first, rest = trainable[::-1], []
        key = layout_key(first + rest)
        if self._grad_sync is None or self._grad_sync_key != key:
            if self._grad_sync is not None:
                self._grad_sync.remove()
            self._grad_sync = GradientSync(
                first + rest,
                overlapped=len(first),
                bucket_bytes=int(self.bucket_cap_mb * 2**20),
                num_slides=self.slide_group.count,
            )
            self._grad_sync_key = key
        return self._grad_sync

    def _exchange_flags(
        self, sync: GradientSync | None, error: BaseException | None
    ) -> tuple[bool, bool, list[bool] | None]:
        """One MAX all-reduce of host flags over the world: did any rank fail, did any rank's
        accumulation window backpropagate a slide, and which parameters got a gradient on any
        rank."""
        local = sync.local_presence() if sync is not None else []
        flags = torch.tensor([error is not None, self._window_has_grads, *local], dtype=torch.uint8)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._host_group)
        values = [bool(v) for v in flags.tolist()]
        return values[0], values[1], values[2:] if sync is not None else None

    @override
    def teardown(self) -> None:
        if self._grad_sync is not None:
            self._grad_sync.remove()
            self._grad_sync, self._grad_sync_key = None, ()
        if self.slide_group.count > 1 and self.lightning_module is not None:
            _gather_metrics_over(self.lightning_module, None)  # its groups go below
        try:
            super().teardown()
        finally:
            # No process group outlives the run: a later Trainer would wait on it forever.
            extra = [self._host_group, *self._groups.created]
            leave_process_group(self, self._owns_process_group, extra)
            self._owns_process_group, self._host_group = False, None
            self._groups = SlideProcessGroups()

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
        error = load_error(batch)
        parts = self._eval_parts
        tiles, coords, features = None, None, None
        with context(), torch.no_grad():
            if error is None:
                try:
                    parts.begin(batch)  # the same (slide, part) sequence on every rank
                    tiles, coords = self._local_shard(batch)
                    if len(tiles) and not parts.dropped:
                        features = self._encode_for_evaluation(module, tiles)
                except Exception as err:  # noqa: BLE001 - every rank raises it below
                    error, features = err, None
            info = self._exchange(features, tiles, batch, error)
            if info.failed:  # the group's ranks; with several groups, the others stop at teardown
                raise_together(self._groups.host, error, f"{stage} step")
            self._collect_part(parts, info, features, coords, batch)
            if not parts.last:  # the slide is judged (and its drop recorded) at its last part
                set_slide_problem(batch, None)
                return None
            slide = parts.finish()
            if slide.verdict is not None:  # in no metric; predict says why
                set_slide_problem(batch, slide.verdict)
                return dropped_prediction(batch) if stage == "predict" else None
            output = None
            if self._leads:
                try:
                    output = module.aggregate(slide.features, slide.coords)
                except Exception as err:  # noqa: BLE001 - every rank raises it below
                    error = err
        output = self._broadcast_output(output, error, stage)
        full_batch = whole_slide_batch(batch, slide)
        if stage == "predict":
            return method(output, full_batch)
        return method(output, full_batch, stage)

    def _collect_part(
        self,
        parts: SlideParts,
        info: ShardInfo,
        features: torch.Tensor | None,
        coords: torch.Tensor | None,
        batch: Mapping[str, Any],
    ) -> None:
        """Add this evaluation part to the slide: its problems (every rank's, merged into
        ``batch``), and unless the slide is already lost its features gathered on the group's
        rank 0 and its coords (and a bag's ``slide_index``) on every rank, in rank order."""
        parts.add_problems(info.bad_tiles, self._merge_problems(info, batch))
        if parts.dropped or info.total == 0:
            return
        _, all_features, _ = self._gather(info, features, None)
        device = self._groups.device
        all_coords, index = None, batch.get("slide_index")
        if coords is not None:
            all_coords = all_gather_rows(coords.to(self.root_device), info, device)
        if index is not None:  # a patient bag: which slide each tile is from, like coords
            index = all_gather_rows(torch.as_tensor(index).to(self.root_device), info, device)
        parts.add(info.total, all_features, all_coords, index)

    @override
    def on_predict_end(self) -> None:
        """One prediction per slide: the ``None`` of evaluation parts before a slide's last are
        left out. With several groups, every rank's predictions become every slide's, in the
        loader's order: group g predicted the slides g, g + G, ...
        (``interleave_group_outputs``)."""
        super().on_predict_end()
        group = self.slide_group
        loop = self.lightning_module.trainer.predict_loop
        if not loop.return_predictions:
            return
        # The loop returns these lists (one per loader) after this hook: filled in place.
        for outputs in loop._predictions:
            outputs[:] = [o for o in outputs if o is not None]
            if group.count > 1:
                outputs[:] = interleave_group_outputs(
                    outputs, group.count, self._leads, self._host_group
                )

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
        group = self.slide_group
        if group.size > 1 and len(tiles) == total:
            start, stop = shard_bounds(total, group.rank, group.size)
            tiles = tiles[start:stop]
            coords = coords[start:stop] if coords is not None else None
        return tiles, coords

    def _exchange(
        self,
        features: torch.Tensor | None,
        tiles: torch.Tensor | None,
        batch: Mapping[str, Any],
        error: BaseException | None,
    ) -> ShardInfo:
        """The step's first exchange (host values only): shard sizes, feature layout, failures."""
        n_local = len(tiles) if tiles is not None and error is None else 0
        needs_grad = None
        if features is not None and not features.requires_grad and torch.is_grad_enabled():
            # Encoded without autograd (chunked): the encoder's trainable parameters decide.
            needs_grad = any(
                p.requires_grad for p in _encoder_of(self.lightning_module).parameters()
            )
        return exchange_shard_info(
            features, n_local, batch.get("slide_id"), failed=error is not None,
            needs_grad=needs_grad, bad_tiles=len(batch.get("tile_problems") or ()),
            max_bad_tiles=int(batch.get("max_bad_tiles", 0)),
            slide_problem=bool(batch.get("slide_problem")), group=self._groups.host,
        )  # fmt: skip

    def _slide_verdict(self, info: ShardInfo, batch: Mapping[str, Any]) -> str | None:
        """Why no rank uses this slide in this step, or ``None``: the same answer on every rank.

        Tiles a loader left out are summed over ranks and judged against the whole sample, as
        one process would judge them (:meth:`_merge_problems`).
        """
        reported = self._merge_problems(info, batch)
        num_tiles = int(batch.get("num_tiles", info.total + info.bad_tiles))
        verdict = slide_problem(info.bad_tiles, num_tiles, info.max_bad_tiles, reported)
        if verdict is None and info.total == 0:
            verdict = NO_TILE
        if verdict is not None:
            set_slide_problem(batch, verdict)
        return verdict

    def _merge_problems(self, info: ShardInfo, batch: Mapping[str, Any]) -> str | None:
        """A reason some rank's loader gave for the slide, or ``None``. When any rank had a
        problem, every rank's record is gathered (host group) and written into every rank's
        ``batch``, so the problem record (``data.problems.ProblemRecorder``) is the same
        everywhere."""
        if not info.has_problems:
            return None
        if self.slide_group.size == 1:
            return batch.get("slide_problem")
        mine = (list(batch.get("tile_problems") or ()), batch.get("slide_problem"))
        everyone: list[Any] = [None] * self.slide_group.size
        dist.all_gather_object(everyone, mine, group=self._groups.host)
        reasons = [r for _, r in everyone if r]
        if isinstance(batch, MutableMapping):
            merge_into_batch(batch, [p for tiles, _ in everyone for p in tiles], None)
        return reasons[0] if reasons else None

    def _gather(
        self, info: ShardInfo, features: torch.Tensor | None, coords: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's features (``[0, D]`` for a rank without tiles), and on the group's rank 0
        the features ``[K, D]`` and coords ``[K, 2]`` of all its ranks."""
        if features is None:
            features = torch.zeros((0, info.width), dtype=info.dtype, device=self.root_device)
        group = self._groups.device
        all_features = gather_rows(features.detach(), info, group=group)
        all_coords = None
        if coords is not None:
            all_coords = gather_rows(coords.to(self.root_device), info, group=group)
        return features, all_features, all_coords

    def _broadcast_loss(self, loss: torch.Tensor | None) -> torch.Tensor:
        """The slide's loss (detached, float32) on every rank; zero where rank 0 failed."""
        value = torch.zeros((), dtype=torch.float32, device=self.root_device)
        if loss is not None:
            value.copy_(loss.detach())
        group = self.slide_group
        if group.size > 1:
            dist.broadcast(value, src=group.leader, group=self._groups.device)
        return value

    def _broadcast_output(self, output: Any, error: BaseException | None, stage: str) -> Any:
        """Rank 0's aggregator output on every rank (tensors on this rank's device); rank 0's
        error, if it had one, raised on every rank."""
        if self.slide_group.size == 1:
            if error is not None:
                raise error
            return output
        message = describe(error) if error is not None else None
        groups = self._groups
        output, message = broadcast_output(
            output, self.root_device, error=message, host_group=groups.host, group=groups.device
        )
        if message is not None:
            group = self.slide_group
            who = "Every rank" if group.count == 1 else "Every rank of its slide group"
            raise SlideParallelError(
                f"Slide-parallel {stage} step failed on rank {group.leader}: {message}. {who} "
                "stopped at the same step."
            ) from error
        return output

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


def _gather_metrics_over(module: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Make every torchmetrics ``Metric`` in ``module`` gather its state over ``group`` when it
    computes (``None``: the world): with slide groups, one rank of every group, so the ranks
    of a group, which all update with the same slide, count it once."""
    for m in module.modules():
        if isinstance(m, Metric):
            m.sync_on_compute = True
            m._to_sync = True
            m.process_group = group


def _streams_parts(loader: object) -> bool:
    """The loader's training slides come in parts of a rank's shard (``SlideDataset`` with
    ``train_part_size``), counted per slide by its sampler."""
    dataset = getattr(loader, "dataset", None)
    sampler = getattr(loader, "sampler", None)
    return bool(getattr(dataset, "shard_parts", False)) and callable(
        getattr(sampler, "num_slides", None)
    )


def _encoder_of(module: nn.Module) -> nn.Module:
    """The module's ``encoder`` attribute, or the whole module for one without it."""
    encoder = getattr(module, "encoder", None)
    return encoder if isinstance(encoder, nn.Module) else module


def _batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Mapping[str, Any]:
    batch = args[0] if args else kwargs.get("batch")
    if not isinstance(batch, Mapping) or "tiles" not in batch:
        raise TypeError(
            "SlideParallelStrategy expects one slide per batch: a mapping with `tiles` "
            "[k, 3, H, W], `coords`, `target` and `slide_id` (DataLoader(..., batch_size=None)); "
            f"got {type(batch).__name__}."
        )
    return batch
