"""Published pathology encoders as ``encoder=`` presets: arguments, weights files, pooling.

Full-size builds are too large for CI: UNI has 303M parameters, Virchow2 631M, UNI2-h 681M,
H-optimus-0/1 and Prov-GigaPath 1.1B (1.2-4.5 GB of float32 weights each). So every preset is
built shrunk (one block, 32 wide) on the CPU for the weights file, the strict load and the
forward pass, and at full size only on PyTorch's meta device (shapes, no memory) for the feature
width and the parameter count.

``PUBLISHED`` is written from the publishers' model cards and code (cited in each
``conf/encoder/<preset>.yaml``), apart from the configs, which must match it. Each weights file
is the state dict of a reference model built the publisher's way, ``timm.create_model(arch,
**their kwargs)`` (register tokens, SwiGLU and LayerScale keys included), in their file format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import timm
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf
from timm.layers import SwiGLUPacked
from torch import nn

from lightning_wsi.models.encoders import (
    PretrainedWeightsUnavailableError,
    build_encoder,
    encoder_feature_dim,
)
from lightning_wsi.models.foundation import LAYER_NAMES, PresetWeights, resolve_layer_names

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
KAIKO_URL = "https://github.com/kaiko-ai/towards_large_pathology_fms/releases/download/0.0.1/"
LIGHTNING_WSI_KEYS = ("preset", "feature_pool")


@dataclass(frozen=True)
class Published:
    """A publisher's recipe: timm architecture and kwargs, normalisation, width, weights file."""

    arch: str
    kwargs: dict[str, Any]
    norm: tuple[tuple[float, ...], tuple[float, ...]]
    width: int  # feature width at full size
    millions: float  # parameters at full size, in millions (rounded to 0.1)
    source: str  # where the weights file is distributed
    file: str = "pytorch_model.bin"
    patch: int = 14
    pool: str = "token"  # or "cls_mean_patch": concat(class token, mean of output[:, 5:])


PUBLISHED = {
    "uni": Published(
        "vit_large_patch16_224",
        dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
        IMAGENET, 1024, 303.4, "https://huggingface.co/MahmoodLab/UNI", patch=16,
    ),
    "uni2_h": Published(
        "vit_giant_patch14_224",
        dict(
            img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5,
            embed_dim=1536, mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True,
            mlp_layer=SwiGLUPacked, act_layer=nn.SiLU, reg_tokens=8, dynamic_img_size=True,
        ),
        IMAGENET, 1536, 681.4, "https://huggingface.co/MahmoodLab/UNI2-h",
    ),
    "virchow2": Published(
        "vit_huge_patch14_224",
        dict(
            img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
            global_pool="", dynamic_img_size=True, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
        ),
        IMAGENET, 2560, 631.2, "https://huggingface.co/paige-ai/Virchow2", pool="cls_mean_patch",
    ),
    "h_optimus_0": Published(
        "vit_giant_patch14_reg4_dinov2",
        dict(
            img_size=224, num_classes=0, global_pool="token", init_values=1e-5,
            dynamic_img_size=False,
        ),
        BIOPTIMUS, 1536, 1134.8, "https://huggingface.co/bioptimus/H-optimus-0",
    ),
    "h_optimus_1": Published(
        "vit_giant_patch14_reg4_dinov2",
        dict(
            img_size=224, num_classes=0, global_pool="token", init_values=1e-5,
            dynamic_img_size=False,
        ),
        BIOPTIMUS, 1536, 1134.8, "https://huggingface.co/bioptimus/H-optimus-1",
    ),
    "prov_gigapath": Published(
        "vit_giant_patch14_dinov2",
        dict(
            img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
            init_values=1e-5, mlp_ratio=5.33334, num_classes=0, global_pool="token",
        ),
        IMAGENET, 1536, 1135.0, "https://huggingface.co/prov-gigapath/prov-gigapath", patch=16,
    ),
    "kaiko_vitb16": Published(
        "vit_base_patch16_224",
        dict(num_classes=0, dynamic_img_size=True),
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), 768, 85.8, KAIKO_URL + "vitb16.pth",
        file="vitb16.pth", patch=16,
    ),
}  # fmt: skip
# The file format each test writes, so .bin, .pth and .safetensors all load.
SUFFIX = {"virchow2": ".safetensors", "h_optimus_1": ".safetensors", "kaiko_vitb16": ".pth"}


