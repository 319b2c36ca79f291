"""Real cohorts' manifests: several slides per patient, survival columns."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from lightning_wsi.data import ManifestError, SlideDataModule, make_synthetic_dataset

SMALL = {"k": 4, "mpp": 2.0, "tile_size": 56, "progress": False, "tiling_workers": 0}
PATIENTS = ["p0"] * 4 + ["p1"] * 3 + ["p2"] * 2 + ["p3", "p4", "p5"]  # 1-4 slides each


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> list[dict[str, str]]:
    manifest = make_synthetic_dataset(tmp_path_factory.mktemp("cohort"), 12, progress=False)
    with open(manifest) as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["path"] = str(manifest.parent / row["path"])
    return rows


def _write(folder: Path, rows: list[dict[str, str]]) -> Path:
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.mark.parametrize("split_seed", range(4))
def test_a_patients_slides_never_sit_in_two_splits(slides, tmp_path, split_seed) -> None:
    rows = [{**r, "patient_id": p} for r, p in zip(slides, PATIENTS, strict=True)]
    dm = SlideDataModule(_write(tmp_path, rows), split_seed=split_seed, val_fraction=0.3, **SMALL)
    dm.setup("fit")
    split_of = {e.slide_id: name for name, split in dm.splits.items() for e in split}
    assert len(split_of) == 12 and dm.splits["train"] and dm.splits["val"]
    for patient in set(PATIENTS):
        ids = [r["slide_id"] for r, p in zip(slides, PATIENTS, strict=True) if p == patient]
        assert len({split_of[i] for i in ids}) == 1, (patient, [split_of[i] for i in ids])


def test_a_given_split_that_divides_a_patient_is_one_line(slides, tmp_path) -> None:
    rows = [
        {**r, "patient_id": p, "split": "val" if i == 1 else "train"}
        for i, (r, p) in enumerate(zip(slides, PATIENTS, strict=True))
    ]
    dm = SlideDataModule(_write(tmp_path, rows), **SMALL)
    with pytest.raises(ManifestError, match=r"patient 'p0' has slide '.*' in 'train' and slide "):
        dm.setup("fit")


def test_survival_columns_give_time_event_targets_and_bad_rows_say_why(slides, tmp_path) -> None:
    rows = [
        {"slide_id": r["slide_id"], "path": r["path"], "time": f"{3 + i}.5", "event": str(i % 2)}
        for i, r in enumerate(slides)
    ]
    rows[0]["time"] = ""
    rows[1]["time"] = "-2"
    rows[2]["event"] = "2"
    dm = SlideDataModule(_write(tmp_path, rows), task="survival", on_bad_slide="skip", **SMALL)
    dm.setup("fit")
    reasons = {b.slide_id: b.reason for b in dm.bad_slides}
    assert reasons == {
        rows[0]["slide_id"]: "survival time is missing: give the follow-up time (> 0) in column "
        "`time`",
        rows[1]["slide_id"]: "survival time '-2' is not a positive number: give the follow-up "
        "time (> 0) in column `time`",
        rows[2]["slide_id"]: "survival event '2' is not 0 or 1: column `event` is 1 (observed) "
        "or 0 (censored)",
    }
    targets = dm.training_targets()
    assert targets and all(isinstance(t, tuple) and t[0] > 3 and t[1] in (0.0, 1.0)
                           for t in targets)  # fmt: skip
    item = next(iter(dm.train_dataloader()))
    assert item["target"].dtype == torch.float32 and item["target"].shape == (2,)


def test_a_survival_manifest_without_time_and_event_columns_is_one_line(slides, tmp_path) -> None:
    rows = [{k: r[k] for k in ("slide_id", "path", "label")} for r in slides]
    dm = SlideDataModule(_write(tmp_path, rows), task="survival", **SMALL)
    with pytest.raises(ManifestError, match=r"lacks column\(s\) \['time', 'event'\]"):
        dm.setup("fit")


def test_a_patient_bag_samples_over_the_union_of_its_slides(slides, tmp_path) -> None:
    pairs = [r for r in slides if r["label"] == "0"][:2] + [r for r in slides if r["label"] == "1"][
        :2
    ]
    rows = [{**r, "patient_id": f"patient_{r['label']}"} for r in pairs]
    dm = SlideDataModule(_write(tmp_path, rows), bag="patient", val_fraction=0, **{
        **SMALL, "k": 64})  # fmt: skip
    dm.setup("fit")
    bags = dm.splits["train"]
    assert sorted(b.slide_id for b in bags) == ["patient_0", "patient_1"]
    bag = bags[0]
    item = next(iter(dm.train_dataloader()))
    bag = next(b for b in bags if b.slide_id == item["slide_id"])
    assert item["slide_ids"] == [m.slide_id for m in bag.members] and len(bag.members) == 2
    assert len(item["tiles"]) == 64 and set(item["slide_index"].tolist()) == {0, 1}
    # every tile's coordinates are those of the member slide it came from
    for t, m, xy in zip(item["tile_index"], item["slide_index"], item["coords"], strict=True):
        start = 0 if m == 0 else len(bag.members[0].tiles)
        assert xy.tolist() == bag.members[m].tiles.coords[int(t) - start].tolist()


def test_a_patient_whose_slides_disagree_is_one_line(slides, tmp_path) -> None:
    rows = [{**r, "patient_id": "p"} for r in slides[:6]]  # both labels among them
    dm = SlideDataModule(_write(tmp_path, rows), bag="patient", val_fraction=0, **SMALL)
    with pytest.raises(ManifestError, match=r"the slides of patient 'p' disagree on the label"):
        dm.setup("fit")


def test_a_coords_column_tiles_exactly_the_files_places(slides, tmp_path) -> None:
    from lightning_wsi.data.external_tiling import write_clam_h5
    from lightning_wsi.data.tiling import tile_slide

    own = tile_slide(slides[0]["path"], mpp=2.0, tile_size=56)
    chosen = own.__class__(**{**own.__dict__, "coords": own.coords[::3]})
    (tmp_path / "patches").mkdir()
    h5 = write_clam_h5(tmp_path / "patches" / "slide0.h5", chosen, slides[0]["path"])
    rows = [{**r, "coords": str(h5) if i == 0 else ""} for i, r in enumerate(slides[:4])]
    dm = SlideDataModule(_write(tmp_path, rows), val_fraction=0, **SMALL)
    dm.setup("fit")
    entry = next(e for e in dm.splits["train"] if e.slide_id == slides[0]["slide_id"])
    assert entry.tiles.coords.tolist() == own.coords[::3].tolist()
