"""The tile and summarize commands on hostile input: one line and exit code 2, or a result."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy import stats

from lightning_wsi import summarize, tile
from lightning_wsi.data import make_synthetic_dataset

TILE = ["--mpp", "2.0", "--tile-size", "56", "--workers", "0"]


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Path:
    """Two real pyramidal slides and their manifest (read only: tests write elsewhere)."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("slides"), n_slides=2, progress=False)


def _manifest(folder: Path, rows: list[tuple[str, str]], name: str = "m.csv") -> Path:
    path = folder / name
    path.write_text("slide_id,path,label\n" + "".join(f"{i},{p},1\n" for i, p in rows))
    return path


def _bad_list(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


# ----------------------------------------------------------------------------------- tile
def test_tile_prints_the_tiles_per_slide_it_cached(slides, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert tile.main(["--manifest", str(slides), "--cache-dir", str(cache), *TILE]) == 0
    counts = sorted(json.loads(p.read_text())["n_tiles"] for p in cache.glob("*.json"))
    assert len(counts) == 2 and counts[0] > 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"2 usable slides, tiles per slide min/median/max {counts[0]}/{counts[1]}/{counts[1]}; "
        f"0 skipped; cache: {cache}"
    )


def test_tile_writes_clam_files_that_read_back_as_the_same_tiles(slides, tmp_path, capsys):
    import h5py

    from lightning_wsi.data.external_tiling import read_external_tiling
    from lightning_wsi.data.tiling import tile_slide

    out = tmp_path / "clam"
    args = ["--manifest", str(slides), "--cache-dir", str(tmp_path / "c"), "--clam-h5", str(out)]
    assert tile.main([*args, *TILE]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"2 CLAM coordinate files in {out}"
    with open(slides) as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        path, h5 = str(slides.parent / row["path"]), out / f"{row['slide_id']}.h5"
        with h5py.File(h5) as f:  # CLAM's layout: a coords dataset with its attributes
            assert f["coords"].shape[1] == 2 and f["coords"].attrs["patch_level"] == 0
        ours = tile_slide(path, mpp=2.0, tile_size=56)
        back = read_external_tiling(h5, path, 2.0, 56)
        assert back.coords.tolist() == ours.coords.tolist()


def test_tile_with_no_usable_slide_is_one_line_and_exit_2(slides, tmp_path, capsys):
    manifest = _manifest(tmp_path, [("a", "gone.svs"), ("b", "slides/gone.tiff")])
    cache = tmp_path / "cache"
    args = ["--manifest", str(manifest), "--cache-dir", str(cache), *TILE]
    assert tile.main([*args, "--on-bad-slide", "skip"]) == 2
    listing = cache / "m.bad_slides.csv"
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"error: no usable slide in manifest {manifest}: 2 of 2 slides are bad "
        f"(listed in {listing})"
    )
    assert "Traceback" not in err
    rows = _bad_list(listing)
    assert rows[0] == ["slide_id", "path", "reason"]
    assert [r[:2] for r in rows[1:]] == [
        ["a", str(tmp_path / "gone.svs")],
        ["b", str(tmp_path / "slides/gone.tiff")],
    ]
    assert all("file not found" in r[2] for r in rows[1:])
    # on_bad_slide="raise": the same slides are one line naming the first and the fix
    assert tile.main(args) == 2
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert line.startswith(
        f"error: 2 slides in manifest {manifest} cannot be used (first: a ({tmp_path / 'gone.svs'}"
    )
    assert line.endswith(
        f"; listed in {listing}. Fix or remove these rows, or pass --on-bad-slide skip to go on "
        "without them"
    )


def test_tile_lists_skipped_slides_and_drops_a_stale_list(slides, tmp_path, capsys):
    good = slides.parent / next(csv.DictReader(slides.open()))["path"]
    cache = tmp_path / "cache"
    args = ["--cache-dir", str(cache), "--on-bad-slide", "skip", *TILE]
    manifest = _manifest(tmp_path, [("good", str(good)), ("gone", "gone.svs")])
    assert tile.main(["--manifest", str(manifest), *args]) == 0
    listing = cache / "m.bad_slides.csv"
    assert f"; 1 skipped (listed in {listing}); cache: {cache}" in capsys.readouterr().out
    assert [r[0] for r in _bad_list(listing)] == ["slide_id", "gone"]
    _manifest(tmp_path, [("good", str(good))])
    assert tile.main(["--manifest", str(manifest), *args]) == 0
    assert "; 0 skipped; cache:" in capsys.readouterr().out
    assert not listing.exists()


def test_tile_of_a_manifest_without_rows_asks_nothing_and_exits_0(tmp_path, capsys):
    manifest = _manifest(tmp_path, [])
    assert tile.main(["--manifest", str(manifest), "--cache-dir", str(tmp_path), *TILE]) == 0
    assert capsys.readouterr().out.strip() == f"manifest {manifest} lists no slide: nothing to tile"


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (None, "manifest not found: {path}"),
        ("dir",
         "manifest {path} is a directory; give the CSV file in it, e.g. {path}/manifest.csv"),
        (b"slide_id,file\na,a.svs\n",
         "manifest {path} lacks column(s) ['path']; it has ['slide_id', 'file']. "
         "Required: ['slide_id', 'path'], optional: "  # tiling needs no label
         "['split', 'mpp', 'patient_id', 'time', 'event', 'coords']"),
        ("slide_id,path,label\nb,é.svs,1\n".encode("latin-1"),
         "manifest {path} is not UTF-8 text (byte 0xe9 on line 2); save it as CSV UTF-8 "
         "(in Excel: Save As > CSV UTF-8)"),
    ],
    ids=["missing", "directory", "columns", "latin-1"],
)  # fmt: skip
def test_tile_on_a_bad_manifest_is_one_line_and_exit_2(tmp_path, capsys, write, expected):
    path = tmp_path / "slides.csv"
    if write == "dir":
        path.mkdir()
    elif write is not None:
        path.write_bytes(write)
    assert tile.main(["--manifest", str(path), *TILE]) == 2
    assert capsys.readouterr().err == "error: " + expected.format(path=path) + "\n"


