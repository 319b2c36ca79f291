"""SlideDataModule: validation of every bad row, splits, loaders alone and under a real Trainer."""

from __future__ import annotations

import csv
import json
import multiprocessing.forkserver
import shutil
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import tifffile
import torch
from lightning.pytorch.strategies import DDPStrategy
from slide_files import grid_image, write_grid_slide

from lightning_wsi.data import BadSlideError, ManifestError, SlideDataModule
from lightning_wsi.data.processes import worker_context
from lightning_wsi.strategies.lifecycle import release_openmp_threads

CELLS = [(c, r) for c in range(1, 5) for r in range(1, 4)]  # 12 tissue tiles at 0.5 mpp / 224 px
SMALL = dict(mpp=2.0, tile_size=56)  # same 112 µm tiles, read small for speed


def _manifest(root: Path, rows: list[dict]) -> Path:
    path = root / "manifest.csv"
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """Eight good slides (4 per class) of 12 tissue tiles, in a slides/ folder."""
    root = tmp_path_factory.mktemp("cohort")
    (root / "slides").mkdir()
    for i in range(8):
        write_grid_slide(root / f"slides/s{i}.tiff", CELLS, 6, 5, 224, mpp=0.5, seed=i)
    return root


def _good_rows(n=8):
    return [{"slide_id": f"s{i}", "path": f"slides/s{i}.tiff", "label": i % 2} for i in range(n)]


def test_works_without_a_trainer_as_one_process_epoch_zero(cohort):
    dm = SlideDataModule(_manifest(cohort, _good_rows()), k=5, progress=False, **SMALL)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 6 and len(dm.splits["val"]) == 2
    assert {e.target for e in dm.splits["val"]} == {0, 1}  # stratified
    batches = list(dm.train_dataloader())
    assert len(batches) == 6
    batch = dm.on_after_batch_transfer(batches[0], 0)  # what the model sees
    assert batch["tiles"].shape == (5, 3, 56, 56) and batch["coords"].shape == (5, 2)
    assert batch["tiles"].dtype == torch.float32 and batches[0]["tiles"].dtype == torch.uint8
    assert batch["target"].dtype == torch.int64 and isinstance(batch["slide_id"], str)
    val = next(iter(dm.val_dataloader()))
    assert val["tiles"].shape == (12, 3, 56, 56)  # evaluation: every tile
    assert len(list(dm.predict_dataloader())) == 8


@pytest.mark.parametrize("k", ["all", None])
def test_k_all_trains_on_every_tissue_tile_whatever_eval_k(cohort, k):
    dm = SlideDataModule(
        _manifest(cohort, _good_rows()), k=k, eval_k=4, progress=False, num_workers=0, **SMALL
    )
    dm.setup("fit")
    for batch in dm.train_dataloader():  # all 12 tiles every step, each once; eval_k caps eval
        assert len(batch["tiles"]) == 12 and len({tuple(c) for c in batch["coords"].tolist()}) == 12
    assert all(len(b["tiles"]) == 4 for b in dm.val_dataloader())
    for bad in (0, -3, "most", 2.5, True):
        with pytest.raises(ValueError, match=r"k \(K in the training config\) must be an integer"):
            SlideDataModule(_manifest(cohort, _good_rows()), k=bad, progress=False, **SMALL)


def test_split_seed_and_manifest_split_column(cohort):
    def val_ids(**kwargs):
        dm = SlideDataModule(_manifest(cohort, _good_rows()), progress=False, **SMALL, **kwargs)
        dm.setup("fit")
        return sorted(e.slide_id for e in dm.splits["val"])

    assert val_ids(split_seed=0) == val_ids(split_seed=0)
    assert len({tuple(val_ids(split_seed=s)) for s in range(6)}) > 1  # Monte Carlo CV
    rows = [dict(r, split="val" if i in (2, 5) else "train") for i, r in enumerate(_good_rows())]
    dm = SlideDataModule(_manifest(cohort, rows), progress=False, **SMALL)
    dm.setup("fit")
    assert sorted(e.slide_id for e in dm.splits["val"]) == ["s2", "s5"]


def test_unlabeled_slides_for_prediction(cohort):
    rows = [{"slide_id": f"s{i}", "path": f"slides/s{i}.tiff"} for i in range(3)]
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['label'\]"):
        SlideDataModule(_manifest(cohort, rows), progress=False, **SMALL).setup("predict")
    rows = [dict(r, label="1" if i == 0 else "") for i, r in enumerate(rows)]
    dm = SlideDataModule(
        _manifest(cohort, rows), val_fraction=0.0, require_labels=False, progress=False, **SMALL
    )
    dm.setup("predict")
    items = {b["slide_id"]: b for b in dm.predict_dataloader()}
    assert sorted(items) == ["s0", "s1", "s2"]
    assert int(items["s0"]["target"]) == 1 and "target" not in items["s1"]
    assert items["s2"]["tiles"].shape == (12, 3, 56, 56)


