"""Summarise a sweep: ``python -m lightning_wsi.summarize outputs/sweeps/<date>``.

Collects every run's ``summary.json`` under the folder and prints, per K and per way the run was
parallelised (devices, chunk size) and trained (end to end or frozen encoder), the final training
loss, validation loss and validation AUROC, averaged over the runs (seeds, splits), and how many
runs it used. A ``summary.json`` that cannot be used (not JSON, not an object, no integer ``K``)
is skipped with one line naming it and why. Writes ``summary.csv``, ``runs.csv`` (one row per
run) and ``k_sweep.png`` into the folder, and, when runs have their ``logs/metrics.csv``,
``fig4.png``: the paper's Fig. 4 panels in one figure (training-loss curves per K over the
epochs with 95% bootstrap bands over runs, one panel per stratum, so 1 device and 2
slide-parallel devices sit side by side; then final training loss, validation loss and the
validation score against K with their intervals).

Intervals are given only where they mean something: the 95% t-interval over runs needs at least
3 runs with a value (with 2 the t-interval has 1 degree of freedom and is 12.7 standard errors
wide); a single run shows its own bootstrap CI when its ``summary.json`` has finite bounds.
Otherwise the bounds are NaN and the row's note says why, in the table and in ``summary.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from lightning_wsi.reports import epoch_series  # noqa: E402

__all__ = [
    "MIN_RUNS_FOR_INTERVAL",
    "SweepError",
    "bootstrap_band",
    "fig4_figure",
    "k_sweep_figure",
    "loss_curves",
    "load_runs",
    "main",
    "summarize",
]

MIN_RUNS_FOR_INTERVAL = 3  # a t-interval over fewer runs is too wide to say anything
_COLUMNS = ("train/loss", "val/loss", "val/auroc")
# The score a task reports: AUROC (binary), C-index (survival), quadratic kappa (ordinal).
_SCORES = ("val/auroc", "val/cindex", "val/qwk")
_TITLES = {"train/loss": "final training loss", "val/loss": "validation loss",
           "val/auroc": "validation AUROC", "val/cindex": "validation C-index",
           "val/qwk": "validation quadratic kappa"}  # fmt: skip
_SHORT = {"val/auroc": "val AUROC", "val/cindex": "val C-index", "val/qwk": "val QWK"}
# Where each metric can lie: a t-interval is clipped to it (a mean of AUROCs near 1 over 3 runs
# otherwise reads as "up to 1.14"). Losses here are all >= 0: cross-entropy, BCE, MSE and Cox's
# negative log partial likelihood.
_RANGES = {"train/loss": (0.0, math.inf), "val/loss": (0.0, math.inf), "val/auroc": (0.0, 1.0),
           "val/cindex": (0.0, 1.0), "val/qwk": (-1.0, 1.0)}  # fmt: skip
_DODGE = 0.05  # log2 units between strata drawn at the same K, so error bars do not overlap


def score_column(runs: Sequence[dict[str, Any]]) -> str:
    """The sweep's score: the first of AUROC, C-index and kappa that some run reports."""
    for column in _SCORES:
        if any(math.isfinite(_number(run.get(column))) for run in runs):
            return column
    return "val/auroc"


_NOTE_CHARS = 200  # a run's own note, as shown in a row


class SweepError(ValueError):
    """Not one ``summary.json`` of the sweep can be used."""


def load_runs(sweep: Path) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """The usable runs of a sweep folder, and each skipped ``summary.json`` with why.

    Raises:
        FileNotFoundError: the folder does not exist or holds no ``summary.json``.
    """
    sweep = Path(sweep)
    if not sweep.is_dir():
        why = "it is not a folder" if sweep.exists() else "the folder does not exist"
        raise FileNotFoundError(f"no summary.json under {sweep}: {why}")
    paths = sorted(sweep.rglob("summary.json"))
    if not paths:
        raise FileNotFoundError(f"no summary.json under {sweep}: is it a training sweep folder?")
    runs, skipped = [], []
    for path in paths:
        run = _load_run(path)
        if isinstance(run, str):
            skipped.append((path, run))
        else:
            run[RUN_DIR] = path.parent  # where its logs/metrics.csv is (not the file's "outputs")
            runs.append(run)
    return runs, skipped


RUN_DIR = "_run_dir"  # the key load_runs adds to each run: the folder of its summary.json