def _compose(preset: str, *overrides: str, data: str = "synthetic") -> DictConfig:
    with initialize_config_module("lightning_wsi.conf", version_base="1.3"):
        return compose("train", overrides=[f"encoder={preset}", f"data={data}", *overrides])


def _shrink(preset: str, depth: int = 1) -> dict[str, Any]:
    """Arguments that make the architecture tiny: one block, 32 wide, a 2 x 2 patch grid."""
    size = 2 * PUBLISHED[preset].patch
    return dict(depth=depth, embed_dim=32, num_heads=2, img_size=size)


def _overrides(kwargs: dict[str, Any]) -> list[str]:
    return [f"++encoder.kwargs.{k}={v}" for k, v in kwargs.items()]


def _build(cfg: DictConfig, **options: Any) -> nn.Module:
    """The encoder as SlideModule builds it from the composed ``model`` section."""
    m = cfg.model
    encoder = build_encoder(
        m.encoder, pretrained=m.pretrained, checkpoint_path=m.checkpoint_path,
        encoder_kwargs=m.encoder_kwargs, **options,
    )  # fmt: skip
    return encoder.eval()


def _reference(preset: str, **shrink: Any) -> nn.Module:
    """The publisher's model, built their way (shrunk), with its own random weights."""
    pub = PUBLISHED[preset]
    torch.manual_seed(1234)
    return timm.create_model(pub.arch, **{**pub.kwargs, **shrink}).eval()


def _publisher_embedding(preset: str, reference: nn.Module, tiles: torch.Tensor) -> torch.Tensor:
    """The embedding as the model card computes it from the reference model's output."""
    output = reference(tiles)
    if PUBLISHED[preset].pool == "cls_mean_patch":  # Virchow2 card: 1-4 are register tokens
        return torch.cat([output[:, 0], output[:, 5:].mean(1)], dim=-1)
    return output


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(state, path)
    else:
        torch.save(state, path)
    return path


