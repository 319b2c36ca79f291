"""Run the same training as 1, 2 or 3 real processes and compare what they end with.

``run_world(world_size, scenarios, out_dir)`` starts ``world_size`` processes (torch
multiprocessing, forked from the test process) that join one gloo process group through
Lightning's own environment variables, as torchrun would, and each trains every scenario in
turn with a fresh
``Trainer(strategy=SlideParallelStrategy(...), accelerator="cpu", devices=world_size)``. Every rank
writes what it ends with to ``out_dir/<scenario>.rank<r>.pt``: initial and final parameters split
into encoder and aggregator, and the loss of every step. Starting the processes once for all
scenarios keeps the suite fast; everything inside is the real Trainer and strategy.
"""

from __future__ import annotations

import collections
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.multiprocessing as mp
import torchmetrics
from lightning.pytorch.plugins.precision import MixedPrecision
from slide_batches import make_slides
from torch.utils.data import DataLoader, DistributedSampler

from lightning_wsi import SlideDataModule, SlideModule, SlideParallelStrategy
from lightning_wsi.data.sampling import shard_bounds
from lightning_wsi.strategies.lifecycle import release_openmp_threads

SMALL_AGG = {
    "gma": {"hidden_dim": 32, "attention_dim": 16},
    "transformer": {"hidden_dim": 32, "num_heads": 4, "num_layers": 2},
}


@dataclass(frozen=True)
class Scenario:
    """One training run: model, optimiser, data, chunking, Trainer options."""

    name: str
    aggregator: str = "gma"
    optimizer: str = "adamw"
    chunk: int | None = None
    k: int = 7
    n_slides: int = 3
    epochs: int = 2
    manifest: str | None = None  # train through SlideDataModule on these slides instead
    mpp: float = 3.5  # SlideDataModule's tile mpp and size
    tile_size: int = 32
    on_bad_slide: str = "raise"
    bag: str = "slide"  # "patient": items are patients' slides (the manifest has patient_id)
    num_workers: int = 0  # SlideDataModule's loader workers
    trainer: dict[str, Any] = field(default_factory=dict)
    evaluate: bool = False  # also validate every epoch and predict at the end
    checkpoint_dir: str | None = None  # keep last.ckpt there
    resume: bool = False  # resume from checkpoint_dir/last.ckpt
    stop_after_epochs: int | None = None  # an interruption: stop once this many epochs are done
    lr_schedule: str = "constant"
    bucket_cap_mb: float = 0.05
    seed: int = 0
    encoder: str = "test_resnet"
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)  # drop_rate, drop_path_rate, ...
    channels_last: bool = False
    freeze_batchnorm: bool = True
    freeze_encoder: bool = False
    lora: dict[str, Any] | None = None  # SlideModule's `lora`: adapters on the encoder
    tiny_slide: bool = True  # add a 2-tile slide (a rank of 3 holds none)
    evaluate_only: bool = False  # no fit: validate and predict a module initialised per rank
    # (rank, world size): that rank's loader drops the last tile of its shard, as a dataset that
    # skips an unreadable tile would; every rank's loader yields only its own shard.
    drop_tile: tuple[int, int] | None = None
    split_like: tuple[int, int | None] | None = None  # see CountingSlideModule.training_step
    record_steps: bool = False  # keep encoder features' zero masks and BatchNorm buffers per step
    count_collectives: bool = False  # count torch.distributed calls per training step


