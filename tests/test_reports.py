"""Reports that can be trusted: AUROC intervals only where they mean something, loss curves
without stray points, known lesions only from our own file, and heatmaps that stay in their
folder, read as calibrated attention and never end a run."""

from __future__ import annotations

import csv
import json
import math
import shutil
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from lightning_wsi.data import make_synthetic_dataset, tile_slide
from lightning_wsi.data.dataset import BagEntry, SlideEntry
from lightning_wsi.data.synthetic import LESIONS_FORMAT
from lightning_wsi.heatmaps import (
    _CMAP,
    attention_colours,
    heatmap_path,
    heatmap_title,
    per_slide,
    relative_attention,
    scale_bar,
    write_heatmaps,
)
from lightning_wsi.reports import (
    AurocCI,
    _loss_figure,
    _roc_figure,
    auroc_ci,
    auroc_with_ci,
    format_auroc,
    known_lesions,
    loss_series,
    plot_loss_curve,
    write_predictions_csv,
)

# ------------------------------------------------------------------------- AUROC and its CI


def _mann_whitney(p: np.ndarray, t: np.ndarray) -> float:
    """AUROC by counting positive-negative pairs, ties as half."""
    pos, neg = p[t == 1][:, None], p[t == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def test_two_close_slides_get_no_interval() -> None:
    ci = auroc_ci([0.4990, 0.4992], [0, 1], n_bootstrap=1000, seed=0)
    assert ci.auroc == 1.0 and math.isnan(ci.low) and math.isnan(ci.high)
    assert not ci.has_interval and ci.resamples == 0
    assert format_auroc(ci) == (
        "val/auroc 1.000  (no interval: 2 slides (1 positive, 1 negative): too few for a "
        "bootstrap interval, need >= 5 per class)"
    )
    assert auroc_with_ci([0.4990, 0.4992], [0, 1])[0] == 1.0
    assert all(math.isnan(v) for v in auroc_with_ci([0.4990, 0.4992], [0, 1])[1:])


def test_interval_is_the_percentile_bootstrap_over_slides() -> None:
    rng = np.random.default_rng(3)
    t = np.array([0, 1] * 8)
    p = np.clip(0.5 + 0.25 * (t - 0.5) + rng.normal(0, 0.2, t.size), 0, 1)
    ci = auroc_ci(p, t, n_bootstrap=400, seed=7)
    assert ci.auroc == pytest.approx(_mann_whitney(p, t), abs=1e-6)
    idx = np.random.default_rng(7).integers(0, t.size, (400, t.size))
    scores = [_mann_whitney(p[i], t[i]) for i in idx if 0 < t[i].sum() < t.size]
    low, high = np.percentile(scores, [2.5, 97.5])
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-6)
    assert ci.has_interval and ci.resamples == len(scores)
    assert format_auroc(ci) == (
        f"val/auroc {ci.auroc:.3f} [{low:.2f}, {high:.2f}]  "
        f"(95% bootstrap CI, {len(scores)} resamples)"
    )


def test_interval_withheld_when_resamples_often_miss_a_class() -> None:
    t = [1] + [0] * 9  # a resample holds the positive with probability 1 - 0.9**10 = 0.65
    ci = auroc_ci(np.linspace(0.9, 0.0, 10), t, n_bootstrap=1000, min_per_class=1)
    assert ci.auroc == 1.0 and not ci.has_interval
    share = int(ci.note.split("%")[0].removeprefix("only "))
    assert 58 <= share <= 72
    assert ci.note == f"only {share}% of 1000 resamples hold both classes, need >= 90%"


def test_classes_that_never_overlap_get_no_zero_width_interval() -> None:
    t = [0] * 6 + [1] * 6
    ci = auroc_ci(np.linspace(0.40, 0.41, 12), t, n_bootstrap=300)
    assert ci.auroc == 1.0 and not ci.has_interval and math.isnan(ci.low)
    assert ci.note == "every resample gives AUROC 1.000: a bootstrap cannot bound it"


def test_formatted_interval_line() -> None:
    line = format_auroc(AurocCI(0.8734, 0.712, 0.968, resamples=1000))
    assert line == "val/auroc 0.873 [0.71, 0.97]  (95% bootstrap CI, 1000 resamples)"