def _load_run(path: Path) -> dict[str, Any] | str:
    """One run's summary, or why it cannot be used."""
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    except UnicodeDecodeError:
        return "is not UTF-8 text"
    except json.JSONDecodeError as err:
        return f"is not valid JSON ({err.msg}: line {err.lineno} column {err.colno}; truncated?)"
    except RecursionError:
        return "is JSON nested too deeply"
    if not isinstance(run, dict):
        return f"is not a JSON object but a {type(run).__name__}"
    if "K" not in run:
        return "has no 'K' (tiles per slide): not a training run's summary"
    if not _is_count(run["K"]) and _k(run["K"]) != ALL:
        return f"has 'K' {_shorten(repr(run['K']))}, not a positive integer or 'all'"
    return run


ALL = "all"  # K=all (or null): every tissue tile of each slide in training


def _k(value: Any) -> int | str:
    """A run's K as an int, or ``"all"`` for a run on every tile (``K=all`` or ``K=null``)."""
    if value is None or (isinstance(value, str) and value.strip().lower() == ALL):
        return ALL
    return int(value) if _is_count(value) else value


def _k_order(k: int | str) -> float:
    return math.inf if k == ALL else float(k)


def _is_count(value: Any) -> bool:
    """A positive integer, as JSON may write one (``8`` or ``8.0``); not a boolean."""
    if isinstance(value, float):
        return value.is_integer() and value >= 1
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def summarize(sweep: Path, runs: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per (stratum, K), sorted; also writes ``summary.csv`` and ``k_sweep.png``.

    ``runs`` (as :func:`load_runs` returns them) default to those of ``sweep``, with a warning
    per skipped file. A row
    holds ``stratum``, ``K``, ``runs`` and, per metric, the mean, ``low``/``high`` bounds (NaN
    where no interval is given) and a ``note`` saying which interval it is or why there is none.

    Raises:
        FileNotFoundError: no ``summary.json`` under ``sweep``.
        SweepError: none of them can be used.
    """
    sweep = Path(sweep)
    if runs is None:
        runs, skipped = load_runs(sweep)
        for path, why in skipped:
            warnings.warn(f"skipped {path}: {why}", stacklevel=2)
    if not runs:
        raise SweepError(f"no usable summary.json under {sweep}")
    columns = ("train/loss", "val/loss", score_column(runs))
    rows = _rows(runs, columns)
    _write_csv(rows, sweep / "summary.csv")
    _write_csv(_run_rows(runs, columns), sweep / "runs.csv")
    _save(k_sweep_figure(rows, columns), sweep / "k_sweep.png")
    curves = loss_curves(runs)
    (sweep / FIG4).unlink(missing_ok=True)  # never leave a stale figure of another sweep
    if curves:
        _save(fig4_figure(curves, rows, columns), sweep / FIG4)
    return rows


FIG4 = "fig4.png"
_BOOTSTRAP = 1000  # resamples of the runs for a training-loss band
_METRICS_KEY = "train/loss_epoch"


def _save(figure: Figure, path: Path) -> None:
    try:
        figure.savefig(path, dpi=120)
    finally:
        plt.close(figure)


def _run_rows(runs: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """One row per run: its stratum, K, seeds and metrics (NaN where it has none)."""
    rows = []
    for run in runs:
        row = {"stratum": _stratum(run), "K": _k(run["K"])}
        row |= {key: _shorten(run.get(key, "")) for key in ("seed", "split_seed")}
        row |= {column: _number(run.get(column)) for column in columns}
        row["run"] = _shorten(Path(run.get(RUN_DIR, "")).name)
        rows.append(row)
    return sorted(rows, key=lambda r: (r["stratum"], _k_order(r["K"]), r["split_seed"], r["seed"]))


def _epoch_losses(metrics_csv: Path) -> dict[int, float]:
    """The first ``train/loss_epoch`` logged per epoch of a ``CSVLogger`` file; {} if unreadable
    (a run without logs, or a file that is not such a CSV, is simply left out of the curves)."""
    try:
        series = epoch_series(metrics_csv, _METRICS_KEY)
    except (OSError, UnicodeDecodeError, csv.Error):
        return {}
    losses: dict[int, float] = {}
    for epoch, value in series:
        if epoch >= 0 and math.isfinite(value) and epoch not in losses:
            losses[epoch] = value
    return losses


def loss_curves(
    runs: Sequence[dict[str, Any]],
) -> dict[tuple[str, int | str], np.ndarray]:
    """Training loss per epoch of each (stratum, K): ``[runs, epochs]`` float arrays.

    Reads each run's ``logs/metrics.csv`` beside its ``summary.json`` (``load_runs`` records the
    folder). Curves are cut to the epochs every run of the group logged, from epoch 0; a run
    without a readable file is left out, and a group without any run is absent.
    """
    groups: dict[tuple[str, int | str], list[dict[int, float]]] = defaultdict(list)
    for run in runs:
        if RUN_DIR not in run:
            continue
        losses = _epoch_losses(Path(run[RUN_DIR]) / "logs" / "metrics.csv")
        if losses:
            groups[(_stratum(run), _k(run["K"]))].append(losses)
    curves = {}
    for key, members in groups.items():
        epochs = 0
        while all(epochs in m for m in members):
            epochs += 1
        if epochs:
            curves[key] = np.array([[m[e] for e in range(epochs)] for m in members], float)
    return dict(sorted(curves.items(), key=lambda g: (g[0][0], _k_order(g[0][1]))))


def bootstrap_band(
    curves: np.ndarray, n_boot: int = _BOOTSTRAP, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean curve over runs and its percentile bootstrap band, each ``[epochs]``.

    ``curves`` is ``[runs, epochs]``. Each of ``n_boot`` resamples draws ``runs`` rows with
    replacement (``numpy.random.default_rng(seed).integers(0, runs, (n_boot, runs))``) and
    averages them; the band is the ``(1 - level) / 2`` and ``(1 + level) / 2`` percentiles of
    those means per epoch. With one run the band is NaN (nothing to resample).
    """
    curves = np.asarray(curves, dtype=float)
    if curves.ndim != 2 or curves.shape[0] < 1:
        raise ValueError(f"expected curves as [runs, epochs] with runs >= 1, got {curves.shape}")
    mean = curves.mean(axis=0)
    if curves.shape[0] < 2:
        nan = np.full_like(mean, np.nan)
        return mean, nan, nan
    picks = np.random.default_rng(seed).integers(0, curves.shape[0], (n_boot, curves.shape[0]))
    means = curves[picks].mean(axis=1)  # [n_boot, epochs]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail], axis=0)
    return mean, low, high


