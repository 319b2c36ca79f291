"""The strategy as users meet it: names, Hydra, clear errors, resume, bf16-mixed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import hydra.utils
import lightning as L
import pytest
import torch
from harness import Scenario, in_memory_slides, load, normalised_l1, run_world
from lightning.pytorch.strategies import StrategyRegistry
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_wsi import SlideParallelStrategy
from lightning_wsi.data import make_synthetic_dataset


class TinyMIL(L.LightningModule):
    """A user's own module: the protocol only, no ``encoder`` attribute, plain SGD."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.score = nn.Linear(8, 1, bias=False)
        self.head = nn.Linear(8, 1)

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.conv(tiles).flatten(1)

    def aggregate(self, features: torch.Tensor, coords: torch.Tensor | None) -> torch.Tensor:
        weights = torch.softmax(self.score(features).squeeze(1), dim=0)
        return self.head(weights @ features)

    def slide_loss(self, output: torch.Tensor, batch: dict) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(output[0], batch["target"].float())

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.slide_loss(self.aggregate(self.encode(batch["tiles"]), None), batch)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


def test_a_users_own_module_trains_like_one_process() -> None:
    slides = in_memory_slides(Scenario("tiny", k=9))
    order = DistributedSampler(slides, num_replicas=1, rank=0, shuffle=False)
    results = []
    for strategy in ("auto", SlideParallelStrategy(start_method="spawn", bucket_cap_mb=1e-4)):
        module = TinyMIL()
        L.Trainer(
            accelerator="cpu", devices=1 if strategy == "auto" else 3, strategy=strategy,
            max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(module, DataLoader(slides, batch_size=None, sampler=order))  # fmt: skip
        results.append({n: p.detach().clone() for n, p in module.named_parameters()})
    reference, ours = results
    assert not torch.equal(reference["conv.0.weight"], TinyMIL().conv[0].weight)
    for name, value in reference.items():
        diff = float((value - ours[name]).abs().sum() / value.abs().sum())
        assert diff <= 1e-5, name


def test_registered_names_and_start_methods() -> None:
    expected = {
        "slide_parallel": "popen",
        "slide_parallel_spawn": "spawn",
        "slide_parallel_fork": "fork",
        "slide_parallel_notebook": "fork",
    }
    for name, start_method in expected.items():
        strategy = StrategyRegistry.get(name)
        assert isinstance(strategy, SlideParallelStrategy)
        assert strategy._start_method == start_method
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="slide_parallel", logger=False)
    assert isinstance(trainer.strategy, SlideParallelStrategy)
    assert trainer.strategy.slide_parallel  # what SlideDataModule looks for
    assert trainer.strategy.distributed_sampler_kwargs == {"num_replicas": 1, "rank": 0}


def test_hydra_target_with_options() -> None:
    strategy = hydra.utils.instantiate(
        {"_target_": "lightning_wsi.SlideParallelStrategy", "encode_chunk_size": 16,
         "process_group_backend": "gloo", "start_method": "spawn"}
    )  # fmt: skip
    assert strategy.encode_chunk_size == 16
    assert strategy.process_group_backend == "gloo"
    with pytest.raises(ValueError, match="encode_chunk_size"):
        SlideParallelStrategy(encode_chunk_size=0)


class _NoProtocol(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        return self.net(batch["tiles"].mean((0, 2, 3))).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _ManualOptimisation(_NoProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def encode(self, tiles):
        return tiles.mean((2, 3))

    def aggregate(self, features, coords):
        return self.net(features.mean(0))

    def slide_loss(self, output, batch):
        return output.sum()


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (_NoProtocol(), r"_NoProtocol lacks `encode`, `aggregate`, `slide_loss`"),
        (_ManualOptimisation(), r"automatic optimisation only"),
    ],
)
def test_a_module_without_the_protocol_is_told_what_is_missing(module, message) -> None:
    loader = DataLoader([{"tiles": torch.rand(4, 3, 8, 8), "slide_id": "a"}], batch_size=None)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, strategy="slide_parallel", logger=False, max_steps=1,
        enable_checkpointing=False, enable_progress_bar=False,
    )  # fmt: skip
    with pytest.raises(TypeError, match=message):
        trainer.fit(module, loader)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Resume and bf16 runs on 2 ranks (one set of processes for all), plus references."""
    root = tmp_path_factory.mktemp("runs")
    manifest = str(make_synthetic_dataset(root / "slides", n_slides=4, progress=False))
    # Resume: loader workers (Lightning #21938) and a warm-up + cosine schedule sized from
    # estimated_stepping_batches, both of which a resumed run must pick up at the right step.
    base = Scenario(
        "resume-full", k=32, manifest=manifest, num_workers=1, epochs=4, lr_schedule="cosine"
    )
    ckpt = str(root / "checkpoints")
    first = dataclasses.replace(base, name="resume-first", stop_after_epochs=2, checkpoint_dir=ckpt)
    rest = dataclasses.replace(base, name="resume-rest", checkpoint_dir=ckpt, resume=True)
    # bf16-mixed, chunked and not: with a chunk the size of a rank's shard the re-encode repeats
    # the forward exactly if, and only if, it runs under the same autocast.
    bf16 = Scenario("bf16", k=8, trainer={"precision": "bf16-mixed"})
    bf16_chunked = dataclasses.replace(bf16, name="bf16-chunked", chunk=4)
    run_world(2, [base, first, rest, bf16, bf16_chunked], root / "2")
    run_world(None, [bf16, dataclasses.replace(bf16, name="fp32", trainer={})], root / "ref")
    return root


def test_resumed_run_ends_where_the_uninterrupted_run_ends(runs: Path) -> None:
    full, rest = load(runs / "2", "resume-full"), load(runs / "2", "resume-rest")
    first = load(runs / "2", "resume-first")
    assert first["losses"] + rest["losses"] == pytest.approx(full["losses"], abs=1e-6)
    for part in ("encoder", "aggregator"):
        assert normalised_l1(full["final"], rest["final"], part) <= 1e-6, part
        assert normalised_l1(full["initial"], full["final"], part) > 1e-4, part


def test_bf16_mixed_chunked_replays_the_autocast_forward(runs: Path) -> None:
    plain, chunked = load(runs / "2", "bf16"), load(runs / "2", "bf16-chunked")
    assert chunked["losses"] == plain["losses"]
    for name, value in plain["final"].items():
        assert torch.equal(value, chunked["final"][name]), name


def test_bf16_mixed_on_two_ranks_tracks_one_process(runs: Path) -> None:
    """bf16 rounds each rank's activations as one process would, but conv batch sizes differ;
    the runs must stay far closer to each other than bf16 is to float32."""
    ours, single = load(runs / "2", "bf16"), load(runs / "ref", "bf16")
    fp32 = load(runs / "ref", "fp32")
    for part in ("encoder", "aggregator"):
        gap = normalised_l1(single["final"], ours["final"], part)
        assert gap <= 1e-3, part
        assert gap < normalised_l1(fp32["final"], single["final"], part), part
