"""LoRA on the encoder: what trains, checkpoints, merged export, dropout per rank, the config."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from slide_batches import make_slides, make_trainer
from torch.utils.data import DataLoader

from lightning_wsi import SlideModule
from lightning_wsi.models import (
    apply_lora,
    build_encoder,
    export_merged_encoder,
    load_adapters,
    merge_lora,
    save_adapters,
)
from lightning_wsi.strategies.chunked import RngState
from lightning_wsi.strategies.randomness import rank_stream, stream_seed

VIT = {"img_size": 32}
AGG = {"hidden_dim": 32, "attention_dim": 16}
LORA = {"rank": 4, "alpha": 8}
ADAPTER = re.compile(r"\.lora_[AB]\.default\.weight$")
TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _module(**kw) -> SlideModule:
    kw.setdefault("lora", LORA)
    return SlideModule("test_vit", "gma", "binary", encoder_kwargs=VIT, aggregator_kwargs=AGG, **kw)


def _trainable(module: torch.nn.Module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def _randomise_adapters(encoder: torch.nn.Module) -> None:
    """Non-zero ``B`` (zero at init), so that the adapters change the features."""
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if ADAPTER.search(name):
                param.normal_(0.0, 0.05)


def test_only_adapters_and_the_aggregator_train() -> None:
    module = _module()
    expected = {
        f"blocks.{b}.{t}.lora_{ab}.default.weight" for b in range(6) for t in TARGETS for ab in "AB"
    }
    assert _trainable(module.encoder) == expected  # not patch_embed.proj, a convolution
    assert all(p.requires_grad for p in module.aggregator.parameters())
    qkv = module.encoder.blocks[0].attn.qkv
    assert qkv.lora_A["default"].weight.shape == (4, 64)
    assert qkv.lora_B["default"].weight.shape == (192, 4)
    assert qkv.scaling["default"] == 8 / 4


def test_norms_train_when_asked() -> None:
    encoder = _module(lora={**LORA, "train_norms": True}).encoder
    norms = {n for n in _trainable(encoder) if not ADAPTER.search(n)}
    per_block = {
        f"blocks.{b}.norm{i}.{w}" for b in range(6) for i in (1, 2) for w in ("weight", "bias")
    }
    assert norms == per_block | {"norm.weight", "norm.bias"}


def test_targets_come_from_the_config() -> None:
    encoder = _module(lora={**LORA, "targets": ["qkv"]}).encoder
    assert {n.split(".lora_")[0] for n in _trainable(encoder)} == {
        f"blocks.{b}.attn.qkv" for b in range(6)
    }


def test_forward_at_init_equals_the_base_model() -> None:
    base = timm.create_model("test_vit", num_classes=0, img_size=32).eval()
    tiles = torch.randn(3, 3, 32, 32)
    expected = base(tiles)
    adapted = apply_lora(copy.deepcopy(base), rank=4, alpha=8).eval()
    assert torch.equal(adapted(tiles), expected)  # B is zero: the adapters add exact zeros


def test_training_moves_only_the_adapters_and_the_checkpoint_loads_back(tmp_path: Path) -> None:
    module = _module(encoder_lr=1e-2, lr_schedule="constant")
    base_before = {k: v.clone() for k, v in module.encoder.state_dict().items() if "lora_" not in k}
    adapters_before = {
        n: p.clone() for n, p in module.encoder.named_parameters() if p.requires_grad
    }
    slides = make_slides(3, k=4)
    trainer = make_trainer(max_epochs=1, default_root_dir=tmp_path)
    trainer.fit(module, DataLoader(slides, batch_size=None))
    state = module.encoder.state_dict()
    for key, value in base_before.items():
        assert torch.equal(state[key], value), key
    for name, value in adapters_before.items():
        assert not torch.equal(state[name], value), name  # every adapter learned, A and B
    path = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(path)
    reloaded = SlideModule.load_from_checkpoint(path, weights_only=True)
    assert reloaded.hparams.lora == LORA
    # The Lightning checkpoint itself is not an encoder weights file: the error says what is.
    with pytest.raises(ValueError, match=r"It is a LoRA checkpoint: export its merged encoder"):
        build_encoder("test_vit", encoder_kwargs=VIT, checkpoint_path=path)
    own, other = module.state_dict(), reloaded.state_dict()
    assert own.keys() == other.keys()
    assert "encoder.blocks.0.attn.qkv.base_layer.weight" in own
    assert all(torch.equal(own[k], other[k]) for k in own)
    assert _trainable(reloaded) == _trainable(module)
    module.eval(), reloaded.eval()
    slide = slides[0]
    assert torch.equal(
        reloaded(slide["tiles"], slide["coords"]).logits,
        module(slide["tiles"], slide["coords"]).logits,
    )


def test_merged_export_loads_into_a_plain_timm_model_with_the_same_features(
    tmp_path: Path,
) -> None:
    module = _module(lora={**LORA, "train_norms": True})
    _randomise_adapters(module.encoder)
    path = export_merged_encoder(module, tmp_path / "out" / "merged.safetensors")
    keys = set(safetensors.torch.load_file(path))
    assert keys == set(timm.create_model("test_vit", num_classes=0, img_size=32).state_dict())
    plain = build_encoder("test_vit", encoder_kwargs=VIT, checkpoint_path=path).eval()
    tiles = torch.randn(4, 3, 32, 32)
    module.eval()
    with torch.no_grad():
        adapted = module.encoder(tiles)
        base = merge_lora(module.encoder)  # the LoRA module keeps its adapters
        assert any("lora_" in n for n, _ in module.encoder.named_parameters())
        assert not any("lora_" in n for n, _ in base.named_parameters())
        torch.testing.assert_close(plain(tiles), adapted)  # float32 tolerances
        # Not the same by accident: without the adapters the features differ.
        assert not torch.allclose(_module().encoder.eval()(tiles), adapted, atol=1e-3)
    with pytest.raises(ValueError, match=r"Expected a \.safetensors path .*merged\.pt"):
        export_merged_encoder(module, tmp_path / "merged.pt")


def test_adapter_weights_alone_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(1)
    trained = _module(lora={**LORA, "train_norms": True})
    _randomise_adapters(trained.encoder)
    with torch.no_grad():
        trained.encoder.norm.weight.add_(0.5)
    path = save_adapters(trained, tmp_path / "adapters.safetensors")
    assert set(safetensors.torch.load_file(path)) == _trainable(trained.encoder)
    torch.manual_seed(1)  # the same base weights, fresh adapters
    fresh = _module(lora={**LORA, "train_norms": True})
    load_adapters(fresh, path)
    own, other = trained.encoder.state_dict(), fresh.encoder.state_dict()
    assert all(torch.equal(own[k], other[k]) for k in own)
    other_rank = _module(lora={"rank": 2, "alpha": 8, "train_norms": True})
    with pytest.raises(ValueError, match=r"adapters\.safetensors do not fit VisionTransformer: 0 "
                       r"missing \[\], 0 unexpected \[\], 48 of another shape .* build the "
                       r"encoder with the `lora` settings they were trained with\.$"):  # fmt: skip
        load_adapters(other_rank, path)


def test_adapters_get_the_same_gradients_under_grad_checkpointing() -> None:
    """The blocks' input needs no grad (patch_embed is frozen): a re-entrant checkpoint would
    drop the adapters' gradients; timm's (non-re-entrant) keeps them."""
    tiles, grads = torch.randn(3, 3, 32, 32), []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = _module(grad_checkpointing=checkpointing).encoder
        _randomise_adapters(encoder)
        encoder(tiles).square().sum().backward()
        grads.append({n: p.grad for n, p in encoder.named_parameters() if p.requires_grad})
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


def test_layer_decay_applies_to_the_adapters_by_block() -> None:
    module = _module(encoder_lr=1e-3, layer_decay=0.5, lr_schedule="constant")
    optimizer = module.configure_optimizers()
    names = {id(p): n for n, p in module.encoder.named_parameters()}
    lr = {
        names[id(p)]: g["lr"] for g in optimizer.param_groups for p in g["params"] if id(p) in names
    }
    assert set(lr) == _trainable(module.encoder)  # no frozen base weight in the optimiser
    for b in range(6):
        assert lr[f"blocks.{b}.mlp.fc2.lora_B.default.weight"] == 1e-3 * 0.5 ** (5 - b)


def test_lora_dropout_draws_from_each_ranks_stream() -> None:
    """The slide-parallel strategy encodes each rank's shard inside ``rank_stream``: LoRA dropout
    must draw from it (a different mask per rank, the same on a replay), as chunking replays it."""
    encoder = apply_lora(timm.create_model("test_vit", num_classes=0, img_size=32), dropout=0.5)
    _randomise_adapters(encoder)
    encoder.train()
    tiles = torch.randn(2, 3, 32, 32)

    def encode(rank: int) -> torch.Tensor:
        with torch.no_grad(), rank_stream(stream_seed(0, rank, 0, 0), torch.device("cpu")):
            return encoder(tiles)

    assert torch.equal(encode(0), encode(0))
    assert not torch.allclose(encode(0), encode(1), atol=1e-4)
    with rank_stream(stream_seed(0, 1, 0, 0), torch.device("cpu")), torch.no_grad():
        state = RngState.capture(torch.device("cpu"))  # what the chunked re-encode replays
        first = encoder(tiles)
        state.restore()
        assert torch.equal(encoder(tiles), first)
    for block in encoder.blocks:  # LoRA's dropout is the only random layer here
        for layer in TARGETS:
            block.get_submodule(layer).lora_dropout["default"].p = 0.0
    assert torch.equal(encode(0), encode(1))


def test_bad_targets_and_options_name_the_key_and_the_fix() -> None:
    linear = r"\['blocks\.\*\.attn\.proj', 'blocks\.\*\.attn\.qkv', 'blocks\.\*\.mlp\.fc1', "
    linear += r"'blocks\.\*\.mlp\.fc2'\]"
    message = r"lora\.targets entry 'q_proj' matches no Linear module of VisionTransformer; "
    with pytest.raises(ValueError, match=message + r"its Linear modules: " + linear):
        _module(lora={**LORA, "targets": ["qkv", "q_proj"]})
    with pytest.raises(ValueError, match=r"no Linear module to adapt"):
        SlideModule("test_resnet", "gma", "binary", lora=LORA)
    with pytest.raises(ValueError, match=r"Unknown key\(s\) lora\.r: expected some of \['rank'"):
        _module(lora={"r": 4})
    with pytest.raises(ValueError, match=r"lora\.rank to be a positive integer, got 0"):
        _module(lora={"rank": 0})
    with pytest.raises(ValueError, match=r"lora\.dropout in \[0, 1\), got 1\.5"):
        _module(lora={"dropout": 1.5})
    with pytest.raises(ValueError, match=r"lora\.targets to be a non-empty list .*got 'qkv'"):
        _module(lora={"targets": "qkv"})
    with pytest.raises(ValueError, match=r"got `lora` and freeze_encoder=True: .*lora=null"):
        _module(freeze_encoder=True)
    with pytest.raises(ValueError, match=r"got `lora` and train_last_n_blocks=2"):
        _module(train_last_n_blocks=2)
    with pytest.raises(ValueError, match=r"already has LoRA adapters"):
        apply_lora(_module().encoder)
    with pytest.raises(ValueError, match=r"has no LoRA adapters to save"):
        save_adapters(_module(lora=None), "adapters.safetensors")


@pytest.mark.parametrize(
    ("option", "check"),
    [
        ("full", lambda m: _trainable(m.encoder) == {n for n, _ in m.encoder.named_parameters()}),
        ("frozen", lambda m: not _trainable(m.encoder)),
        ("last_blocks", lambda m: "cls_token" not in _trainable(m.encoder)
         and "blocks.5.attn.qkv.weight" in _trainable(m.encoder)
         and "blocks.1.attn.qkv.weight" not in _trainable(m.encoder)),
        ("lora", lambda m: all(ADAPTER.search(n) for n in _trainable(m.encoder))
         and len(_trainable(m.encoder)) == 48),
        ("llrd", lambda m: m.hparams.layer_decay == 0.75),
    ],
)  # fmt: skip
def test_every_finetune_option_composes_and_builds(option: str, check) -> None:
    with initialize_config_module("lightning_wsi.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"finetune={option}", "encoder=test_vit", "tile_size=32"])
    module = instantiate(cfg.model, _convert_="all")
    assert check(module)
