"""What the configs resolve to: sweep folder names, worker counts, resume paths, loggers."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig

from lightning_wsi.config import loader_workers, swept_dirname
from lightning_wsi.train import _loggers, resolve_ckpt_path

MANIFEST = "data.datamodule.manifest=/data/cohorts/luad/2026/slides/manifest.csv"


def test_sweep_folders_are_named_by_the_swept_keys_only() -> None:
    argv = ["-m", "K=8,32,128", "split_seed=range(3)", "data=csv", MANIFEST, "tags=[a,b]"]
    job = ["K=32", "split_seed=1", "data=csv", MANIFEST, "tags=[a,b]"]
    assert swept_dirname(job, argv) == "K=32,split_seed=1"
    # a job started elsewhere (no sweep on its command line): every override but paths
    assert swept_dirname(["K=32", MANIFEST], ["K=32", MANIFEST]) == "K=32"
    assert swept_dirname([], []) == "run"


def test_loader_workers_leave_a_core_to_training() -> None:
    cores = len(os.sched_getaffinity(0))
    assert loader_workers(4) == max(0, min(4, cores - 1))
    assert loader_workers(0) == 0


def test_resume_path_last_finds_this_or_the_newest_run(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for name in ("2026-01-01_00-00-00", "2026-01-02_00-00-00"):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "checkpoints" / "last.ckpt").write_bytes(b"x")
        time.sleep(0.01)
    new = runs / "2026-01-03_00-00-00"
    newest = runs / "2026-01-02_00-00-00" / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path("last", new) == str(newest)
    own = runs / "2026-01-01_00-00-00"
    assert resolve_ckpt_path("last", own) == str(own / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(None, new) is None
    with pytest.raises(FileNotFoundError, match="ckpt_path=last: no checkpoints/last.ckpt"):
        resolve_ckpt_path("last", tmp_path / "elsewhere" / "run")
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=.*missing.ckpt: no such checkpoint"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), new)


@pytest.mark.parametrize("choice", ["tensorboard", "mlflow"])
def test_logger_choices_write_offline(tmp_path: Path, monkeypatch, choice: str) -> None:
    monkeypatch.setenv("LIGHTNING_WSI_MLRUNS", str(tmp_path / "mlruns"))
    with initialize_config_module("lightning_wsi.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"logger={choice}"], return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(tmp_path / "run")
    HydraConfig.instance().set_config(cfg)
    csv_logger, logger = _loggers(cfg, tmp_path / "run")
    assert Path(csv_logger.log_dir) == tmp_path / "run" / "logs"  # the reports' metrics.csv
    logger.log_metrics({"val/loss": 0.5}, step=1)
    logger.finalize("success")
    written = [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()]
    if choice == "tensorboard":
        assert any(p.startswith("run/tensorboard/events.out.tfevents") for p in written), written
    else:  # mlruns/<experiment>/<run>/metrics/val/loss
        assert any(p.startswith("mlruns/") and p.endswith("metrics/val/loss") for p in written)


def test_synthetic_data_keys_are_the_generators_keywords(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from lightning_wsi.train import ConfigError, _synthetic_dataset

    bad = OmegaConf.create({"root": str(tmp_path), "n_slides": 2, "sizes": 3})
    with pytest.raises(ConfigError, match=r"^unknown key\(s\) data.synthetic.sizes; valid: root, "
                       r".*n_slides.*seed"):  # fmt: skip
        _synthetic_dataset(bad)
    assert not any(tmp_path.iterdir())  # nothing written for a bad key
    node = OmegaConf.create({"root": str(tmp_path), "n_slides": 2, "seed": 5, "progress": False})
    manifest = _synthetic_dataset(node)
    assert manifest == tmp_path / "manifest.csv"
    assert json.loads((tmp_path / "synthetic.json").read_text())["seed"] == 5