def fig4_figure(
    curves: dict[tuple[str, int | str], np.ndarray],
    rows: Sequence[dict[str, Any]],
    columns: Sequence[str] = _COLUMNS,
) -> Figure:
    """The paper's Fig. 4: top, the training loss over epochs per K (mean over runs, 95%
    bootstrap band), one panel per stratum side by side on a shared y axis; below, the metrics
    against K as in :func:`k_sweep_figure`."""
    strata = sorted({stratum for stratum, _ in curves})
    fig = plt.figure(figsize=(max(13, 4.3 * len(strata)), 7.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1)
    axes = np.atleast_1d(top.subplots(1, len(strata), sharey=True))
    ks = sorted({k for _, k in curves}, key=_k_order)
    # K by a sequential colour map, apart from the strata's default colours in the lower row
    shades = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, len(ks)))
    colours = dict(zip(ks, shades, strict=True))
    for ax, stratum in zip(axes, strata, strict=True):
        for (s, k), runs in curves.items():
            if s == stratum:
                _plot_band(ax, runs, f"K={k} ({runs.shape[0]} run{'s' * (runs.shape[0] > 1)})",
                           colours[k])  # fmt: skip
        ax.set_title(f"training loss: {stratum}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("training loss (mean, 95% bootstrap band)")
    k_sweep_figure(rows, columns, fig=bottom)
    return fig


def _plot_band(ax: Any, runs: np.ndarray, label: str, colour: Any) -> None:
    mean, low, high = bootstrap_band(runs)
    epochs = np.arange(1, len(mean) + 1)
    ax.plot(epochs, mean, marker=".", color=colour, label=label)
    if np.isfinite(low).all():
        ax.fill_between(epochs, low, high, color=colour, alpha=0.2, linewidth=0)


def _rows(
    runs: Sequence[dict[str, Any]], columns: Sequence[str] = _COLUMNS
) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int | str], list[dict]] = defaultdict(list)
    for run in runs:
        groups[(_stratum(run), _k(run["K"]))].append(run)
    rows = []
    for (stratum, k), members in sorted(groups.items(), key=lambda g: (g[0][0], _k_order(g[0][1]))):
        row: dict[str, Any] = {"stratum": stratum, "K": k, "runs": len(members)}
        for column in columns:
            keys = (column, f"{column} low", f"{column} high", f"{column} note")
            row.update(zip(keys, _interval(members, column), strict=True))
        rows.append(row)
    return rows


