"""Predict loads a checkpoint without running code from it, and never follows a path inside it."""

from __future__ import annotations

import pathlib
from pathlib import Path

import lightning as L
import torch

from lightning_wsi import SlideModule
from lightning_wsi.data import make_synthetic_dataset
from lightning_wsi.predict import main


class Payload:
    """Unpickling this creates ``marker``: a stand-in for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (pathlib.Path.touch, (self.marker,))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "payload-ran"
    checkpoint = tmp_path / "innocent.ckpt"
    torch.save({"state_dict": {}, "extra": Payload(marker)}, checkpoint)
    assert main([str(checkpoint), str(tmp_path / "slides.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: checkpoint {checkpoint}")
    assert "holds pickled objects other than tensors" in err and "not loaded" in err
    assert not marker.exists()


def test_a_weights_path_stored_in_a_checkpoint_is_not_followed(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "payload-ran"
    evil = tmp_path / "encoder.pth"
    torch.save({"conv1.weight": Payload(marker)}, evil)
    module = SlideModule("test_resnet", "mean", "binary")
    checkpoint = tmp_path / "model.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "pytorch-lightning_version": L.__version__,
            # as a hostile file could say: a weights file to load after building the encoder
            "hyper_parameters": {**module.hparams, "checkpoint_path": str(evil)},
            "datamodule_hyper_parameters": {"mpp": 2.0, "tile_size": 32},
        },
        checkpoint,
    )
    manifest = make_synthetic_dataset(tmp_path / "slides", n_slides=1, progress=False)
    out = tmp_path / "out"
    assert main([str(checkpoint), str(manifest), "--out", str(out), "--heatmaps", "0",
                 "--accelerator", "cpu", "--num-workers", "0"]) == 0  # fmt: skip
    assert not marker.exists()
    rows = (out / "predictions.csv").read_text().splitlines()
    assert rows[0] == "slide_id,status,target,prediction,n_tiles,reason" and len(rows) == 2
    assert "1 of 1 slides predicted" in capsys.readouterr().out


def test_slide_ids_that_look_like_paths_stay_inside_the_output_folder(tmp_path: Path) -> None:
    module = SlideModule("test_resnet", "gma", "binary")
    checkpoint = tmp_path / "run" / "model.ckpt"
    checkpoint.parent.mkdir()
    torch.save(
        {
            "state_dict": module.state_dict(),
            "pytorch-lightning_version": L.__version__,
            "hyper_parameters": dict(module.hparams),
            "datamodule_hyper_parameters": {"mpp": 2.0, "tile_size": 32},
        },
        checkpoint,
    )
    manifest = make_synthetic_dataset(tmp_path / "slides", n_slides=3, progress=False)
    ids = ["../../escaped", str(tmp_path / "absolute"), "a/b"]
    rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join([rows[0]] + [
        ",".join([new, *row.split(",")[1:]]) for new, row in zip(ids, rows[1:], strict=True)
    ]) + "\n")  # fmt: skip
    out = tmp_path / "run" / "predicted"
    assert main([str(checkpoint), str(manifest), "--out", str(out), "--heatmaps", "3",
                 "--accelerator", "cpu", "--num-workers", "0"]) == 0  # fmt: skip
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert len(written) == 3 and all(p.startswith("run/predicted/heatmaps/") for p in written)
    cached = list((tmp_path / "slides" / ".tiles").glob("*.json"))
    assert len(cached) == 3  # the cache names them through the same sanitiser
    lines = (out / "predictions.csv").read_text().splitlines()[1:]
    assert sorted(line.split(",")[0] for line in lines) == sorted(ids)
    assert all(line.split(",")[1] == "ok" for line in lines)