def test_tile_refuses_impossible_numbers(capsys):
    for option, value, expected in [
        ("--mpp", "0", "must be a number > 0, got 0"),
        ("--mpp", "nan", "must be a number > 0, got nan"),
        ("--tile-size", "0", "must be a number >= 1, got 0"),
        ("--min-tissue-fraction", "1.5", "must be a number >= 0 and <= 1, got 1.5"),
    ]:
        with pytest.raises(SystemExit) as caught:
            tile.main([option, value])
        assert caught.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"argument {option}: {expected}")


# ------------------------------------------------------------------------------ summarize
_BASE = {"devices": 1, "encode_chunk_size": None, "freeze_encoder": False}
_STRATUM = "1 device, no chunking, end to end"


def _run(sweep: Path, name: str, text: str | None = None, **summary) -> Path:
    folder = sweep / name
    folder.mkdir(parents=True)
    path = folder / "summary.json"
    path.write_text(text if text is not None else json.dumps({**_BASE, **summary}))
    return path


def _metrics(train: float | None, val: float | None, auroc: float | None, **more) -> dict:
    return {"train/loss": train, "val/loss": val, "val/auroc": auroc, **more}


def test_summarize_skips_bad_files_by_name_and_counts_the_runs(tmp_path, capsys):
    for i, auroc in enumerate((0.6, 0.7, 0.8)):
        _run(tmp_path, f"good{i}", K=8, **_metrics(0.5, 0.6, auroc))
    bad = {
        "truncated": ('{"K": 8, "train/lo', "is not valid JSON (Unterminated string starting at: "
                      "line 1 column 10; truncated?)"),
        "list": ("[1, 2]", "is not a JSON object but a list"),
        "no_k": ('{"val/loss": 0.5}', "has no 'K' (tiles per slide): not a training run's "
                 "summary"),
        "text_k": ('{"K": "8"}', "has 'K' '8', not a positive integer or 'all'"),
    }  # fmt: skip
    paths = {name: _run(tmp_path, name, text) for name, (text, _) in bad.items()}
    (tmp_path / "folder" / "summary.json").mkdir(parents=True)
    assert summarize.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert sorted(err.splitlines()) == sorted(
        [f"skipped {paths[n]}: {why}" for n, (_, why) in bad.items()]
        + [f"skipped {tmp_path / 'folder' / 'summary.json'}: cannot be read (Is a directory)"]
    )
    assert "used 3 runs of 8 summary.json files (5 skipped)" in out.splitlines()
    assert f"{_STRATUM:<40} {8:>5} {3:>4} {'0.5000':>11} {'0.6000':>9} 0.700 " in out


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        ("missing", "no summary.json under {sweep}: the folder does not exist"),
        ("empty", "no summary.json under {sweep}: is it a training sweep folder?"),
        ("bad", "none of the 2 summary.json files under {sweep} can be used (each is named above "
                "with why)"),
    ],
)  # fmt: skip
def test_summarize_with_nothing_usable_is_one_line_and_exit_2(tmp_path, capsys, make, expected):
    sweep = tmp_path / "sweep"
    if make != "missing":
        sweep.mkdir()
    if make == "bad":
        _run(sweep, "0", "{")
        _run(sweep, "1", "null")
    assert summarize.main([str(sweep)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: " + expected.format(sweep=sweep)
    assert not (sweep / "summary.csv").exists()


def test_intervals_only_where_they_mean_something(tmp_path, capsys):
    nan = math.nan
    _run(
        tmp_path,
        "k1",
        K=1,
        **_metrics(0.5, 0.4, 0.8, **{"val/auroc_low": 0.6, "val/auroc_high": 0.95}),
    )
    _run(
        tmp_path,
        "k2",
        K=2,
        **_metrics(
            0.5,
            0.4,
            0.8,
            **{
                "val/auroc_low": None,
                "val/auroc_high": None,
                "val/auroc_note": "2 validation slides:\nno bootstrap",
            },
        ),
    )
    _run(tmp_path, "k4", K=4, **_metrics(0.5, 0.4, 0.8, **{"val/auroc_low": 0.6}))
    for i, auroc in enumerate((0.6, 0.8)):
        _run(tmp_path, f"k8_{i}", K=8, **_metrics(0.5, 0.4, auroc))
    for i, auroc in enumerate((0.6, 0.7, 0.8)):
        _run(tmp_path, f"k16_{i}", K=16, **_metrics(0.5, 0.4, auroc))
    for i, auroc in enumerate((0.6, nan, 0.8)):
        _run(tmp_path, f"k32_{i}", K=32, **_metrics(0.5, 0.4, auroc))
    assert summarize.main([str(tmp_path)]) == 0
    with open(tmp_path / "summary.csv", newline="") as handle:
        rows = {int(r["K"]): r for r in csv.DictReader(handle)}
    got = {
        k: (float(r["val/auroc"]), float(r["val/auroc low"]), float(r["val/auroc high"]),
            r["val/auroc note"])
        for k, r in rows.items()
    }  # fmt: skip
    half = 4.302652729749462 * 0.1 / math.sqrt(3)  # t(0.975, 2 dof) * sd / sqrt(n)
    assert got[1] == (0.8, 0.6, 0.95, "bootstrap CI of 1 run")
    assert got[16][0] == pytest.approx(0.7, abs=1e-12)
    assert got[16][1:3] == pytest.approx((0.7 - half, 0.7 + half), abs=1e-12)
    assert got[16][3] == "t-interval over 3 runs"
    for k, note in [
        (2, "n=1 run: no interval; 2 validation slides: no bootstrap"),
        (4, "n=1 run: no interval"),
        (8, "n=2 runs: no interval"),
        (32, "n=2 runs: no interval; 1 of 3 runs without a value"),
    ]:
        assert math.isnan(got[k][1]) and math.isnan(got[k][2]) and got[k][3] == note, k
    assert rows[16]["train/loss note"] == "t-interval over 3 runs"
    assert rows[1]["train/loss note"] == "n=1 run: no interval"  # losses have no bootstrap
    lines = capsys.readouterr().out.splitlines()
    assert f"{_STRATUM:<40} {1:>5} {1:>4} {'0.5000':>11} {'0.4000':>9} 0.800 [0.600, 0.950] " \
        "(bootstrap CI of 1 run)" in lines  # fmt: skip
    assert f"{_STRATUM:<40} {8:>5} {2:>4} {'0.5000':>11} {'0.4000':>9} 0.700 " \
        "(n=2 runs: no interval)" in lines  # fmt: skip


def test_a_column_without_values_prints_na(tmp_path, capsys):
    for i in range(2):  # a regression sweep: no AUROC; a run that never validated
        _run(tmp_path, str(i), K=8, **{"train/loss": 0.25, "val/loss": None})
    assert summarize.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{_STRATUM:<40} {8:>5} {2:>4} {'0.2500':>11} {'n/a':>9} n/a" in out.splitlines()
    assert "nan" not in out
    with open(tmp_path / "summary.csv", newline="") as handle:
        [row] = list(csv.DictReader(handle))
    assert row["val/auroc"] == "nan" and row["val/auroc note"] == "no value in 2 runs"


def test_summarize_as_a_function_warns_for_each_skipped_file(tmp_path):
    _run(tmp_path, "good", K=4, **_metrics(0.5, 0.4, 0.8))
    bad = _run(tmp_path, "bad", "3.5")
    with pytest.warns(UserWarning, match=f"skipped {bad}: is not a JSON object but a float"):
        rows = summarize.summarize(tmp_path)
    assert [(r["K"], r["runs"]) for r in rows] == [(4, 1)]


def test_k_sweep_plot_has_plain_tick_labels_and_a_clear_title():
    rows = []
    for k, value in [(8, 0.692900), (16, 0.692901), (32, 0.692902)]:  # offset 1e-6+6.929e-1
        row = {"stratum": _STRATUM, "K": k, "runs": 3}
        for column in ("train/loss", "val/loss", "val/auroc"):
            row |= {column: value, f"{column} low": value - 2e-6, f"{column} high": value + 2e-6}
        rows.append(row)
    fig = summarize.k_sweep_figure(rows)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        assert ax.yaxis.get_offset_text().get_text() == ""
        labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
        assert labels and all(t.replace(".", "").isdigit() for t in labels), labels
        title = ax.title.get_window_extent(renderer)
        assert title.y0 >= ax.get_window_extent(renderer).y1  # above the axes
        assert title.y1 <= fig.bbox.y1  # inside the figure


def test_summarize_reports_the_c_index_of_survival_runs(tmp_path, capsys):
    for i, cindex in enumerate((0.6, 0.7, 0.8)):
        _run(tmp_path, f"run{i}", K=8, **{"train/loss": 1.0, "val/loss": 1.2,
                                          "val/cindex": cindex})  # fmt: skip
    assert summarize.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(out) if line.startswith("stratum"))
    assert out[header].endswith("val C-index [95% CI]")
    half = stats.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert f"0.700 [{0.7 - half:.3f}, {0.7 + half:.3f}]" in out[header + 1]
    with open(tmp_path / "summary.csv") as handle:
        row = next(csv.DictReader(handle))
    assert float(row["val/cindex"]) == pytest.approx(0.7) and "val/auroc" not in row


def test_summarize_keeps_each_way_of_tuning_in_its_own_stratum(tmp_path):
    runs = [
        {**_BASE, "K": 8, **_metrics(0.5, 0.6, 0.7), "finetune": finetune, **extra}
        for finetune, extra in [
            ("full", {}), ("lora", {}), ("llrd", {}), ("frozen", {"freeze_encoder": True}),
            (None, {}), (None, {"freeze_encoder": True}),  # summaries from before the group
        ]
    ]  # fmt: skip
    strata = {row["stratum"]: row["runs"] for row in summarize.summarize(tmp_path, runs)}
    assert strata == {
        _STRATUM: 2,
        "1 device, no chunking, end to end (lora)": 1,
        "1 device, no chunking, end to end (llrd)": 1,
        "1 device, no chunking, frozen encoder": 2,
    }


def test_summarize_puts_k_all_runs_after_every_k(tmp_path):
    runs = [
        {**_BASE, "K": k, **_metrics(0.5, 0.6, auroc)}
        for k, auroc in [(8, 0.6), ("all", 0.9), (64, 0.7), (None, 0.8), (8, 0.7)]
    ]
    rows = summarize.summarize(tmp_path, runs)
    assert [(r["K"], r["runs"]) for r in rows] == [(8, 2), (64, 1), ("all", 2)]
    assert (tmp_path / "k_sweep.png").stat().st_size > 0


def test_t_intervals_are_clipped_to_where_the_metric_can_lie(tmp_path):
    rng = np.random.default_rng()
    # Two perfect runs and one a little below: mean + half > 1 for any drop u (half = 4.3 u / 3)
    aurocs = np.array([1.0, 1.0, 1.0 - rng.uniform(0.05, 0.2)])
    # Two near-zero losses and one large: mean - half < 0 (half > mean whatever the draw)
    losses = np.array([*rng.uniform(0.001, 0.01, 2), rng.uniform(0.5, 1.0)])
    for i in range(3):
        _run(tmp_path, f"run{i}", K=8, **_metrics(0.2, float(losses[i]), float(aurocs[i])))
    [row] = summarize.summarize(tmp_path)
    half = stats.t.ppf(0.975, 2) * np.std(aurocs, ddof=1) / math.sqrt(3)
    assert row["val/auroc"] == pytest.approx(aurocs.mean())
    assert row["val/auroc low"] == pytest.approx(aurocs.mean() - half)
    assert row["val/auroc high"] == 1.0
    assert row["val/auroc note"] == "t-interval over 3 runs, clipped to [0, 1]"
    assert row["val/loss low"] == 0.0 and row["val/loss high"] > losses.mean()
    assert row["val/loss note"] == "t-interval over 3 runs, clipped to [0, inf]"
    assert row["train/loss note"] == "t-interval over 3 runs"  # no spread: nothing to clip


def test_strata_at_the_same_k_sit_side_by_side():
    rows = [
        {"stratum": stratum, "K": 32, "runs": 3,
         **{f"{c}{end}": 0.5 for c in ("train/loss", "val/loss", "val/auroc")
            for end in ("", " low", " high")}}
        for stratum in ("frozen", "lora", "full")
    ]  # fmt: skip
    fig = summarize.k_sweep_figure(rows)
    xs = [bars.lines[0].get_xdata()[0] for bars in fig.axes[0].containers]  # one per stratum
    assert len(xs) == 3 and len(set(xs)) == 3 and all(28 < x < 37 for x in xs)
    plt.close(fig)


# ------------------------------------------------------------------------------ Fig. 4
def _metrics_csv(folder: Path, losses: list[float], steps_per_epoch: int = 2) -> None:
    """A CSVLogger file as training writes it: step rows, one epoch row, one validation row."""
    lines = ["epoch,step,train/loss_epoch,train/loss_step,val/auroc,val/loss"]
    for epoch, loss in enumerate(losses):
        step = (epoch + 1) * steps_per_epoch - 1
        lines += [f"{epoch},{step},,{loss + 0.1},,", f"{epoch},{step},,,0.7,0.6",
                  f"{epoch},{step},{loss},,,"]  # fmt: skip
    (folder / "logs").mkdir()
    (folder / "logs" / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_bootstrap_band_is_the_percentile_of_resampled_mean_curves():
    curves = np.random.default_rng(3).normal(0.5, 0.1, (12, 5))
    mean, low, high = summarize.bootstrap_band(curves, n_boot=500, seed=7)
    picks = np.random.default_rng(7).integers(0, 12, (500, 12))
    means = np.stack([curves[p].mean(axis=0) for p in picks])  # one mean curve per resample
    assert np.array_equal(mean, curves.mean(axis=0))
    assert np.allclose(low, np.percentile(means, 2.5, axis=0), rtol=0, atol=1e-15)
    assert np.allclose(high, np.percentile(means, 97.5, axis=0), rtol=0, atol=1e-15)
    assert (low < mean).all() and (mean < high).all()
    # Two runs: a quarter of the resamples is each run twice, so the band spans the two runs.
    two = np.array([[1.0, 0.5, 0.2], [0.8, 0.7, 0.1]])
    _, low, high = summarize.bootstrap_band(two)
    assert low.tolist() == [0.8, 0.5, 0.1] and high.tolist() == [1.0, 0.7, 0.2]
    assert np.isnan(summarize.bootstrap_band(two[:1])[1]).all()  # one run: no band


def test_fig4_draws_each_stratums_loss_curves_with_their_bootstrap_band(tmp_path, capsys):
    rng = np.random.default_rng(0)
    curves: dict[tuple[int, int], list[list[float]]] = {}
    for devices in (1, 2):
        for k in (8, 32):
            for seed in range(3):
                losses = list(np.sort(rng.uniform(0.1, 0.7, 4))[::-1] * (8 / k) ** 0.2)
                summary = _run(tmp_path, f"d{devices}_k{k}_s{seed}", K=k, devices=devices,
                               split_seed=seed, **_metrics(losses[-1], 0.5, 0.7))  # fmt: skip
                _metrics_csv(summary.parent, losses)
                curves.setdefault((devices, k), []).append(losses)
    _run(tmp_path, "no_logs", K=8, **_metrics(0.3, 0.5, 0.7))  # in the table, not the curves
    _metrics_csv(_run(tmp_path, "short", K=32, devices=2, **_metrics(0.3, 0.5, 0.7)).parent, [0.9])
    assert summarize.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"Fig. 4: {tmp_path / 'fig4.png'}"
    assert (tmp_path / "fig4.png").stat().st_size > 0

    runs, _ = summarize.load_runs(tmp_path)
    found = summarize.loss_curves(runs)
    two = "2 devices, no chunking, end to end"
    assert sorted(found) == [(_STRATUM, 8), (_STRATUM, 32), (two, 8), (two, 32)]
    assert np.array_equal(found[(_STRATUM, 8)], np.array(curves[(1, 8)]))
    assert found[(two, 32)].shape == (4, 1)  # cut to the epochs every run logged
    rows = summarize.summarize(tmp_path, runs)
    fig = summarize.fig4_figure(found, rows, ("train/loss", "val/loss", "val/auroc"))
    panels = [ax for ax in fig.axes if ax.get_title().startswith("training loss: ")]
    assert [ax.get_title() for ax in panels] == [f"training loss: {_STRATUM}",
                                                 f"training loss: {two}"]  # fmt: skip
    line, band = panels[0].lines[0], panels[0].collections[0]
    mean, low, high = summarize.bootstrap_band(np.array(curves[(1, 8)]))
    assert line.get_label() == "K=8 (3 runs)" and np.allclose(line.get_ydata(), mean)
    ys = band.get_paths()[0].vertices[:, 1]
    assert np.isclose(ys.min(), low.min()) and np.isclose(ys.max(), high.max())
    for x, lo, hi in zip(range(1, 5), low, high, strict=True):  # the band at each epoch
        at = band.get_paths()[0].vertices[band.get_paths()[0].vertices[:, 0] == x][:, 1]
        assert np.isclose(at.min(), lo) and np.isclose(at.max(), hi)
    plt.close(fig)
    with open(tmp_path / "runs.csv") as handle:
        per_run = list(csv.DictReader(handle))
    assert len(per_run) == 14 and {r["stratum"] for r in per_run} == {_STRATUM, two}


def test_summarize_without_metrics_files_draws_no_fig4_and_removes_a_stale_one(tmp_path, capsys):
    for i in range(2):
        _run(tmp_path, f"run{i}", K=8, **_metrics(0.5, 0.6, 0.7))
    (tmp_path / "fig4.png").write_bytes(b"an older sweep's figure")
    assert summarize.main([str(tmp_path)]) == 0
    assert "Fig. 4" not in capsys.readouterr().out and not (tmp_path / "fig4.png").exists()
