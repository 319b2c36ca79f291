"""Slide groups: the harness's real multi-process runs with ``slide_group_size``.

``run_worlds({label: (world_size, scenarios)}, out_dir)`` forks gloo processes that train every
scenario with ``SlideParallelStrategy(slide_group_size=S)``, one world size after the other. The
training loader is a plain shuffling ``DataLoader``: Lightning replaces its sampler with a
``DistributedSampler`` built from the strategy's ``distributed_sampler_kwargs`` (G replicas,
this rank's group), as it would for a user's loader, so group g trains the slides g, g + G, ...
of the seeded permutation. The single-process reference (``run_reference``) reads the same
permutation with one replica, so its accumulation windows of G batches hold the very slides of
one group step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from harness import (
    Record,
    Scenario,
    build_module,
    fork_ranks,
    free_port,
    in_memory_slides,
    join_world,
    one_thread,
    quiet_rank,
)
from lightning.pytorch.plugins.precision import MixedPrecision
from slide_batches import make_slides
from torch.utils.data import DataLoader, DistributedSampler

from lightning_wsi import SlideDataModule, SlideParallelStrategy
from lightning_wsi.strategies import SlideParallelError

SEED = 0  # the injected DistributedSampler's seed (PL_GLOBAL_SEED, unset here)


@dataclass(frozen=True)
class GroupScenario(Scenario):
    """A harness scenario with slide groups and, optionally, a slide no loader can read."""

    slide_group_size: int | None = None
    dropped_slide: bool = False  # add a slide its loader reports unusable (a vanished file)
    no_target: bool = False  # the first slide has no target: its group's loss raises


def slides_of(scenario: GroupScenario) -> list[dict[str, Any]]:
    """The harness's slides, plus one whose loader reported it unusable if asked."""
    slides = in_memory_slides(scenario)
    if scenario.no_target:
        unlabeled = {k: v for k, v in slides[0].items() if k != "target"}
        slides[0] = {**unlabeled, "slide_id": "no-target"}
    if scenario.dropped_slide:
        (gone,) = make_slides(1, k=scenario.k, seed=scenario.seed + 4)
        slides.append({**gone, "slide_id": "vanished", "slide_problem": "the file vanished"})
    return slides


class SlideIds(L.Callback):
    """The slide of every training batch this rank loaded, in order."""

    def __init__(self) -> None:
        self.slide_ids: list[str] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:  # noqa: ANN001
        self.slide_ids.append(str(batch["slide_id"]))


def _trainer_options(
    scenario: GroupScenario, world_size: int | None, callbacks: list[L.Callback]
) -> dict[str, Any]:
    options = dict(scenario.trainer)
    if options.get("precision") == "16-mixed":  # float16 with its scaler on the CPU
        del options["precision"]
        options["plugins"] = [MixedPrecision("16-mixed", "cpu")]
    strategy: Any = "auto"
    if world_size is not None:
        strategy = SlideParallelStrategy(
            encode_chunk_size=scenario.chunk,
            bucket_cap_mb=scenario.bucket_cap_mb,
            slide_group_size=scenario.slide_group_size,
        )
    return {
        "accelerator": "cpu", "devices": world_size or 1, "strategy": strategy,
        "max_epochs": scenario.epochs, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
        "callbacks": callbacks, **options,
    }  # fmt: skip


def train(scenario: GroupScenario, world_size: int | None, out_dir: Path, rank: int = 0) -> None:
    """Train (and, with ``evaluate``, validate every epoch and predict) one scenario; every rank
    saves what it ends with to ``out_dir/<name>.rank<r>.pt`` (``harness.Record`` plus metrics
    and predictions)."""
    module = build_module(scenario)
    record, seen = Record(scenario), SlideIds()
    trainer = L.Trainer(**_trainer_options(scenario, world_size, [record, seen]))
    if scenario.manifest is not None:  # SlideDataModule: SlideSampler and sharded reads
        dm = SlideDataModule(
            scenario.manifest, k=scenario.k, mpp=scenario.mpp, tile_size=scenario.tile_size,
            val_fraction=0.0, seed=scenario.seed, progress=False, tiling_workers=0,
        )  # fmt: skip
        trainer.fit(module, dm)
        result = {**record.result(module), "slide_ids": seen.slide_ids}
        torch.save(result, out_dir / f"{scenario.name}.rank{rank}.pt")
        return
    slides = slides_of(scenario)
    if world_size is None:  # the same permutation, one replica
        order = DistributedSampler(slides, num_replicas=1, rank=0, shuffle=True, seed=SEED)
        loader = DataLoader(slides, batch_size=None, sampler=order)
    else:  # Lightning injects DistributedSampler(**strategy.distributed_sampler_kwargs)
        loader = DataLoader(slides, batch_size=None, shuffle=True)
    val = make_slides(4, k=5, seed=scenario.seed + 3) if scenario.evaluate else None
    val_loader = DataLoader(val, batch_size=None) if val is not None else None
    if scenario.no_target:  # every rank must raise, at the same step
        try:
            trainer.fit(module, loader, val_loader)
        except SlideParallelError as error:
            failure = {"error": str(error), "slide_ids": seen.slide_ids}
            torch.save(failure, out_dir / f"{scenario.name}.rank{rank}.pt")
        return
    trainer.fit(module, loader, val_loader)
    result = record.result(module)
    result["slide_ids"] = seen.slide_ids
    if val_loader is not None:
        result["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}
        result["predictions"] = trainer.predict(module, val_loader)
    torch.save(result, out_dir / f"{scenario.name}.rank{rank}.pt")


def _phases(rank: int, worlds: list[tuple[str, int, int, list]], out: str) -> None:
    """One forked process: for each world in turn, join it if this rank belongs to it."""
    quiet_rank()
    for label, world_size, port, scenarios in worlds:
        if rank >= world_size:
            continue
        join_world(rank, world_size, port)
        for scenario in scenarios:
            train(scenario, world_size, Path(out) / label, rank)


def run_worlds(worlds: dict[str, tuple[int, list[GroupScenario]]], out_dir: Path) -> None:
    """Train each world's scenarios (``{label: (world size, scenarios)}``), results in
    ``out_dir/<label>``, with one set of processes for all of them: as many as the largest
    world, forked from this one (nothing to import again), whose first ranks join each world
    in turn on a port of its own while the others move on. The same Trainers and strategy as
    separate launches; what one start of the processes costs is paid once."""
    plan = []
    for label, (world_size, scenarios) in worlds.items():
        (out_dir / label).mkdir(parents=True, exist_ok=True)
        plan.append((label, world_size, free_port(), scenarios))
    fork_ranks(_phases, max(world for _, world, _, _ in plan), plan, str(out_dir))


def run_reference(scenarios: list[GroupScenario], out_dir: Path) -> None:
    """The single-process reference, here, on one thread as every rank."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with one_thread():
        for scenario in scenarios:
            train(scenario, None, out_dir)
