"""SlideModule: composition, training, freezing, evaluation in chunks, checkpoints, real slides."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import pytest
import torch
from slide_batches import make_slides, make_trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_wsi import SlideDataModule, SlideModule
from lightning_wsi.data import make_synthetic_dataset
from lightning_wsi.models import AggregatorOutput, FrozenBatchNorm

VIT = {"img_size": 32}
SMALL_AGG = {
    "gma": {"hidden_dim": 32, "attention_dim": 16},
    "transformer": {"hidden_dim": 32, "num_heads": 4, "num_layers": 1},
    "mean": {"hidden_dim": 32},
}


def _module(encoder: str = "test_resnet", aggregator: str = "gma", task: str = "binary", **kw):
    kw.setdefault("encoder_kwargs", VIT if encoder == "test_vit" else None)
    kw.setdefault("aggregator_kwargs", SMALL_AGG.get(aggregator))
    return SlideModule(encoder, aggregator, task, **kw)


def _loader(slides: list[dict]) -> DataLoader:
    return DataLoader(slides, batch_size=None, shuffle=False)


def _mean_loss(module: SlideModule, slides: list[dict]) -> float:
    module.eval()
    with torch.no_grad():
        losses = [module.slide_loss(module(s["tiles"], s["coords"]), s) for s in slides]
    module.train()
    return float(torch.stack(losses).mean())


def test_training_step_is_encode_then_aggregate_then_loss() -> None:
    module = _module()
    slide = make_slides(1, k=7)[0]
    features = module.encode(slide["tiles"])
    assert features.shape == (7, module.feature_dim)
    out = module.aggregate(features, slide["coords"])
    assert out.logits.shape == (1,) and out.attention.shape == (7,)
    expected = module.task.loss(out.logits, slide["target"])
    torch.testing.assert_close(module.training_step(slide, 0), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("encoder", "aggregator", "task"),
    [
        ("test_resnet", "gma", "binary"),
        ("test_vit", "transformer", "binary"),
        ("test_resnet", "mean", "multiclass"),
        ("test_resnet", "gma", "regression"),
    ],
)
def test_loss_falls_in_a_few_epochs(encoder: str, aggregator: str, task: str) -> None:
    slides = make_slides(6, k=8, task=task, seed=int(torch.randint(0, 10_000, ())))
    module = _module(
        encoder,
        aggregator,
        task,
        num_classes=3 if task == "multiclass" else None,
        encoder_lr=2e-3,
        aggregator_lr=2e-3,
        lr_schedule="constant",
    )
    before = _mean_loss(module, slides)
    make_trainer(max_epochs=10).fit(module, _loader(slides))
    after = _mean_loss(module, slides)
    assert after < 0.5 * before, (before, after)


def test_frozen_encoder_stays_bit_identical_and_the_aggregator_learns() -> None:
    module = _module(freeze_encoder=True, lr_schedule="constant", aggregator_lr=1e-2)
    encoder0 = copy.deepcopy(module.encoder.state_dict())
    aggregator0 = copy.deepcopy(module.aggregator.state_dict())
    assert not any(p.requires_grad for p in module.encoder.parameters())
    slides = make_slides(4, k=6, seed=int(torch.randint(0, 10_000, ())))
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, _loader(slides), _loader(slides[:2]))
    for name, value in module.encoder.state_dict().items():
        assert torch.equal(value, encoder0[name]), name
    moved = [
        n for n, v in module.aggregator.state_dict().items() if not torch.equal(v, aggregator0[n])
    ]
    assert len(moved) == len(aggregator0)
    assert not module.encoder.training  # still eval after validation restored modes
    assert [g["name"] for g in trainer.optimizers[0].param_groups] == [
        "aggregator",
        "aggregator_no_decay",
    ]


@pytest.mark.parametrize("freeze_batchnorm", [True, False])
def test_frozen_batchnorm_statistics_never_move(freeze_batchnorm: bool) -> None:
    module = _module(freeze_batchnorm=freeze_batchnorm, lr_schedule="constant", encoder_lr=1e-2)
    norms = {n: m for n, m in module.encoder.named_modules() if hasattr(m, "running_mean")}
    assert norms
    assert all(isinstance(m, FrozenBatchNorm) for m in norms.values()) is freeze_batchnorm
    stats0 = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in norms.items()}
    weights0 = {n: m.weight.detach().clone() for n, m in norms.items()}
    slides = make_slides(3, k=6, seed=int(torch.randint(0, 10_000, ())))
    make_trainer(max_epochs=2).fit(module, _loader(slides), _loader(slides[:1]))
    stats_equal = [
        torch.equal(m.running_mean, stats0[n][0]) and torch.equal(m.running_var, stats0[n][1])
        for n, m in norms.items()
    ]
    # The control (freeze_batchnorm=False) shows the check can fail: plain BatchNorm moves.
    assert all(stats_equal) is freeze_batchnorm
    # Affine parameters are still trained either way.
    assert all(not torch.equal(m.weight, weights0[n]) for n, m in norms.items())


def test_evaluation_encodes_in_chunks_like_one_pass() -> None:
    module = _module("test_vit", "transformer", eval_chunk_size=5).eval()
    slide = make_slides(1, k=23)[0]
    with torch.no_grad():
        whole = module.encode(slide["tiles"])
    chunked = module.encode_in_chunks(slide["tiles"])
    assert not chunked.requires_grad
    torch.testing.assert_close(chunked, whole)
    out = module.predict_step(slide, 0)
    reference = module.aggregate(whole, slide["coords"])
    torch.testing.assert_close(out["logits"], reference.logits.detach())


@pytest.mark.parametrize(
    ("task", "names"),
    [
        ("binary", {"val/loss", "val/auroc", "val/balanced_accuracy"}),
        ("multiclass", {"val/loss", "val/auroc", "val/balanced_accuracy"}),
        ("regression", {"val/loss", "val/pearson", "val/mse", "val/mae"}),
    ],
)
def test_validation_logs_the_tasks_metrics_per_epoch(task: str, names: set[str]) -> None:
    module = _module(task=task, num_classes=3 if task == "multiclass" else None)
    slides = make_slides(6, k=5, task=task)
    metrics = make_trainer().validate(module, _loader(slides), verbose=False)[0]
    assert set(metrics) == names
    with torch.no_grad():
        losses = [module.slide_loss(module(s["tiles"], s["coords"]), s) for s in slides]
    assert metrics["val/loss"] == pytest.approx(float(torch.stack(losses).mean()), rel=1e-5)


def test_predict_returns_probabilities_and_attention_with_coordinates() -> None:
    module = _module(task="multiclass", num_classes=3)
    slides = make_slides(2, k=9, task="multiclass")
    predictions = make_trainer().predict(module, _loader(slides))
    for slide, pred in zip(slides, predictions, strict=True):
        assert pred["slide_id"] == slide["slide_id"]
        assert pred["probabilities"].shape == (3,)
        torch.testing.assert_close(pred["probabilities"].sum(), torch.tensor(1.0))
        assert pred["attention"].shape == (9,)
        assert torch.equal(pred["coords"], slide["coords"])
        assert int(pred["target"]) == int(slide["target"])


def test_checkpoint_reloads_into_an_identical_module(tmp_path: Path) -> None:
    module = _module("test_vit", "transformer", encoder_lr=3e-4, eval_chunk_size=7)
    slides = make_slides(3, k=6)
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(module, _loader(slides))
    path = tmp_path / "slide.ckpt"
    trainer.save_checkpoint(path)
    reloaded = SlideModule.load_from_checkpoint(path)
    assert dict(reloaded.hparams) == dict(module.hparams)
    own, other = module.state_dict(), reloaded.state_dict()
    assert own.keys() == other.keys()
    assert {k.split(".")[0] for k in own} == {"encoder", "aggregator"}
    assert all(torch.equal(own[k], other[k]) for k in own)
    module.eval(), reloaded.eval()
    slide = slides[0]
    torch.testing.assert_close(
        reloaded(slide["tiles"], slide["coords"]).logits,
        module(slide["tiles"], slide["coords"]).logits,
        rtol=0,
        atol=0,
    )


def test_local_encoder_weights_are_loaded_and_not_needed_again(tmp_path: Path) -> None:
    donor = _module()
    weights = tmp_path / "encoder.pt"
    torch.save(donor.encoder.state_dict(), weights)
    module = _module(checkpoint_path=weights)
    for k, v in donor.encoder.state_dict().items():
        assert torch.equal(module.encoder.state_dict()[k], v), k
    trainer = make_trainer(max_steps=1)
    trainer.fit(module, _loader(make_slides(1, k=4)))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    weights.unlink()
    reloaded = SlideModule.load_from_checkpoint(tmp_path / "m.ckpt")
    assert reloaded.hparams.checkpoint_path is None


def test_user_modules_as_encoder_and_aggregator() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    class MaxPool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 1)

        def forward(self, features: torch.Tensor, coords: torch.Tensor | None) -> torch.Tensor:
            return self.head(features.max(dim=0).values)

    module = SlideModule(Encoder(), MaxPool(), "binary")
    assert module.feature_dim == 8
    slide = make_slides(1, k=4)[0]
    out = module(slide["tiles"], slide["coords"])
    assert isinstance(out, AggregatorOutput) and out.attention is None
    module.training_step(slide, 0).backward()
    assert module.encoder.net[0].weight.grad is not None


class _LinearOnMean(nn.Linear):
    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(features.mean(dim=0))


def test_wrong_inputs_name_the_fix() -> None:
    module = _module()
    with pytest.raises(ValueError, match="batch_size=None"):
        module.encode(torch.randn(2, 4, 3, 32, 32))
    with pytest.raises(ValueError, match=r"normalise.*or module.set_tile_normalisation"):
        module.encode(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mean and std need 3 values each"):
        module.set_tile_normalisation((0.5, 0.5), (0.2, 0.2, 0.2))
    module.eval()
    module.set_tile_normalisation((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    tiles = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    floats = (tiles / 255 - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]
    ).view(3, 1, 1)
    with torch.no_grad():  # uint8 tiles are normalised in the chunk that encodes them
        assert torch.allclose(module.encode(tiles), module.encode(floats), atol=1e-5)
        assert torch.allclose(module.encode_in_chunks(tiles, 2), module.encode(floats), atol=1e-5)
    with pytest.raises(ValueError, match="logits of shape"):
        three_logits = SlideModule("test_resnet", _LinearOnMean(96, 3), "binary")
        three_logits.aggregate(torch.randn(4, 96))
    with pytest.raises(ValueError, match="lr_schedule"):
        _module(lr_schedule="linear")
    with pytest.raises(ValueError, match="multiclass"):
        _module(task="multiclass")
    part = {"tiles": tiles, "slide_id": "s1", "part": 0, "parts": 3, "target": torch.tensor(1)}
    with pytest.raises(ValueError, match=r"'s1' came as training part 0 of 3.*train_part_size"):
        module.training_step(part, 0)  # parts need a strategy that joins them


def test_warmup_then_cosine_over_the_trainers_steps() -> None:
    module = _module(warmup_steps=2, encoder_lr=1e-3, aggregator_lr=1e-2)
    slides = make_slides(4, k=4)
    rates = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            rates.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    make_trainer(max_epochs=2, callbacks=[Record()]).fit(module, _loader(slides))
    assert len(rates) == 8
    encoder_rates = [r[0] for r in rates]
    assert encoder_rates[0] == pytest.approx(1e-3 / 3) and encoder_rates[2] == pytest.approx(1e-3)
    assert encoder_rates[2:] == sorted(encoder_rates[2:], reverse=True)
    assert all(r[-1] / r[0] == pytest.approx(10) for r in rates)


@pytest.fixture(scope="module")
def synthetic_manifest(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_slides=6, progress=False)


def test_resnet18_gma_binary_fits_on_synthetic_slides(synthetic_manifest: Path) -> None:
    """The README's promise: ``Trainer(...).fit(SlideModule("resnet18", "gma", "binary"), dm)``."""
    dm = SlideDataModule(
        synthetic_manifest, k=4, mpp=2.0, tile_size=56, eval_k=8, val_fraction=0.5,
        encoder="resnet18", progress=False,
    )  # fmt: skip
    module = SlideModule("resnet18", "gma", "binary")
    before = copy.deepcopy(module.encoder.state_dict())
    trainer = make_trainer(max_epochs=1)
    trainer.fit(module, dm)
    assert trainer.global_step == len(dm.splits["train"])
    metrics = trainer.callback_metrics
    assert {"train/loss_epoch", "val/loss", "val/auroc", "val/balanced_accuracy"} <= set(metrics)
    # The slide label reached the encoder's first convolution.
    assert not torch.equal(module.encoder.conv1.weight, before["conv1.weight"])
    predictions = trainer.predict(module, datamodule=dm)
    everything = [e.slide_id for split in dm.splits.values() for e in split]
    assert sorted(p["slide_id"] for p in predictions) == sorted(everything)
    assert all(p["attention"].shape == (8,) for p in predictions)