class CountingSlideModule(SlideModule):
    """SlideModule that also counts the slides it evaluates (``val/slides``), a sum-based metric
    that shows a slide counted once per rank."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slides_seen = torchmetrics.SumMetric()

    split_like: tuple[int, int | None] | None = None  # (ranks, chunk) to mimic, reference only

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """With ``split_like``, the single-process reference encodes the tiles in the row groups
        that ranks and chunks would (one autograd graph all the same): bf16 kernels on CPU round
        differently for different batch sizes, which says nothing about the gradient exchange."""
        if self.split_like is None:
            return super().training_step(batch, batch_idx)
        ranks, chunk = self.split_like
        tiles, groups = batch["tiles"], []
        for r in range(ranks):
            start, stop = shard_bounds(len(tiles), r, ranks)
            groups += list(tiles[start:stop].split(chunk or max(stop - start, 1)))
        features = torch.cat([self.encode(g) for g in groups if len(g)])
        loss = self.slide_loss(self.aggregate(features, batch.get("coords")), batch)
        self.log_train_loss(loss)
        return loss

    def evaluate_output(self, output: Any, batch: Any, stage: str) -> torch.Tensor:
        self.slides_seen.update(torch.ones((), device=self.device))
        self.log(f"{stage}/slides", self.slides_seen, on_step=False, on_epoch=True, batch_size=1)
        return super().evaluate_output(output, batch, stage)


class SGDSlideModule(CountingSlideModule):
    """SlideModule with plain SGD (momentum), the optimiser whose update is the gradient."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def build_module(scenario: Scenario, rank: int = 0) -> SlideModule:
    torch.manual_seed(scenario.seed + rank)
    cls = SGDSlideModule if scenario.optimizer == "sgd" else CountingSlideModule
    module = cls(
        scenario.encoder,
        scenario.aggregator,
        "binary",
        encoder_kwargs=scenario.encoder_kwargs or None,
        aggregator_kwargs=SMALL_AGG[scenario.aggregator],
        encoder_lr=1e-3,
        aggregator_lr=3e-3,
        lr_schedule=scenario.lr_schedule,
        warmup_steps=2,
        channels_last=scenario.channels_last,
        freeze_batchnorm=scenario.freeze_batchnorm,
        freeze_encoder=scenario.freeze_encoder,
        lora=scenario.lora,
    )
    module.split_like = scenario.split_like
    return module


def in_memory_slides(scenario: Scenario) -> list[dict[str, Any]]:
    """Slides of K tiles, plus one of 2 tiles: fewer than 3 ranks, so one rank holds none."""
    slides = make_slides(scenario.n_slides, k=scenario.k, seed=scenario.seed + 1)
    if scenario.tiny_slide:
        slides += make_slides(1, k=2, seed=scenario.seed + 2)
    return slides


_COLLECTIVES = (
    "all_gather", "all_gather_object", "all_reduce", "all_to_all", "barrier", "broadcast",
    "broadcast_object_list", "gather", "gather_object", "reduce", "reduce_scatter", "scatter",
    "scatter_object_list",
)  # fmt: skip


