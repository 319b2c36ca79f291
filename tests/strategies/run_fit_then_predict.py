"""A user's script: train slide-parallel on 2 CPU processes, then evaluate and predict.

    python run_fit_then_predict.py popen ROOT         (Lightning re-runs this script for rank 1)
    python - notebook ROOT < run_fit_then_predict.py  (the code on stdin, as in a notebook)

``popen``: ``strategy="slide_parallel"``; fit, validate and predict on the same Trainer, fit it
once more (the epochs are done: set-up and teardown only), then rank 0 alone predicts with a
new one-device Trainer while rank 1 exits. ``notebook``: a tensor op in this process first (as
a notebook previewing a batch does: it starts OpenMP's thread pool), then a fit with
``strategy="slide_parallel_notebook"`` (fork) and a prediction with a new one-device Trainer.

Rank 0 prints one line ``RESULT {json}`` at the end: the predictions (slide id, logits) and
whether torch.distributed is still initialised; forked ranks print ``threads <n>``.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightning_wsi import SlideDataModule, SlideModule
from lightning_wsi.data import make_synthetic_dataset

QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


class ReportThreads(L.Callback):
    """Each rank prints the intra-op threads it trains with."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sys.stdout.write(f"threads {torch.get_num_threads()}\n")  # one write: ranks share stdout
        sys.stdout.flush()


def _parts(root: Path) -> tuple[SlideDataModule, SlideModule]:
    manifest = make_synthetic_dataset(root, n_slides=4, progress=False)
    dm = SlideDataModule(
        manifest, k=4, mpp=2.0, tile_size=32, val_fraction=0.5, num_workers=0, progress=False
    )
    return dm, SlideModule("test_resnet", "gma", "binary")


def _fit_trainer(strategy: str) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1,
        enable_checkpointing=False, callbacks=[ReportThreads()], **QUIET,
    )  # fmt: skip


def _predict_alone(module: SlideModule, dm: SlideDataModule) -> list[dict[str, Any]]:
    """A new one-device Trainer, as a user evaluating after training would write it."""
    return L.Trainer(accelerator="cpu", devices=1, **QUIET).predict(module, datamodule=dm)


def _rows(predictions: list[dict[str, Any]]) -> list[list[Any]]:
    return [[p["slide_id"], p["logits"].tolist()] for p in predictions]


def _report(**predictions: list[dict[str, Any]]) -> None:
    result = {name: _rows(p) for name, p in predictions.items()}
    result["initialized"] = torch.distributed.is_initialized()
    print("RESULT " + json.dumps(result), flush=True)


def popen(root: Path) -> None:
    dm, module = _parts(root)
    trainer = _fit_trainer("slide_parallel")
    trainer.fit(module, dm)
    trainer.validate(module, datamodule=dm, verbose=False)
    same = trainer.predict(module, datamodule=dm)
    trainer.fit(module, dm)
    if trainer.is_global_zero:  # rank 1 has nothing left to do and exits
        _report(same=same, new=_predict_alone(module, dm))


def notebook(root: Path) -> None:
    dm, module = _parts(root)
    torch.randn(64, 3, 64, 64).mul(2).sum()  # large enough to run on OpenMP's thread pool
    _fit_trainer("slide_parallel_notebook").fit(module, dm)
    _report(new=_predict_alone(module, dm))


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    mode, folder = sys.argv[1], Path(sys.argv[2])
    {"popen": popen, "notebook": notebook}[mode](folder)