def test_val_fraction_zero_trains_without_validation(cohort):
    dm = SlideDataModule(_manifest(cohort, _good_rows()), val_fraction=0.0, progress=False, **SMALL)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 8 and dm.val_dataloader() == []
    with pytest.raises(ManifestError, match=r"split 'val'"):
        dm.setup("validate")


def test_empty_split_is_an_error(cohort):
    rows = [dict(r, split="train") for r in _good_rows()]
    dm = SlideDataModule(_manifest(cohort, rows), progress=False, **SMALL)
    with pytest.raises(ManifestError, match=r"split 'val' of manifest .* has no usable slide"):
        dm.setup("fit")
    with pytest.raises(ManifestError, match=r"split 'test'"):
        dm.setup("test")


@pytest.fixture(scope="module")
def bad_cohort(cohort) -> Path:
    """The good cohort plus one slide for each way a slide can be bad."""
    slides = cohort / "slides"
    (slides / "corrupt.svs").write_bytes(b"II*\x00" + np.random.bytes(4000))
    # tissue, but no resolution tags: the only thing wrong is the missing mpp
    image = grid_image(CELLS, 6, 5, 224)
    tifffile.imwrite(slides / "nompp.tiff", image, tile=(256, 256), photometric="rgb")
    write_grid_slide(slides / "glass.tiff", [], 6, 5, 224, mpp=0.5)
    shutil.copyfile(slides / "s0.tiff", slides / "badlabel.tiff")  # one file is one slide
    rows = _good_rows() + [
        {"slide_id": "missing", "path": "slides/missing.svs", "label": 1},
        {"slide_id": "corrupt", "path": "slides/corrupt.svs", "label": 0},
        {"slide_id": "nompp", "path": "slides/nompp.tiff", "label": 1},
        {"slide_id": "glass", "path": "slides/glass.tiff", "label": 0},
        {"slide_id": "badlabel", "path": "slides/badlabel.tiff", "label": 3},
    ]
    return _manifest(cohort, rows)


EXPECTED_REASONS = {
    "missing": "file not found",
    "corrupt": "OpenSlide cannot read",
    "nompp": "no microns-per-pixel",
    "glass": "no tissue tile",
    "badlabel": "label '3' is not a class of task 'binary'",
}