def _assert_same_weights(encoder: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = encoder.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_config_holds_the_publishers_arguments_and_normalisation(preset: str) -> None:
    pub = PUBLISHED[preset]
    cfg = _compose(preset)
    kwargs = OmegaConf.to_container(cfg.encoder.kwargs, resolve=True)
    timm_kwargs = {k: v for k, v in kwargs.items() if k not in LIGHTNING_WSI_KEYS}
    assert cfg.encoder.name == pub.arch
    assert resolve_layer_names(timm_kwargs) == pub.kwargs
    assert kwargs.get("feature_pool", "token") == pub.pool
    assert (cfg.encoder.native_tile_size, cfg.encoder.native_mpp) == (224, 0.5)
    weights = PresetWeights.from_config(kwargs["preset"])
    assert (weights.name, weights.source, weights.file) == (preset, pub.source, pub.file)
    assert weights.gated == (preset != "kaiko_vitb16")
    for data in ("synthetic", "csv"):
        datamodule = _compose(preset, data=data).data.datamodule
        mean, std = OmegaConf.to_container(datamodule.mean), OmegaConf.to_container(datamodule.std)
        assert (tuple(mean), tuple(std)) == pub.norm


def test_plain_encoders_keep_norm_from() -> None:
    datamodule = _compose("resnet10t").data.datamodule
    assert (datamodule.mean, datamodule.std, datamodule.encoder) == (None, None, "resnet10t")


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_full_size_width_and_parameters_on_the_meta_device(preset: str) -> None:
    cfg = _compose(preset, "encoder.pretrained=false")
    with torch.device("meta"):  # shapes only: a full-size build would not fit CI
        encoder = _build(cfg)
    width = encoder_feature_dim(encoder)
    assert width == PUBLISHED[preset].width
    if PUBLISHED[preset].pool == "cls_mean_patch":
        assert width == 2 * encoder.embed_dim == 2 * 1280
    params = sum(p.numel() for p in encoder.parameters())
    assert round(params / 1e6, 1) == PUBLISHED[preset].millions


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_shrunk_preset_loads_the_publishers_file_strictly(preset: str, tmp_path: Path) -> None:
    shrink = _shrink(preset)
    reference = _reference(preset, **shrink)
    path = _save(reference.state_dict(), tmp_path / f"{preset}{SUFFIX.get(preset, '.bin')}")
    cfg = _compose(preset, f"encoder.checkpoint_path={path}", *_overrides(shrink))
    encoder = _build(cfg)
    _assert_same_weights(encoder, reference.state_dict())
    tiles = torch.randn(3, 3, shrink["img_size"], shrink["img_size"])
    with torch.no_grad():
        features, expected = encoder(tiles), _publisher_embedding(preset, reference, tiles)
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    width = 2 * 32 if PUBLISHED[preset].pool == "cls_mean_patch" else 32
    assert features.shape == (3, width) and encoder_feature_dim(encoder) == width


def test_a_file_without_the_register_tokens_is_refused(tmp_path: Path) -> None:
    shrink = _shrink("virchow2")
    state = _reference("virchow2", **shrink).state_dict()
    path = _save({k: v for k, v in state.items() if k != "reg_token"}, tmp_path / "v2.bin")
    cfg = _compose("virchow2", f"encoder.checkpoint_path={path}", *_overrides(shrink))
    with pytest.raises(ValueError, match=r"1 missing keys \['reg_token'\]"):
        _build(cfg)


def _write_hf_cache(hub: Path, repo: str, files: dict[str, dict[str, torch.Tensor]]) -> None:
    """huggingface_hub's cache layout: refs/main names the snapshot holding the files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hub / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for name, state in files.items():
        (repo_dir / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
        _save(state, repo_dir / "snapshots" / commit / name)


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Empty Hugging Face and torch caches under ``tmp_path``, offline mode, no hub to reach."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "TORCH_HOME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")  # RFC 2606: never resolves
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path


@pytest.mark.parametrize("where", ["encoder.hf_cache", "HF_HUB_CACHE"])
def test_weights_from_a_hugging_face_cache_on_disk(
    offline: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """The safetensors twin wins over pytorch_model.bin, as in timm's hub loader."""
    shrink = _shrink("uni2_h")
    state = _reference("uni2_h", **shrink).state_dict()
    other = {k: v + 1 for k, v in state.items()}
    hub = offline / "hub"
    _write_hf_cache(
        hub, "MahmoodLab/UNI2-h", {"model.safetensors": state, "pytorch_model.bin": other}
    )
    overrides = [f"encoder.hf_cache={hub}"] if where == "encoder.hf_cache" else []
    if where == "HF_HUB_CACHE":
        monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    encoder = _build(_compose("uni2_h", *overrides, *_overrides(shrink)))
    _assert_same_weights(encoder, state)


def test_url_weights_from_torch_hub_cache(offline: Path) -> None:
    shrink = _shrink("kaiko_vitb16")
    state = _reference("kaiko_vitb16", **shrink).state_dict()
    checkpoints = offline / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    _save(state, checkpoints / "vitb16.pth")
    encoder = _build(_compose("kaiko_vitb16", *_overrides(shrink)))
    _assert_same_weights(encoder, state)


@pytest.mark.parametrize("preset", ["uni2_h", "kaiko_vitb16"])
def test_missing_weights_say_preset_file_and_source_in_one_line(offline: Path, preset: str) -> None:
    pub = PUBLISHED[preset]
    with pytest.raises(PretrainedWeightsUnavailableError) as info:
        _build(_compose(preset, *_overrides(_shrink(preset))))
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)  # train.py prints it as one line, exit 2
    assert "\n" not in message
    for part in (f"preset {preset!r}", f"expected {pub.file} from {pub.source}",
                 "encoder.checkpoint_path=", "encoder.pretrained=false"):  # fmt: skip
        assert part in message
    if preset == "uni2_h":
        assert str(offline / "xdg" / "huggingface" / "hub") in message
        assert "gated" in message and "your own Hugging Face account" in message
        assert "`huggingface-cli download MahmoodLab/UNI2-h pytorch_model.bin`" in message
    else:
        assert str(offline / "torch" / "hub" / "checkpoints") in message
        assert f"not gated) on a machine with internet: curl -LO {pub.source}" in message


