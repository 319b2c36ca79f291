"""A bad tile costs a tile, a bad slide costs a slide: what the loader yields and records."""

from __future__ import annotations

import csv

import lightning as L
import numpy as np
import openslide
import pytest
from bad_tile_slides import BROKEN_XY, write_bad_tile_slides

from lightning_wsi import SlideModule
from lightning_wsi.data import SlideDataModule
from lightning_wsi.data.dataset import SlideDataset, SlideEntry
from lightning_wsi.data.problems import Problem, ProblemLog
from lightning_wsi.data.sampling import SlideSampler
from lightning_wsi.data.tiling import tile_slide


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    return write_bad_tile_slides(tmp_path_factory.mktemp("bad_tiles")).parent


def _entry(folder, name: str) -> SlideEntry:
    path = str(folder / f"{name}.tiff")
    return SlideEntry(name, path, 1, tile_slide(path, mpp=0.5, tile_size=64))


def test_a_broken_tile_is_left_out_and_the_rest_read_exactly(slides) -> None:
    entry = _entry(slides, "broken_tiles")
    dataset = SlideDataset([entry], k=None)
    item = dataset[0]
    assert item["num_tiles"] == len(entry.tiles) == 256
    assert {(p["x"], p["y"]) for p in item["tile_problems"]} == BROKEN_XY
    assert all(
        p["error"].startswith("OpenSlideError") and "JPEG" in p["error"]
        for p in item["tile_problems"]
    )
    assert item["slide_problem"] is None and item["max_bad_tiles"] == 25
    kept = [tuple(c) for c in item["coords"].tolist()]
    assert len(kept) == 254 and not BROKEN_XY & set(kept)
    assert len(item["tiles"]) == len(item["tile_index"]) == 254
    with openslide.OpenSlide(entry.path) as raw:  # what is kept is the slide's own pixels
        x, y = kept[7]
        expected = np.asarray(raw.read_region((x, y), 0, (64, 64)))[..., :3]
    assert np.array_equal(item["tiles"][7].permute(1, 2, 0).numpy(), expected)


def test_more_broken_tiles_than_tolerated_drops_the_slide(slides) -> None:
    entry = _entry(slides, "broken_tiles")
    # 2 of 256 failed; a fraction of 0.005 tolerates floor(1.28) = 1
    item = SlideDataset([entry], k=None, max_bad_tile_fraction=0.005)[0]
    assert "2 of 256 sampled tiles failed to read" in item["slide_problem"]
    assert item["tiles"].shape[0] == item["coords"].shape[0] == 0


def test_a_slide_deleted_mid_run_is_dropped_with_a_true_reason(slides, tmp_path) -> None:
    copy = tmp_path / "gone.tiff"
    copy.write_bytes((slides / "intact_a.tiff").read_bytes())
    entry = SlideEntry("gone", str(copy), 0, tile_slide(copy, mpp=0.5, tile_size=64))
    dataset = SlideDataset([entry], k=8)
    assert dataset[0]["slide_problem"] is None
    dataset.close()  # a fresh worker: no open handle keeps the deleted file readable
    copy.unlink()
    item = dataset[(0, 1)]
    assert item["slide_problem"] == f"slide 'gone': its file {copy} disappeared during the run"
    assert len(item["tiles"]) == 0 and item["tile_problems"] == []


def test_a_dropped_slide_is_not_read_again(slides, tmp_path) -> None:
    log = ProblemLog()
    log.add(Problem("slide dropped", "b", "b.tiff", "its file disappeared", stage="train"))
    sampler = SlideSampler(2, shuffle=False, dropped_source=lambda: {1: log.dropped["b"]})
    assert list(sampler) == [(0, 0), (1, 0, "its file disappeared")]
    entry = _entry(slides, "intact_b")
    missing = SlideEntry("b", str(tmp_path / "nowhere.tiff"), 0, entry.tiles)
    item = SlideDataset([entry, missing], k=8)[(1, 0, "its file disappeared")]
    assert item["slide_problem"] == "its file disappeared" and len(item["tiles"]) == 0


def test_problem_log_counts_repeats_once_and_writes_csv(tmp_path) -> None:
    log = ProblemLog()
    for epoch in (0, 1):
        log.add(Problem("tile left out", "s", "s.tiff", "bad", 0, 64, "train", epoch))
    log.add(Problem("slide dropped", "t", "t.tiff", "gone", stage="train"))
    (record, dropped) = log.records
    assert record.count == 2 and record.epoch == 0 and log.dropped == {"t": "gone"}
    text = log.write_csv(tmp_path / "problems.csv").read_text().splitlines()
    assert text[0] == "kind,slide_id,path,x,y,stage,epoch,count,reason"
    assert text[1] == "tile left out,s,s.tiff,0,64,train,0,2,bad"
    assert log.summary_line("p.csv") == (
        "problems: 1 tiles left out, 1 slides dropped; listed in p.csv"
    )


def test_training_skips_a_dropped_slide_and_never_reads_it_again(slides, tmp_path) -> None:
    """One process, the real Trainer: the slide deleted after epoch 0 is dropped in epoch 1,
    not read in epoch 2, and the run finishes with every loss written down."""
    folder = tmp_path / "cohort"
    folder.mkdir()
    rows = []
    for name in ("intact_a", "intact_b", "broken_tiles"):
        (folder / f"{name}.tiff").write_bytes((slides / f"{name}.tiff").read_bytes())
        rows.append({"slide_id": name, "path": f"{name}.tiff", "label": len(rows) % 2})
    with open(folder / "m.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "path", "label"])
        writer.writeheader()
        writer.writerows(rows)

    class DeleteAfterFirstEpoch(L.Callback):
        reads: list[str] = []

        def on_train_epoch_end(self, trainer, module) -> None:
            if trainer.current_epoch == 0:
                trainer.train_dataloader.dataset.close()  # no open handle keeps it readable
                (folder / "intact_b.tiff").unlink()

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            self.reads.append((trainer.current_epoch, batch["slide_id"], len(batch["tiles"])))

    dm = SlideDataModule(folder / "m.csv", k=256, mpp=0.5, tile_size=64, val_fraction=0,
                         progress=False, tiling_workers=0)  # fmt: skip
    watch = DeleteAfterFirstEpoch()
    trainer = L.Trainer(accelerator="cpu", max_epochs=3, logger=False, callbacks=[watch],
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(SlideModule("test_resnet", "mean", "binary", lr_schedule="constant"), dm)
    assert trainer.state.finished and trainer.current_epoch == 3
    dropped = dm.problems.dropped
    assert list(dropped) == ["intact_b"] and "disappeared" in dropped["intact_b"]
    by_epoch = {(e, s): n for e, s, n in watch.reads}
    assert by_epoch[(1, "intact_b")] == 0 and by_epoch[(2, "intact_b")] == 0
    assert by_epoch[(2, "intact_a")] == 256 and by_epoch[(2, "broken_tiles")] == 254
    kinds = dm.problems.counts()
    assert kinds == {"tile left out": 2, "slide dropped": 1}