def test_one_class_or_non_finite_scores_have_no_auroc() -> None:
    ci = auroc_ci([0.2, 0.3, 0.9], [0, 0, 0])
    assert math.isnan(ci.auroc)
    assert format_auroc(ci) == "val/auroc n/a  (3 slides, all of class 0: AUROC needs both classes)"
    ci = auroc_ci([0.2, float("nan"), 0.9, 0.1], [0, 1, 1, 0])
    assert math.isnan(ci.auroc) and ci.note == "1 of 4 probabilities are not finite"
    with pytest.raises(ValueError, match=r"binary targets 0 or 1, got \[2.0\]"):
        auroc_ci([0.1, 0.2], [0, 2])


def _legend(fig: plt.Figure) -> list[str]:
    return [t.get_text().replace("\n", " ") for t in fig.axes[0].get_legend().get_texts()]


def test_roc_band_only_with_an_interval() -> None:
    fig, ci = _roc_figure([0.4990, 0.4992], [0, 1], 200, 0, "ROC")
    try:
        legend = _legend(fig)
        assert len(fig.axes[0].collections) == 0  # no fill_between band
        assert legend == [format_auroc(ci, "AUROC")] and "no interval: 2 slides" in legend[0]
    finally:
        plt.close(fig)
    t = [0, 1] * 6
    fig, ci = _roc_figure(np.linspace(0, 1, 12), t, 200, 0, "ROC")
    try:
        assert ci.has_interval and len(fig.axes[0].collections) == 1
        assert _legend(fig) == ["95% bootstrap band", format_auroc(ci, "AUROC")]
    finally:
        plt.close(fig)


def test_predictions_csv_keeps_a_slide_dropped_while_reading(tmp_path: Path) -> None:
    predictions = [
        {"slide_id": "a,1", "probabilities": torch.tensor(0.25), "coords": torch.zeros(3, 2),
         "target": torch.tensor(1)},
        {"slide_id": "b", "status": "dropped", "reason": "file vanished"},
    ]  # fmt: skip
    write_predictions_csv(tmp_path / "p.csv", predictions)
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [
        {"slide_id": "a,1", "status": "ok", "target": "1", "prediction": "0.25", "n_tiles": "3",
         "reason": ""},
        {"slide_id": "b", "status": "dropped", "target": "", "prediction": "", "n_tiles": "0",
         "reason": "file vanished"},
    ]  # fmt: skip


# ------------------------------------------------------------------------------ loss curve


