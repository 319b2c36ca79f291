"""Weights files are hostile: loading runs none of their code; pretrained weights fail fast offline.

Every file here is written by the test with torch.save, pickle or safetensors; the hub caches are
real directory layouts (huggingface_hub's and torch's) in a temporary folder. Nothing is downloaded:
the tests point the hub at a name that cannot resolve and set ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import pathlib
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_wsi.models import SlideModule
from lightning_wsi.models.encoders import (
    PretrainedWeightsUnavailableError,
    UnsafeWeightsError,
    build_encoder,
    create_encoder,
    load_encoder_weights,
)

FIXES = ("encoder.checkpoint_path=/path/to/weights", "encoder.pretrained=false")


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for a payload that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def _assert_same_weights(loaded: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = loaded.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def _write_payload(path: Path, marker: Path, fmt: str) -> Callable[[], object]:
    """Write weights plus a payload in format ``fmt``; return an unsafe loader of the file."""
    obj = {**create_encoder("test_resnet").state_dict(), "extra": _Payload(marker)}
    if fmt == "plain_pickle":
        path.write_bytes(pickle.dumps(obj, protocol=5))
        return lambda: pickle.loads(path.read_bytes())
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "torch_zip")
    return lambda: torch.load(path, weights_only=False)


@pytest.mark.parametrize(
    ("fmt", "detail"),
    [("torch_zip", "getattr"), ("torch_legacy", "getattr"), ("plain_pickle", "pickle opcode")],
)
def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path, fmt: str, detail: str) -> None:
    path, marker = tmp_path / "received.pth", tmp_path / "payload_ran"
    unsafe_load = _write_payload(path, marker, fmt)
    with pytest.raises(UnsafeWeightsError) as info:
        build_encoder("test_resnet", checkpoint_path=path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"Encoder checkpoint {path} holds pickled ")
    assert "other than tensors" in message and "was not loaded" in message
    assert detail in message
    assert "torch.save(model.state_dict(), path)" in message and "safetensors" in message
    assert isinstance(info.value, ValueError)
    assert not marker.exists()
    unsafe_load()  # the control: the payload is live, a weights_only=False load would run it
    assert marker.exists()


@pytest.mark.parametrize("form", ["plain", "state_dict", "safetensors"])
def test_state_dict_forms_give_the_same_weights(tmp_path: Path, form: str) -> None:
    source = timm.create_model("test_resnet", num_classes=0)
    expected = {k: v.clone() for k, v in source.state_dict().items()}
    path = tmp_path / ("weights.safetensors" if form == "safetensors" else "weights.pth")
    if form == "safetensors":
        safetensors.torch.save_file(source.state_dict(), path)
    else:
        torch.save({"state_dict": expected, "epoch": 3} if form == "state_dict" else expected, path)
    encoder = create_encoder("test_resnet")
    load_encoder_weights(encoder, path)
    _assert_same_weights(encoder, expected)


def test_lightning_checkpoint_of_this_project_loads(tmp_path: Path, slides, trainer) -> None:
    """A real ``last.ckpt`` (optimiser, scheduler, callback state) passes the safe unpickler."""
    module = SlideModule(
        "test_resnet", "gma", "binary", aggregator_kwargs={"hidden_dim": 16, "attention_dim": 8}
    )
    callback = ModelCheckpoint(dirpath=tmp_path, filename="last")
    loader = DataLoader(slides(1, k=4), batch_size=None)
    trainer(max_steps=1, enable_checkpointing=True, callbacks=[callback]).fit(module, loader)
    expected = {k.removeprefix("encoder."): v for k, v in module.state_dict().items()}
    expected = {k: v for k, v in expected.items() if k in module.encoder.state_dict()}
    encoder = create_encoder("test_resnet")
    load_encoder_weights(encoder, tmp_path / "last.ckpt")
    _assert_same_weights(encoder, expected)
    # As saved from `SlideDataModule(Path(...))` before it stored paths as text: still loads.
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    checkpoint["datamodule_hyper_parameters"] = {"manifest": tmp_path / "manifest.csv", "k": 4}
    torch.save(checkpoint, tmp_path / "with_path.ckpt")
    encoder = create_encoder("test_resnet")
    load_encoder_weights(encoder, tmp_path / "with_path.ckpt")
    _assert_same_weights(encoder, expected)


@pytest.mark.parametrize(
    ("name", "content", "says"),
    [
        ("empty.pth", b"", "is not a file written by torch.save (EOFError"),
        ("notes.pth", b"hello world", "is not a file written by torch.save (KeyError"),
        ("bytes.pth", bytes(range(158, 190)), "holds pickled data other than tensors"),
        ("bad.safetensors", b"\x80\x02not a header", "is not a readable safetensors file"),
    ],
)
def test_files_that_are_not_weights_name_the_path(
    tmp_path: Path, name: str, content: bytes, says: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_encoder_weights(create_encoder("test_resnet"), path)
    assert str(info.value).startswith(f"Encoder checkpoint {path} {says}")
    assert "\n" not in str(info.value)


@pytest.fixture
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Empty Hugging Face and torch hub caches, a hub that cannot resolve, offline mode unset.

    Proxies are unset too: a proxy would answer for the unresolvable hub.
    """
    cache_keys = ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    proxy_keys = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    for key in (*cache_keys, *proxy_keys, *(k.upper() for k in proxy_keys)):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid")  # RFC 2606: never resolves
    return tmp_path / "hf" / "hub", tmp_path / "torch" / "hub" / "checkpoints"