def test_a_missing_checkpoint_path_names_the_preset(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "pytorch_model.bin"
    cfg = _compose("uni", f"encoder.checkpoint_path={missing}", *_overrides(_shrink("uni")))
    with pytest.raises(FileNotFoundError) as info:
        _build(cfg)
    message = str(info.value)
    assert "preset 'uni' not found: expected pytorch_model.bin from " in message
    assert (
        f"https://huggingface.co/MahmoodLab/UNI, but encoder.checkpoint_path={missing}" in message
    )


def test_layer_names_are_looked_up_never_imported() -> None:
    cfg = _compose("virchow2", "encoder.pretrained=false", "encoder.kwargs.mlp_layer=os.system")
    with pytest.raises(ValueError, match=r"encoder\.kwargs\.mlp_layer='os\.system' is not a kno"):
        _build(cfg)
    assert resolve_layer_names({"act_layer": "torch.nn.SiLU", "norm_layer": "layernorm"}) == {
        "act_layer": nn.SiLU,
        "norm_layer": "layernorm",  # timm's own names pass through
    }
    assert LAYER_NAMES["timm.layers.SwiGLUPacked"] is SwiGLUPacked


def test_pooled_virchow2_keeps_timm_blocks_and_checkpointing() -> None:
    cfg = _compose("virchow2", "encoder.pretrained=false", *_overrides(_shrink("virchow2", 2)))
    last_block = _build(cfg, train_last_n_blocks=1)
    trainable = {n for n, p in last_block.named_parameters() if p.requires_grad}
    assert trainable == {
        n for n, _ in last_block.named_parameters() if n.startswith(("blocks.1.", "norm."))
    }
    checkpointed = _build(cfg, grad_checkpointing=True).train()
    checkpointed.load_state_dict(last_block.state_dict())
    tiles = torch.randn(2, 3, 28, 28, requires_grad=True)
    features = checkpointed(tiles)
    features.sum().backward()
    assert checkpointed.grad_checkpointing and tiles.grad is not None
    torch.testing.assert_close(features, last_block.train()(tiles))


def test_feature_pool_needs_the_token_output() -> None:
    """Checked before the build: the full-size model here would take seconds to initialise."""
    cfg = _compose("virchow2", "encoder.pretrained=false", "encoder.kwargs.global_pool=token")
    with pytest.raises(ValueError, match=r"global_pool: '' \(token output\), got 'token'"):
        _build(cfg)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "x", "hf_repo": "a/b", "file": "../../etc/passwd"}, "plain file name"),
        ({"name": "x", "hf_repo": "../b", "file": "w.bin"}, "'owner/name' id"),
        ({"name": "x", "file": "w.bin"}, "one of hf_repo and url"),
        ({"name": "x", "hf_repo": "a/b", "exec": "rm"}, r"only the keys"),
    ],
)
def test_preset_spec_from_a_config_is_validated(spec: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PresetWeights.from_config(spec)


def test_feature_pool_needs_a_class_token() -> None:
    with pytest.raises(ValueError, match="needs a timm ViT with a class token"):
        build_encoder(
            "test_vit",
            encoder_kwargs={"img_size": 32, "class_token": False, "global_pool": "",
                            "feature_pool": "cls_mean_patch"},
        )  # fmt: skip
