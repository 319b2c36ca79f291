"""The foundation study's pretraining: ``python -m lightning_wsi.pretrain`` and its experiment.

Tiny settings (2 slides, a step or two) keep these to seconds; the study's real run is recorded
in benchmarks/foundation_study/.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from hydra.utils import instantiate

from lightning_wsi.models.encoders import build_encoder
from lightning_wsi.pretrain import (
    FORMAT,
    PretrainSettings,
    _encoder,
    _tile_sites,
    compose_study,
    ensure_pretrained,
    main,
)

TINY = ["--steps", "2", "--slides", "2", "--batch-size", "4", "--eval-tiles", "4"]
TINY_CFG = [
    "pretrain.steps=1",
    "pretrain.slides=2",
    "pretrain.batch_size=2",
    "pretrain.eval_tiles=2",
]


@pytest.fixture(autouse=True)
def _no_env_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LIGHTNING_WSI_FOUNDATION", raising=False)


def test_experiment_composes_for_each_finetune_choice() -> None:
    frozen = compose_study(["finetune=frozen", "split_seed=2"])
    assert frozen.encoder.name == "vit_tiny_patch16_224"
    assert frozen.encoder.kwargs.depth == 6 and frozen.encoder.kwargs.img_size == 64
    assert frozen.encoder.checkpoint_path == "outputs/foundation_study/encoder.safetensors"
    assert (frozen.K, frozen.mpp, frozen.tile_size) == (32, 2.0, 64)
    assert frozen.seed == 2 and frozen.freeze_encoder is True  # seed follows split_seed
    assert frozen.data.synthetic.n_slides == 60
    assert PretrainSettings.from_config(frozen.pretrain) == PretrainSettings()
    lora = compose_study(["finetune=lora"])
    assert lora.model.lora.rank == 8 and lora.freeze_encoder is False
    full = compose_study(["finetune=full"])
    assert full.model.lora is None and full.freeze_encoder is False


def test_pretrain_command_writes_weights_the_experiment_loads_strictly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "weights" / "encoder.safetensors"
    assert main(["--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "pretext on 4 fresh tiles: slide accuracy" in printed and str(out) in printed
    with safetensors.safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == FORMAT and meta["encoder"] == "vit_tiny_patch16_224"
    assert "'steps': 2" in meta["settings"] and "'slides': 2" in meta["settings"]

    cfg = compose_study(["finetune=full", f"encoder.checkpoint_path={out}"])
    module = instantiate(cfg.model, _convert_="all")  # loads the file strictly into the encoder
    saved = safetensors.torch.load_file(out)
    state = module.encoder.state_dict()
    assert sorted(saved) == sorted(state)
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    torch.manual_seed(0)  # the pretraining's initial weights: the file holds trained ones
    initial = _encoder(cfg).state_dict()
    assert any(not torch.equal(saved[k], initial[k]) for k in saved)
    assert not list(out.parent.glob("*.part"))  # written through a temporary file


def test_ensure_pretrained_trains_only_when_the_file_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "encoder.safetensors"
    cfg = compose_study([f"encoder.checkpoint_path={out}", *TINY_CFG])
    assert ensure_pretrained(cfg) == out
    assert "is missing: pretraining it first" in capsys.readouterr().out
    written = out.stat().st_mtime_ns
    assert ensure_pretrained(cfg) == out
    assert out.stat().st_mtime_ns == written and capsys.readouterr().out == ""
    build_encoder(cfg.encoder.name, encoder_kwargs=dict(cfg.encoder.kwargs), checkpoint_path=out)
    other = compose_study(["experiment=survival_demo"])  # no `pretrain` node: nothing to do
    assert ensure_pretrained(other) is None


def test_tile_sites_keep_tissue_tiles_with_their_fat_share() -> None:
    tissue = np.zeros((16, 16), bool)
    tissue[:, :8] = True  # the left half is tissue
    pale = np.zeros((16, 16), bool)
    pale[:4, :8] = True  # its top four rows are fat
    sites, fat = _tile_sites(tissue, pale, (16, 16, 3), tile=8)
    # corners on a 4 px grid; x=8 windows hold no tissue, x=4 windows exactly half
    assert sites.tolist() == [[0, 0], [0, 4], [4, 0], [4, 4], [8, 0], [8, 4]]
    assert fat.tolist() == [0.5, 0.25, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--out", "weights.pth"], "--out weights.pth: the weights are written as safetensors"),
        (["--out", "w.safetensors", "--steps", "0"], "pretrain.steps must be a positive integer"),
        (["--slides", "1"], "pretrain.slides must be at least 2"),
        (["--out", "w.safetensors", "pretrain.stepz=3"], "Could not override 'pretrain.stepz'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_settings_name_an_unknown_key() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) pretrain.stepz; valid: \['batch_size'"):
        PretrainSettings.from_config({"stepz": 3})