def _unavailable_message(name: str) -> str:
    with pytest.raises(PretrainedWeightsUnavailableError) as info:
        build_encoder(name, pretrained=True)
    assert isinstance(info.value, FileNotFoundError)  # train.py's one-line user errors
    return str(info.value)


@pytest.mark.parametrize("offline", [True, False])
def test_pretrained_without_cache_or_hub_fails_at_once(
    empty_caches: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, offline: bool
) -> None:
    hf_cache, torch_cache = empty_caches
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = _unavailable_message("resnet10t")
    assert "\n" not in message
    assert message.startswith(
        "Pretrained weights of timm model 'resnet10t' (http://hub.invalid/timm/resnet10t.c3_in1k) "
        f"are not in the local cache ({hf_cache}, {torch_cache}) and "
    )
    reason = "HF_HUB_OFFLINE=1" if offline else "http://hub.invalid cannot be reached (no answer"
    assert reason in message
    assert all(fix in message for fix in FIXES)


def _write_hf_cache(hf_cache: Path, repo: str, filename: str, state: dict) -> None:
    """huggingface_hub's cache layout: refs/main names the snapshot holding the file."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = hf_cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    safetensors.torch.save_file(state, snapshot / filename)


def _pretrained_state(name: str) -> dict[str, torch.Tensor]:
    """Weights as the hub would hold them (ImageNet classifier included), and seeded."""
    torch.manual_seed(1)
    return {k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}


def _without_classifier(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def test_pretrained_from_the_hub_cache_loads_offline(
    empty_caches: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    hf_cache, _ = empty_caches
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # with the unresolvable hub: any request would fail
    state = _pretrained_state("test_resnet")
    _write_hf_cache(hf_cache, "timm/test_resnet.r160_in1k", "model.safetensors", state)
    encoder = create_encoder("test_resnet", pretrained=True)
    _assert_same_weights(encoder, _without_classifier(state))


def test_pretrained_from_the_torch_url_cache_loads_offline(
    empty_caches: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, torch_cache = empty_caches
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = _pretrained_state("resnet10t")
    torch_cache.mkdir(parents=True)
    torch.save(state, torch_cache / "resnet10t_176_c3-f3215ab1.pth")  # timm's url file name
    encoder = create_encoder("resnet10t", pretrained=True)
    _assert_same_weights(encoder, _without_classifier(state))


def test_a_local_checkpoint_needs_no_hub(
    empty_caches: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The first fix the error names works with ``pretrained`` still true."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = _without_classifier(_pretrained_state("test_resnet"))
    torch.save(state, tmp_path / "local.pth")
    encoder = build_encoder(
        "test_resnet", pretrained=True, checkpoint_path=tmp_path / "local.pth",
        freeze_batchnorm=False,
    )  # fmt: skip
    _assert_same_weights(encoder, state)