def test_every_bad_slide_is_reported_at_once(bad_cohort):
    dm = SlideDataModule(bad_cohort, progress=False, **SMALL)
    with pytest.raises(BadSlideError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert "5 of 13 slides" in message and "on_bad_slide='skip'" in message
    assert {b.slide_id for b in info.value.bad_slides} == set(EXPECTED_REASONS)
    for slide_id, reason in EXPECTED_REASONS.items():
        line = next(line for line in message.splitlines() if line.strip().startswith(slide_id))
        assert reason in line and "slides/" in line  # the id, the path and why


def test_skip_says_so_in_a_plain_line_and_keeps_the_list(bad_cohort, capsys):
    dm = SlideDataModule(bad_cohort, on_bad_slide="skip", progress=False, **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # as test harnesses and launchers do: still said
        dm.setup("fit")
    out = capsys.readouterr().out
    assert "skipping 5 of 13 slides" in out
    assert all(f"  {slide_id} (" in out for slide_id in EXPECTED_REASONS)
    assert {b.slide_id for b in dm.bad_slides} == set(EXPECTED_REASONS)
    recorded = {p.slide_id: p for p in dm.problems.records}
    assert set(recorded) == set(EXPECTED_REASONS)
    assert all(p.kind == "bad slide" and p.stage == "setup" for p in recorded.values())
    assert EXPECTED_REASONS["glass"] in recorded["glass"].reason
    kept = [e.slide_id for split in dm.splits.values() for e in split]
    assert sorted(kept) == [f"s{i}" for i in range(8)]


def test_manifest_mpp_column_rescues_a_slide_without_metadata(bad_cohort, cohort):
    rows = [{"slide_id": "nompp", "path": "slides/nompp.tiff", "label": 1, "mpp": 0.5}]
    dm = SlideDataModule(_manifest(cohort, rows), val_fraction=0, progress=False, **SMALL)
    dm.setup("predict")
    (entry,) = dm.splits["train"]
    assert entry.tiles.slide_mpp == 0.5 and len(entry.tiles) == len(CELLS)
    # a config value does the same for every slide without one
    rows[0].pop("mpp")
    dm = SlideDataModule(
        _manifest(cohort, rows), val_fraction=0, slide_mpp=0.5, progress=False, **SMALL
    )
    dm.setup("predict")
    assert len(dm.splits["train"][0].tiles) == len(CELLS)


def test_normalisation_from_the_encoders_timm_config(cohort):
    manifest = _manifest(cohort, _good_rows())
    assert SlideDataModule(manifest, encoder="vit_small_patch16_224").mean == (0.5, 0.5, 0.5)
    assert SlideDataModule(manifest).std == (0.229, 0.224, 0.225)
    assert SlideDataModule(manifest, encoder="resnet18", mean=(0, 0, 0)).mean == (0, 0, 0)


# --------------------------------------------------------------- under a real 2-process Trainer
class _Recorder(L.LightningModule):
    """Records which slides and tiles each rank receives; trains one dummy weight."""

    def __init__(self, out: str) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.out, self.seen = out, []

    def training_step(self, batch, batch_idx):
        self.seen.append([self.current_epoch, batch["slide_id"], batch["tile_index"].tolist()])
        assert batch["tiles"].dtype == torch.float32  # normalised on the device by the hook
        return self.weight * batch["tiles"].mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_train_end(self) -> None:
        Path(self.out, f"rank{self.global_rank}.json").write_text(json.dumps(self.seen))


class _SlideParallelDDP(DDPStrategy):
    """The data module's protocol: a strategy that shards each slide's tiles over ranks."""

    slide_parallel = True


def _fit_two_ranks(manifest: Path, out: Path, strategy) -> list[list]:
    dm = SlideDataModule(manifest, k=7, num_workers=1, progress=False, **SMALL)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(_Recorder(str(out)), datamodule=dm)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("slide_parallel", [True, False])
def test_ranks_under_a_real_trainer(cohort, tmp_path, slide_parallel):
    manifest = _manifest(cohort, _good_rows())
    cls = _SlideParallelDDP if slide_parallel else DDPStrategy
    # The ranks are forked from here, after this process started a forkserver (as tiling
    # does): each must start its own loader workers and OpenMP pool.
    worker_context(["lightning_wsi.data.tiling"])
    multiprocessing.forkserver.ensure_running()
    release_openmp_threads()
    ranks = _fit_two_ranks(
        manifest, tmp_path, cls(start_method="fork", process_group_backend="gloo")
    )
    # The single-process reference: the same data module, no trainer.
    reference = SlideDataModule(manifest, k=7, progress=False, **SMALL)
    reference.setup("fit")
    loader = reference.train_dataloader()
    single = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        single += [[epoch, b["slide_id"], b["tile_index"].tolist()] for b in loader]
    if slide_parallel:
        assert [s[:2] for s in ranks[0]] == [s[:2] for s in ranks[1]] == [s[:2] for s in single]
        for a, b, whole in zip(ranks[0], ranks[1], single, strict=True):
            assert (len(a[2]), len(b[2])) == (4, 3) and a[2] + b[2] == whole[2]
    else:
        ids = [[s[1] for s in r if s[0] == 0] for r in ranks]
        assert not set(ids[0]) & set(ids[1]) and len(ids[0]) == len(ids[1]) == 3
        assert all(len(s[2]) == 7 for r in ranks for s in r)


def test_slide_modules_get_uint8_tiles_other_modules_normalised_float(cohort):
    from lightning_wsi import SlideModule
    from lightning_wsi.data.transfer import normalize

    class Plain(L.LightningModule):  # a user's own module: sees float tiles, as always
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            return self.head(batch["tiles"].mean(dim=(0, 2, 3))).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    seen = {}

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen[type(module).__name__] = batch["tiles"].clone()

    dm = SlideDataModule(_manifest(cohort, _good_rows()), k=5, progress=False, **SMALL)
    for module in (SlideModule("test_resnet", "mean", "binary"), Plain()):
        L.Trainer(
            accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()],
            limit_val_batches=0,
        ).fit(module, dm)  # fmt: skip
    slide_tiles, plain_tiles = seen["SlideModule"], seen["Plain"]
    assert slide_tiles.dtype == torch.uint8 and plain_tiles.dtype == torch.float32
    # The same first batch: the module normalises it chunk by chunk exactly as the data module
    # would have normalised it whole.
    assert torch.equal(normalize(slide_tiles, dm.mean, dm.std), plain_tiles)