def _stratum(run: dict[str, Any]) -> str:
    chunk = run.get("encode_chunk_size")
    devices = run.get("devices", 1)
    parts = [
        f"{devices} device{'s' if devices != 1 else ''}",
        f"chunk {chunk}" if chunk else "no chunking",
        _training(run),
    ]
    return _shorten(", ".join(str(p) for p in parts))


def _training(run: dict[str, Any]) -> str:
    """``frozen encoder``, ``end to end``, or ``end to end (lora)`` for another way of tuning."""
    finetune = run.get("finetune") or "full"
    if run.get("freeze_encoder") or finetune == "frozen":
        return "frozen encoder"
    return "end to end" if finetune == "full" else f"end to end ({finetune})"


def _interval(members: Sequence[dict[str, Any]], column: str) -> tuple[float, float, float, str]:
    """``(mean, low, high, note)`` of ``column`` over runs; NaN bounds where none is given."""
    finite = [(v, m) for m in members if math.isfinite(v := _number(m.get(column)))]
    n, total = len(finite), len(members)
    if n == 0:
        return math.nan, math.nan, math.nan, f"no value in {total} run{'s' * (total > 1)}"
    gaps = "" if n == total else f"; {total - n} of {total} runs without a value"
    values = [v for v, _ in finite]
    mean = float(np.mean(values))
    if n >= MIN_RUNS_FOR_INTERVAL:
        sem = np.std(values, ddof=1) / math.sqrt(n)
        half = float(stats.t.ppf(0.975, n - 1) * sem)
        low, high = mean - half, mean + half
        floor, ceiling = _RANGES.get(column, (-math.inf, math.inf))
        clipped = ""
        if low < floor or high > ceiling:
            low, high = max(low, floor), min(high, ceiling)
            clipped = f", clipped to [{floor:g}, {ceiling:g}]"
        return mean, low, high, f"t-interval over {n} runs{clipped}{gaps}"
    if n == 1:
        return _single_run(mean, finite[0][1], column, gaps)
    return mean, math.nan, math.nan, f"n={n} runs: no interval{gaps}"


def _single_run(
    value: float, run: dict[str, Any], column: str, gaps: str
) -> tuple[float, float, float, str]:
    """One run's value, with its own bootstrap CI only where the run gives finite bounds."""
    low, high = _number(run.get(f"{column}_low")), _number(run.get(f"{column}_high"))
    if math.isfinite(low) and math.isfinite(high) and low <= high:
        return value, low, high, f"bootstrap CI of 1 run{gaps}"
    why = run.get(f"{column}_note")
    why = f"; {_shorten(why)}" if isinstance(why, str) and why.strip() else ""
    return value, math.nan, math.nan, f"n=1 run: no interval{why}{gaps}"


def _number(value: Any) -> float:
    """A JSON metric as a float; NaN for null, missing, text, booleans and overflowing ints."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return math.nan
    try:
        return float(value)
    except OverflowError:
        return math.nan


def _shorten(text: str) -> str:
    """One line of at most ``_NOTE_CHARS`` characters: a file's text is shown, not trusted."""
    text = " ".join(str(text).split())
    return text if len(text) <= _NOTE_CHARS else text[: _NOTE_CHARS - 3] + "..."


