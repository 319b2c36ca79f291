"""The commands users run: train (Hydra), a multirun with its summary, predict, the notebook."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from nbclient import NotebookClient
from omegaconf import OmegaConf

from lightning_wsi import predict, summarize, train
from lightning_wsi.train import ConfigError, check_tile_size

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "encoder=test_resnet",
    "K=8",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "heatmaps=2",
    "bootstrap=100",
]


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    launch = ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK")
    env = {k: v for k, v in os.environ.items() if k not in launch and not k.startswith("PL_")}
    env.update(PYTHONWARNINGS="ignore", HYDRA_FULL_ERROR="0")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder outside the repository: the configs must come with the installed package."""
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def trained(workdir: Path) -> Path:
    data = f"data.synthetic.root={workdir / 'slides'}"
    done = _run(
        ["-m", "lightning_wsi.train", *TINY, data, "data.synthetic.n_slides=8",
         f"hydra.run.dir={workdir / 'run'}"],
        workdir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir / "run"


def test_train_writes_every_output_and_prints_the_final_metrics(trained: Path) -> None:
    for name in ("checkpoints/last.ckpt", "checkpoints/best.ckpt", "logs/metrics.csv",
                 "loss.png", "roc.png", "predictions.csv", "problems.csv", "summary.json",
                 "train.log", ".hydra/config.yaml"):  # fmt: skip
        assert (trained / name).is_file(), name
    assert len(list((trained / "heatmaps").glob("*.png"))) == 2
    with open(trained / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2  # the validation quarter of 8 slides, one of each class
    assert {r["target"] for r in rows} == {"0", "1"} and {r["status"] for r in rows} == {"ok"}
    log = (trained / "train.log").read_text()  # the run's log: Lightning's and ours
    assert "`Trainer.fit` stopped" in log and "final validation metrics:" in log
    assert f"outputs: {trained}" in log and "error" not in log.lower()
    assert (trained / "problems.csv").read_text().startswith("kind,slide_id,path,x,y,")
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["problems"] == {"counts": {}, "records": []}


def test_last_checkpoint_is_the_final_state_and_best_the_best_epoch(trained: Path) -> None:
    """last.ckpt is the end of the run (epoch, step, loops), whichever epoch was best."""
    # A checkpoint the command wrote loads without unpickling anything but tensors and values.
    last = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    best = torch.load(trained / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1  # trainer.max_epochs=2
    assert last["global_step"] == 2 * 6  # 6 training slides in each epoch
    assert best["epoch"] <= last["epoch"] and best["global_step"] <= last["global_step"]
    assert set(last["optimizer_states"][0]["state"]) and last["loops"]["fit_loop"]
    # The default preset, trainer=cpu (32-true, no clipping): the fused AdamW (test_presets.py
    # trains the other presets).
    group = last["optimizer_states"][0]["param_groups"][0]
    assert (group["foreach"], group["fused"]) == (None, True)
    trainer = OmegaConf.load(trained / ".hydra" / "config.yaml").trainer
    assert (trainer.precision, trainer.get("gradient_clip_val")) == ("32-true", None)


def test_resume_continues_after_the_last_epoch_and_prints_honest_metrics(
    workdir: Path, trained: Path
) -> None:
    """`ckpt_path=` resumes the 2-epoch run from its last.ckpt to 3 epochs in a new folder."""
    done = _run(
        ["-m", "lightning_wsi.train", *TINY, f"data.synthetic.root={workdir / 'slides'}",
         "data.synthetic.n_slides=8", "trainer.max_epochs=3",
         f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
         f"hydra.run.dir={workdir / 'again'}"],
        workdir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    last = torch.load(workdir / "again" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 3 * 6  # one more epoch of 6 steps
    with open(workdir / "again" / "logs" / "metrics.csv") as f:
        epochs = {int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("train/loss_epoch")}
    assert epochs == {2}  # only the epoch it trained, none replayed, no phantom epoch
    lines = done.stdout.splitlines()
    # 2 validation slides: an AUROC, but no bootstrap interval pretending to mean something
    auroc = [line for line in lines if line.startswith("val/auroc ")]
    assert auroc and "no interval: 2 slides" in auroc[0] and "[" not in auroc[0], auroc
    assert any(line.startswith("val/loss ") for line in lines)
    assert lines[-2] == "problems: none (no slide or tile was skipped)"
    assert lines[-1] == f"outputs: {workdir / 'again'}"


def test_train_command_on_two_slide_parallel_processes(workdir: Path, trained: Path) -> None:
    """Lightning's launcher re-runs the Hydra command for rank 1 in the same run folder."""
    run = workdir / "parallel"
    done = _run(
        ["-m", "lightning_wsi.train", *TINY, "strategy=slide_parallel", "trainer.max_epochs=1",
         f"data.synthetic.root={workdir / 'slides'}", "data.synthetic.n_slides=8", "heatmaps=0",
         f"hydra.run.dir={run}"],
        workdir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["devices"] == 2 and summary["val_slides"] == 2
    assert (run / "checkpoints" / "last.ckpt").is_file()


def test_multirun_over_k_on_two_slide_parallel_processes_and_its_summary(
    workdir: Path, trained: Path
) -> None:
    """A ``-m`` sweep whose jobs each run on 2 processes: rank 1 re-runs its job, not the sweep
    (Lightning's launcher passed ``-m K=4,16`` on, and every rank ran every job again)."""
    sweep = workdir / "sweep"
    done = _run(
        ["-m", "lightning_wsi.train", "-m", *TINY, "K=4,16", "trainer.max_epochs=1",
         "strategy=slide_parallel", f"data.synthetic.root={workdir / 'slides'}",
         "data.synthetic.n_slides=8", f"hydra.sweep.dir={sweep}"],
        workdir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.parent.name for p in sweep.rglob("summary.json")) == ["0_K=4", "1_K=16"]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0_K=4", "1_K=16"]
    assert done.stdout.count("final validation metrics:") == 2  # rank 0 reports, once a job
    done = _run(["-m", "lightning_wsi.summarize", str(sweep)], workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["K"]) for r in rows] == [4, 16]
    assert all(r["stratum"] == "2 devices, no chunking, end to end" for r in rows)
    assert (sweep / "k_sweep.png").stat().st_size > 10_000
    assert "val AUROC [95% CI]" in done.stdout


def test_predict_on_the_trained_checkpoint(workdir: Path, trained: Path) -> None:
    out = workdir / "predicted"
    done = _run(
        ["-m", "lightning_wsi.predict", str(trained / "checkpoints" / "last.ckpt"),
         str(workdir / "slides" / "manifest.csv"), "--out", str(out), "--heatmaps", "1"],
        workdir,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(0.0 <= float(r["prediction"]) <= 1.0 for r in rows)
    assert {r["status"] for r in rows} == {"ok"} and (out / "problems.csv").is_file()
    assert len(list((out / "heatmaps").glob("*.png"))) == 1
    # last.ckpt is the model that wrote the run's own predictions.csv.
    with open(trained / "predictions.csv") as f:
        own = {r["slide_id"]: float(r["prediction"]) for r in csv.DictReader(f)}
    ours = {r["slide_id"]: float(r["prediction"]) for r in rows}
    assert own and all(abs(ours[s] - p) <= 1e-5 for s, p in own.items()), (own, ours)
    # Slides without labels: a manifest of slide_id and path only.
    unlabeled = workdir / "slides" / "unlabeled.csv"
    with open(workdir / "slides" / "manifest.csv") as f:
        listed = list(csv.DictReader(f))[:3]
    unlabeled.write_text(
        "slide_id,path\n" + "".join(f"{r['slide_id']},{r['path']}\n" for r in listed)
    )
    # In this process: the command's main is a plain function (the run above is the real one).
    assert predict.main(
        [str(trained / "checkpoints" / "last.ckpt"), str(unlabeled), "--out",
         str(workdir / "unlabeled"), "--heatmaps", "0", "--accelerator", "cpu"]
    ) == 0  # fmt: skip
    with open(workdir / "unlabeled" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide_id"] for r in rows] == [r["slide_id"] for r in listed]
    assert all(r["target"] == "" and r["prediction"] for r in rows)


def test_a_user_error_is_one_clear_line_from_the_real_command(workdir: Path) -> None:
    done = _run(["-m", "lightning_wsi.train", "data=csv"], workdir)
    assert done.returncode == 2, done.stderr
    assert "error: data.datamodule.manifest must be set" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["aggregator=gmaa"], 1, "Available options in 'aggregator'"),
        (["trainer.max_epoch=3"], 2,
         "unknown config key 'trainer.max_epoch' (did you mean 'trainer.max_epochs'?)"),
        (["ckpt_path=nowhere.ckpt"], 2, "error: ckpt_path=nowhere.ckpt: no such checkpoint file"),
        (["experiment=foundation_study", "pretrain.steps=0",
          "encoder.checkpoint_path=missing/encoder.safetensors"], 2,
         "error: pretrain.steps must be a positive integer, got 0"),
    ],
)  # fmt: skip
def test_user_errors_are_one_clear_line(
    workdir: Path, monkeypatch, capsys, args, code, expected
) -> None:
    """In this process, through the command's own entry point (the test above runs one as a
    real command); Hydra's logging set-up and global state are put back after it."""
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "argv", ["lightning_wsi.train", *args])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        with pytest.raises(SystemExit) as stopped:
            train.main()
    finally:
        for handler in logging.root.handlers:
            if handler not in handlers:
                handler.close()
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
        GlobalHydra.instance().clear()
    assert stopped.value.code == code
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("command", "args", "expected"),
    [
        (predict.main, ["missing.ckpt", "slides.csv"], "error: checkpoint not found: missing.ckpt"),
        (summarize.main, ["nowhere"], "error: no summary.json under nowhere"),
    ],
)
def test_predict_and_summarize_errors_are_one_clear_line(
    workdir: Path, monkeypatch, capsys, command, args, expected
) -> None:
    """In this process: their mains are plain functions (the train command's errors above run
    as a real command, since Hydra owns its entry point)."""
    monkeypatch.chdir(workdir)
    assert command(args) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1


def test_every_config_composes() -> None:
    with initialize_config_module("lightning_wsi.conf", version_base="1.3"):
        for experiment in ("egfr_luad", "breast_wsi", "foundation"):
            cfg = compose("train", overrides=[f"experiment={experiment}"])
            assert cfg.mpp == 0.5 and cfg.tile_size == 224
            assert cfg.trainer.strategy._target_ == "lightning_wsi.SlideParallelStrategy"
        cfg = compose("train", overrides=["experiment=panda_isup"])
        assert (cfg.task.name, cfg.task.num_classes, cfg.aggregator.name) == (
            "ordinal",
            6,
            "transformer",
        )
        for group, options in {
            "encoder": ("resnet10t", "test_resnet", "test_vit", "resnet18", "resnet50",
                        "vit_small", "vit_base", "foundation_local", "uni", "uni2_h",
                        "virchow2", "h_optimus_0", "h_optimus_1", "prov_gigapath",
                        "kaiko_vitb16"),
            "aggregator": ("gma", "transformer", "mean"),
            "strategy": ("single_device", "slide_parallel", "slide_parallel_chunked", "ddp"),
            "trainer": ("cpu", "gpu", "multinode"),
            "task": ("binary", "multiclass", "regression", "ordinal", "survival"),
            "logger": ("csv", "tensorboard", "mlflow"),
            "finetune": ("full", "frozen", "last_blocks", "lora", "llrd"),
        }.items():  # fmt: skip
            for option in options:
                cfg = compose("train", overrides=[f"{group}={option}"], return_hydra_config=True)
                assert cfg.hydra.runtime.choices[group] == option


def test_quickstart_notebook_runs_top_to_bottom(tmp_path: Path, monkeypatch) -> None:
    # As clusters and many shells export it: forked ranks must not deadlock in OpenMP.
    monkeypatch.setenv("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": tmp_path}}
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "validation AUROC" in text
    assert "validation C-index" in text  # the survival section
    assert any("image/png" in o.get("data", {}) for o in outputs)


def test_a_fixed_size_encoder_preset_with_another_tile_size_is_one_line() -> None:
    with initialize_config_module("lightning_wsi.conf", version_base="1.3"):
        fixed = compose("train", overrides=["encoder=h_optimus_0"])  # the demo's 56-px tiles
        with pytest.raises(ConfigError, match=r"^encoder=vit_giant_patch14_reg4_dinov2 takes "
                           r"224-px tiles only .* got tile_size=56; set tile_size=224 \(and "
                           r"mpp=0.5\), or encoder.kwargs.dynamic_img_size=true"):  # fmt: skip
            check_tile_size(fixed)
        check_tile_size(compose("train", overrides=["encoder=h_optimus_0", "tile_size=224"]))
        check_tile_size(compose("train", overrides=["encoder=uni"]))  # dynamic_img_size: true


def test_slide_group_size_is_one_top_level_key() -> None:
    with initialize_config_module("lightning_wsi.conf", version_base="1.3"):
        for strategy in ("slide_parallel", "slide_parallel_chunked"):
            cfg = compose("train", overrides=[f"strategy={strategy}", "slide_group_size=2"])
            assert cfg.trainer.strategy.slide_group_size == 2
            assert (
                compose("train", overrides=[f"strategy={strategy}"]).trainer.strategy[
                    "slide_group_size"
                ]
                is None
            )