class Record(L.Callback):
    """Initial and final parameters by part, the loss of every training batch and, if asked, per
    step: the zero mask of the encoder's features, BatchNorm buffers, collectives issued."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        self.losses: list[float] = []
        self.initial: dict[str, torch.Tensor] = {}
        self.masks: list[torch.Tensor] = []
        self.buckets: dict[str, int] = {}  # gradient buckets: summed (encoder), broadcast
        self.buffers: list[dict[str, torch.Tensor]] = []
        self.collectives: list[dict[str, int]] = []
        self._calls: collections.Counter[str] = collections.Counter()
        if scenario.count_collectives:
            self._count_collectives()

    def _count_collectives(self) -> None:
        for name in _COLLECTIVES:
            original = getattr(torch.distributed, name)

            def counted(*args: Any, _name: str = name, _f: Any = original, **kwargs: Any) -> Any:
                self._calls[_name] += 1
                return _f(*args, **kwargs)

            setattr(torch.distributed, name, counted)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.initial = {n: p.detach().clone() for n, p in module.named_parameters()}
        if self.scenario.record_steps:
            module.encoder.register_forward_hook(self._keep_mask)

    def _keep_mask(self, encoder: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        if not encoder.training:  # training encodes only (not chunked: one per step)
            return
        self.masks.append((output == 0).cpu())

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._calls.clear()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not batch.get("slide_problem"):  # a skipped slide has no loss
            self.losses.append(float(outputs["loss"]))
        if self.scenario.record_steps:
            self.buffers.append({n: b.detach().clone() for n, b in module.named_buffers()})
        if self.scenario.count_collectives:
            self.collectives.append(dict(self._calls))
            sync = trainer.strategy._grad_sync
            summed = sum(b.indices[0] < sync.overlapped for b in sync.buckets)
            self.buckets = {"summed": summed, "broadcast": len(sync.buckets) - summed}

    def result(self, module: L.LightningModule) -> dict[str, Any]:
        final = {n: p.detach().clone() for n, p in module.named_parameters()}
        return {
            "initial": self.initial, "final": final, "losses": self.losses,
            "masks": self.masks, "buffers": self.buffers,
            "collectives": self.collectives, "buckets": self.buckets,
            "final_buffers": {n: b.detach().clone() for n, b in module.named_buffers()},
        }  # fmt: skip


class StopAfter(L.Callback):
    """Stop the run after ``epochs`` epochs, as a preempted job would (the schedule stays sized
    for the whole run)."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def train(
    scenario: Scenario,
    world_size: int | None,
    out_dir: Path,
    rank: int = 0,
    strategy: str | None = None,
    num_nodes: int = 1,
) -> None:
    """Train one scenario; ``world_size=None`` is the plain single-process reference: Lightning's
    default strategy and ``SlideModule.training_step`` with all K tiles. ``world_size`` counts
    the devices per node; ``strategy`` a registered name instead of a configured object."""
    # evaluate_only: every rank starts from its own random weights; rank 0's must win.
    module = build_module(scenario, rank if scenario.evaluate_only else 0)
    record = Record(scenario)
    callbacks: list[L.Callback] = [record]
    if scenario.stop_after_epochs is not None:
        callbacks.append(StopAfter(scenario.stop_after_epochs))
    if scenario.checkpoint_dir is not None:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(scenario.checkpoint_dir, save_last=True)
        )
    trainer_options = dict(scenario.trainer)
    if trainer_options.get("precision") == "16-mixed":
        # Lightning turns "16-mixed" into bf16 on CPU; the plugin keeps float16 and its scaler.
        del trainer_options["precision"]
        trainer_options["plugins"] = [MixedPrecision("16-mixed", "cpu")]
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": world_size or 1,
        "num_nodes": num_nodes,
        "max_epochs": scenario.epochs,
        "logger": False,
        "enable_checkpointing": scenario.checkpoint_dir is not None,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks,
        **trainer_options,
    }
    if strategy is not None:
        options["strategy"] = strategy
    elif world_size is not None:
        # Small buckets: many of them, started in order during the encoder's backward.
        options["strategy"] = SlideParallelStrategy(
            encode_chunk_size=scenario.chunk, bucket_cap_mb=scenario.bucket_cap_mb
        )
    trainer = L.Trainer(**options)
    ckpt_path = None
    if scenario.resume:
        assert scenario.checkpoint_dir is not None
        ckpt_path = str(Path(scenario.checkpoint_dir) / "last.ckpt")
    if scenario.manifest is not None:
        dm = SlideDataModule(
            scenario.manifest, k=scenario.k, mpp=scenario.mpp, tile_size=scenario.tile_size,
            val_fraction=0.0, seed=scenario.seed, num_workers=scenario.num_workers,
            progress=False, tiling_workers=0, on_bad_slide=scenario.on_bad_slide,
            bag=scenario.bag,
        )  # fmt: skip
        trainer.fit(module, dm, ckpt_path=ckpt_path)
        result = record.result(module)
        result["problems"] = dm.problems.as_dicts()
        if scenario.evaluate:
            result["predictions"] = trainer.predict(module, datamodule=dm)
    else:
        slides = in_memory_slides(scenario)
        if scenario.drop_tile is not None:
            slides = [_without_tile(s, *scenario.drop_tile, world_size and rank) for s in slides]
        val = make_slides(4, k=5, seed=scenario.seed + 3) if scenario.evaluate else None
        # The same shuffled order in every run and on every rank (Lightning keeps a
        # DistributedSampler it is given; it would inject a shuffling one otherwise).
        order = DistributedSampler(slides, num_replicas=1, rank=0, shuffle=True, seed=7)
        loader = DataLoader(slides, batch_size=None, sampler=order)
        val_loader = DataLoader(val, batch_size=None) if val is not None else None
        if not scenario.evaluate_only:
            trainer.fit(module, loader, val_loader, ckpt_path=ckpt_path)
        else:
            trainer.validate(module, val_loader, verbose=False)
        result = record.result(module)
        if val_loader is not None:
            result["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
            result["predictions"] = trainer.predict(module, val_loader)
    torch.save(result, out_dir / f"{scenario.name}.rank{rank}.pt")


def _without_tile(
    slide: dict[str, Any], drop_rank: int, world: int, rank: int | None
) -> dict[str, Any]:
    """``slide`` as rank ``rank``'s loader yields it when ``drop_rank`` drops the last tile of its
    shard; ``rank=None``: the whole slide without that tile (the single-process reference)."""
    k = len(slide["tiles"])
    start, stop = shard_bounds(k, drop_rank, world)
    keep = [i for i in range(k) if not (stop > start and i == stop - 1)]
    if rank is not None:
        own_start, own_stop = shard_bounds(k, rank, world)
        keep = [i for i in keep if own_start <= i < own_stop]
    index = torch.tensor(keep, dtype=torch.long)
    tiles, coords = slide["tiles"][index], slide["coords"][index]
    total = k if rank is not None else len(keep)
    return {**slide, "tiles": tiles, "coords": coords, "num_tiles": total}


def _worker(rank: int, world_size: int, port: int, scenarios: list[Scenario], out: str) -> None:
    join_world(rank, world_size, port)
    quiet_rank()
    for scenario in scenarios:
        train(scenario, world_size, Path(out), rank)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_world(rank: int, world_size: int, port: int) -> None:
    """Make this process rank ``rank`` of a local world of ``world_size`` on ``port``: the
    environment torchrun gives a rank, which Lightning's launcher takes as already started."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
        NODE_RANK="0", LOCAL_RANK=str(rank), GLOBAL_RANK=str(rank),
    )  # fmt: skip


def quiet_rank() -> None:
    """One thread (as the reference, ``one_thread``) and no warnings, in a forked rank."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread here, as in every rank: some CPU kernels (float16 channels-last
    convolutions) split their reductions by thread count, which would differ in the last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fork_ranks(worker: Callable[..., None], nprocs: int, *args: Any) -> None:
    """Run ``worker(rank, *args)`` in ``nprocs`` processes forked from this one, and wait.

    Forked, not spawned: the code is imported already (a spawned rank spent about 5 s importing
    torch, Lightning and timm, most of a small world's time here). The OpenMP pool is released
    first, so a child can start its own (lightning_wsi.strategies.lifecycle).
    """
    release_openmp_threads()
    mp.start_processes(worker, args=args, nprocs=nprocs, join=True, start_method="fork")


def run_world(world_size: int | None, scenarios: list[Scenario], out_dir: Path) -> None:
    """Train every scenario on ``world_size`` processes; results in ``out_dir``.

    ``None`` trains the plain single-process reference in this process.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if world_size is None:
        with one_thread():
            for scenario in scenarios:
                train(scenario, None, out_dir)
        return
    fork_ranks(_worker, world_size, world_size, free_port(), scenarios, str(out_dir))


def load(out_dir: Path, name: str, rank: int = 0) -> dict[str, Any]:
    return torch.load(out_dir / f"{name}.rank{rank}.pt", weights_only=False)


def normalised_l1(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], part: str) -> float:
    """``sum |a - b| / sum |a|`` over the parameters of one part ("encoder" or "aggregator")."""
    names = [n for n in a if n.startswith(part + ".")]
    diff = sum(float((a[n] - b[n]).abs().sum()) for n in names)
    return diff / sum(float(a[n].abs().sum()) for n in names)


def updates(result: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {n: result["final"][n] - result["initial"][n] for n in result["final"]}