def _metrics_csv(path: Path) -> Path:
    """Rows as Lightning's CSVLogger writes them for 2 epochs, then ``trainer.validate``."""
    rows = [
        {"epoch": "0", "step": "3", "train/loss_epoch": "0.9"},
        {"epoch": "0", "step": "3", "val/loss": "0.8"},
        {"epoch": "1", "step": "7", "train/loss_epoch": "0.6"},
        {"epoch": "1", "step": "7", "val/loss": "0.7"},
        {"epoch": "2", "step": "8", "val/loss": "0.65"},  # validate() after fit
        {"epoch": "", "step": "8", "val/loss": "0.1"},  # hostile: no epoch
    ]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", "train/loss_epoch", "val/loss"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_loss_curve_drops_validation_after_the_last_training_epoch(tmp_path: Path) -> None:
    metrics = _metrics_csv(tmp_path / "metrics.csv")
    series = plot_loss_curve(metrics, tmp_path / "loss.png")
    assert series == {"train": [(0, 0.9), (1, 0.6)], "validation": [(0, 0.8), (1, 0.7)]}
    assert series == loss_series(metrics) and (tmp_path / "loss.png").stat().st_size > 0
    fig = _loss_figure(series)
    try:
        fig.canvas.draw()
        ticks = fig.axes[0].get_xticks()
        assert np.array_equal(ticks, np.round(ticks)) and {1, 2} <= set(ticks.tolist())
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------- known lesions


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small synthetic slides (one positive) at 2 µm/px; returns the dataset folder."""
    root = tmp_path_factory.mktemp("synthetic")
    mpps = {"tiff": 2.0, "svs": 2.0}
    make_synthetic_dataset(root, n_slides=2, mpps=mpps, num_workers=0, progress=False)
    return root


def test_synthetic_lesions_are_marked_and_read(dataset: Path) -> None:
    data = json.loads((dataset / "lesions.json").read_text())
    assert data["format"] == LESIONS_FORMAT == "lightning-wsi/synthetic-lesions-v1"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert known_lesions(dataset) == data["lesions"]
    boxes = next(iter(data["lesions"].values()))
    assert len(data["lesions"]) == 1 and boxes and all(len(b) == 4 for b in boxes)


def test_old_unmarked_lesions_are_upgraded_in_place(dataset: Path, tmp_path: Path) -> None:
    root = tmp_path / "old"
    shutil.copytree(dataset, root)
    marked = json.loads((root / "lesions.json").read_text())["lesions"]
    (root / "lesions.json").write_text(json.dumps(marked))  # as written before the marker
    assert known_lesions(root) == {}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (root / "slides").iterdir()}
    make_synthetic_dataset(
        root, n_slides=2, mpps={"tiff": 2.0, "svs": 2.0}, num_workers=0, progress=False
    )
    assert {p.name: p.stat().st_mtime_ns for p in (root / "slides").iterdir()} == mtimes
    assert known_lesions(root) == marked


@pytest.mark.parametrize(
    "content",
    [
        b'{"a": [[1, 2, 3, 4]]}',  # another tool's lesions.json (or ours before the marker)
        b'{"format": "someone-else/v2", "lesions": {"a": [[1, 2, 3, 4]]}}',
        b"[1, 2, 3]",
        b"not json {",
        b"\xff\xfe\x00garbage",
        b"[" * 100_000,  # nested past the parser's recursion limit
    ],
)
def test_foreign_or_unreadable_lesions_are_ignored_quietly(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "lesions.json").write_bytes(content)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert known_lesions(tmp_path) == {}


def test_absent_or_directory_lesions_give_no_boxes(tmp_path: Path) -> None:
    assert known_lesions(tmp_path) == {}
    (tmp_path / "lesions.json").mkdir()
    assert known_lesions(tmp_path) == {}


@pytest.mark.parametrize(
    ("lesions", "named"),
    [
        ({"syn_001": [[1, 2, 3]]}, "slide 'syn_001'"),
        ({"syn_001": [[1, 2, 3, "4"]]}, "slide 'syn_001'"),
        ({"syn_001": [[1, 2, 3, True]]}, "slide 'syn_001'"),
        ({"syn_001": [[1, 2, 3, float("nan")]]}, "slide 'syn_001'"),
        ({"syn_001": {"x": 1}}, "slide 'syn_001'"),
        ([[1, 2, 3, 4]], "mapping of slide id to boxes"),
    ],
)
def test_malformed_marked_lesions_warn_and_give_no_boxes(
    tmp_path: Path, lesions: object, named: str
) -> None:
    path = tmp_path / "lesions.json"
    path.write_text(json.dumps({"format": LESIONS_FORMAT, "lesions": lesions}))
    with pytest.warns(UserWarning, match="lesions.json") as record:
        assert known_lesions(tmp_path) == {}
    message = str(record[0].message)
    assert str(path) in message and named in message and "without lesion boxes" in message


# -------------------------------------------------------------------------------- heatmaps


def test_uniform_attention_is_one_mid_colour() -> None:
    colours = attention_colours(np.full(37, 1 / 37, dtype=np.float32))
    assert np.ptp(colours) == 0 and colours[0] == pytest.approx(0.5, abs=1e-6)
    r, g, b, _ = plt.get_cmap(_CMAP)(0.5)
    assert max(r, g, b) - min(r, g, b) < 0.02  # neutral (grey-white), not a bright end
    peaked = attention_colours([0.5] + [0.5 / 99] * 99)  # 50x and ~0.5x uniform
    assert peaked[0] == 1.0 and peaked[1] == pytest.approx(np.log2(8 * 100 / 198) / 6)
    assert relative_attention([2.0, 2.0]).tolist() == [1.0, 1.0]  # need not sum to 1
    with pytest.raises(ValueError, match="1 of 3 attention weights are not finite"):
        relative_attention([0.5, float("nan"), 0.5])


@pytest.mark.parametrize(
    ("thumb_mpp", "width", "expected"),
    [(2.0, 1000, (500.0, 250.0)), (8.0, 700, (1000.0, 125.0)), (0.4, 1024, (100.0, 250.0))],
)
def test_scale_bar_length_in_pixels(thumb_mpp: float, width: int, expected: tuple) -> None:
    assert scale_bar(thumb_mpp, width) == pytest.approx(expected)


def test_titles_read_as_probabilities_and_values() -> None:
    binary = {"probabilities": torch.tensor(0.87349), "target": torch.tensor(1)}
    assert heatmap_title("s1", binary) == "s1: P(positive) 0.873, target 1"
    multi = {"probabilities": torch.tensor([0.1004, 0.7, 0.1996]), "target": torch.tensor(2)}
    assert heatmap_title("s2", multi) == "s2: P(class) [0.100, 0.700, 0.200], target 2"
    regression = {"prediction": torch.tensor(2.31042), "target": torch.tensor(2.5)}
    assert heatmap_title("s3", regression) == "s3: prediction 2.310, target 2.5"
    assert heatmap_title("s4", {"probabilities": torch.tensor(0.5)}) == "s4: P(positive) 0.500"


@pytest.fixture(scope="module")
def slide(dataset: Path) -> tuple[str, object]:
    """``(path, tiles)`` of the first synthetic slide, tiled at 2 µm/px, 56 px."""
    path = str(next(iter(sorted((dataset / "slides").iterdir()))))
    return path, tile_slide(path, mpp=2.0, tile_size=56)


def _prediction(slide_id: str, tiles) -> dict:
    k = len(tiles.coords)
    return {
        "slide_id": slide_id,
        "probabilities": torch.tensor(0.7),
        "logits": torch.tensor([0.85]),
        "attention": torch.full((k,), 1 / k),
        "coords": torch.as_tensor(tiles.coords),
        "target": torch.tensor(1),
    }


def test_hostile_ids_write_inside_the_output_folder(tmp_path: Path, slide) -> None:
    path, tiles = slide
    ids = ["../../x", "/abs/x", "a/b", "a_b", "syn_000"]
    entries = {i: SlideEntry(i, path, 1, tiles) for i in ids}
    run = tmp_path / "deep" / "run"
    out = run / "heatmaps"
    failures: list = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        written = write_heatmaps([_prediction(i, tiles) for i in ids], entries, out, {}, failures)
    assert failures == [] and len(written) == len(set(written)) == 5
    assert all(p.parent == out and p.is_file() for p in written)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    assert [p.name for p in run.iterdir()] == ["heatmaps"]  # nothing beside or above it
    assert [p.name for p in tmp_path.iterdir()] == ["deep"] and not Path("/abs/x.png").exists()
    assert written[3].name == "a_b.png" and written[4].name == "syn_000.png"  # safe: plain
    assert written[2].name.startswith("a_b-") and written[0].name.startswith("x-")
    assert written == [heatmap_path(out, i) for i in ids]


def test_failed_heatmaps_warn_are_returned_and_do_not_stop_the_rest(tmp_path: Path, slide) -> None:
    path, tiles = slide
    broken = tmp_path / "broken.tiff"
    broken.write_bytes(b"not a slide")
    entries = {
        "good": SlideEntry("good", path, 1, tiles),
        "unreadable": SlideEntry("unreadable", str(broken), 1, tiles),
        "nan": SlideEntry("nan", path, 1, tiles),
    }
    preds = [_prediction(i, tiles) for i in ("unreadable", "missing", "nan", "good")]
    preds[2]["attention"][0] = float("nan")
    failures: list = []
    with pytest.warns(UserWarning) as record:
        written = write_heatmaps(preds, entries, tmp_path / "heatmaps", None, failures)
    assert [p.name for p in written] == ["good.png"]
    assert [sid for sid, _ in failures] == ["unreadable", "missing", "nan"]
    assert "OpenSlide cannot read" in failures[0][1] and str(broken) in failures[0][1]
    assert failures[1][1] == "no slide entry with this id among the slides given"
    assert "attention weights are not finite" in failures[2][1]
    messages = [str(w.message) for w in record]
    for sid, reason in failures:
        assert f"heatmap of slide {sid!r} not written: {reason}" in messages


def test_a_patient_bag_gets_one_heatmap_per_slide(tmp_path: Path, slide) -> None:
    path, tiles = slide
    members = (SlideEntry("s1", path, 1, tiles), SlideEntry("s2", path, 1, tiles))
    bag = BagEntry("patient", 1, members)
    k = len(tiles.coords)
    pred = _prediction("patient", tiles)
    pred["coords"] = torch.cat([pred["coords"], pred["coords"][:3]])  # 3 tiles of s2 too
    pred["attention"] = torch.full((k + 3,), 1.0 / (k + 3))
    pred["slide_index"] = torch.tensor([0] * k + [1] * 3)
    pieces = per_slide(pred, {"patient": bag})
    assert [p["slide_id"] for p in pieces] == ["s1", "s2"]
    assert len(pieces[0]["coords"]) == k and len(pieces[1]["attention"]) == 3
    written = write_heatmaps([pred], {"patient": bag}, tmp_path)
    assert [p.name for p in written] == ["s1.png", "s2.png"]