def _write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def k_sweep_figure(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] = _COLUMNS, fig: Any = None
) -> Figure:
    """The K sweep (the paper's Fig. 4): one panel per metric, one line per stratum, 95%
    intervals as error bars where a row has one; tick labels are plain numbers (no offset
    text above the axes, which overlapped the title when values barely differ). Draws into
    ``fig`` (a figure or subfigure) when given."""
    if fig is None:
        fig = plt.figure(figsize=(13, 3.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(columns)))
    finite = [r["K"] for r in rows if r["K"] != ALL]
    at_all = 2.0 * max(finite, default=1)  # where K=all runs sit: right of the largest K
    strata = sorted({r["stratum"] for r in rows})
    for i, stratum in enumerate(strata):
        mine = sorted((r for r in rows if r["stratum"] == stratum), key=lambda r: _k_order(r["K"]))
        dodge = 2.0 ** (_DODGE * (i - (len(strata) - 1) / 2))  # side by side at the same K
        for ax, column in zip(axes, columns, strict=True):
            _plot_stratum(ax, mine, column, stratum, at_all, dodge)
    for ax, column in zip(axes, columns, strict=True):
        ax.set_xscale("log", base=2)
        ticks = sorted(set(finite))  # the swept K as plain numbers, not powers of 2
        extra = [at_all] if len(finite) < len(rows) else []
        ax.set_xticks([*ticks, *extra], [*map(str, ticks), *[ALL] * len(extra)])
        ax.minorticks_off()
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        ax.set_xlabel("K (tiles per slide in training)")
        ax.set_title(f"{_TITLES[column]} (95% CI where given)", pad=8)
        if not any(math.isfinite(r[column]) for r in rows):
            ax.text(0.5, 0.5, "n/a", transform=ax.transAxes, ha="center", va="center")
    axes[0].legend(fontsize=7)
    return fig


def _plot_stratum(
    ax: Any, rows: list[dict[str, Any]], column: str, label: str, at_all: float, dodge: float
) -> None:
    """One stratum's line, its K multiplied by ``dodge``; a point without an interval gets no
    error bar (not a zero one)."""
    values = np.array([r[column] for r in rows], dtype=float)
    low = np.array([r[f"{column} low"] for r in rows], dtype=float)
    high = np.array([r[f"{column} high"] for r in rows], dtype=float)
    errors = np.stack([values - low, high - values]).clip(min=0)  # NaN stays: no bar
    ks = [(at_all if r["K"] == ALL else r["K"]) * dodge for r in rows]
    ax.errorbar(ks, values, yerr=errors, marker="o", capsize=3, label=label)


def _cell(value: float, spec: str) -> str:
    return "n/a" if not math.isfinite(value) else format(value, spec)


def _score_cell(row: dict[str, Any], column: str) -> str:
    value, low, high = row[column], row[f"{column} low"], row[f"{column} high"]
    if not math.isfinite(value):
        return "n/a"
    bounds = f" [{low:.3f}, {high:.3f}]" if math.isfinite(low) and math.isfinite(high) else ""
    return f"{value:.3f}{bounds} ({row[f'{column} note']})"


def _print_table(rows: Sequence[dict[str, Any]]) -> None:
    score = next((c for c in _SCORES if c in rows[0]), "val/auroc")
    header = f"{'stratum':<40} {'K':>5} {'runs':>4} {'train loss':>11} {'val loss':>9} "
    print(header + f"{_SHORT[score]} [95% CI]")
    for r in rows:
        print(
            f"{r['stratum']:<40} {r['K']:>5} {r['runs']:>4} {_cell(r['train/loss'], '.4f'):>11} "
            f"{_cell(r['val/loss'], '.4f'):>9} {_score_cell(r, score)}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``lightning-wsi-summarize``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m lightning_wsi.summarize", description=__doc__)
    parser.add_argument("sweep", type=Path, help="a multirun folder, e.g. outputs/sweeps/<date>")
    args = parser.parse_args(argv)
    try:
        runs, skipped = load_runs(args.sweep)
        for path, why in skipped:
            print(f"skipped {path}: {why}", file=sys.stderr)
        if not runs:
            raise SweepError(
                f"none of the {len(skipped)} summary.json files under {args.sweep} can be used "
                "(each is named above with why)"
            )
        rows = summarize(args.sweep, runs)
    except (FileNotFoundError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a read-only sweep folder: summary.csv or k_sweep.png
        print(f"error: cannot write into {args.sweep}: {err.strerror or err}", file=sys.stderr)
        return 2
    _print_table(rows)
    files = len(runs) + len(skipped)
    print(f"used {len(runs)} runs of {files} summary.json files ({len(skipped)} skipped)")
    print(f"table: {args.sweep / 'summary.csv'} (per run: {args.sweep / 'runs.csv'})")
    print(f"plot: {args.sweep / 'k_sweep.png'}")
    if (args.sweep / FIG4).exists():
        print(f"Fig. 4: {args.sweep / FIG4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
