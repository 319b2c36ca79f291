"""Summarise a sweep: ``python -m lightning_wsi.summarize outputs/sweeps/<date>``.

Collects every run's ``summary.json`` under the folder and prints, per K and per way the run was
parallelised (devices, chunk size) and trained (end to end or frozen encoder), the final training
loss, validation loss and validation AUROC with a 95% CI, averaged over the runs (seeds, splits).
The CI is the t-interval over runs when there are several, the run's own bootstrap CI when there
is one. Writes ``summary.csv`` and ``k_sweep.png`` (the paper's Fig. 4) into the folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from scipy import stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["main", "summarize"]

_COLUMNS = ("train/loss", "val/loss", "val/auroc")


def _stratum(run: dict[str, Any]) -> str:
    chunk = run.get("encode_chunk_size")
    parts = [
        f"{run.get('devices', 1)} device{'s' if run.get('devices', 1) != 1 else ''}",
        f"chunk {chunk}" if chunk else "no chunking",
        "frozen encoder" if run.get("freeze_encoder") else "end to end",
    ]
    return ", ".join(parts)


def _mean_ci(values: list[float], single_ci: tuple[float, float]) -> tuple[float, float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan, math.nan
    mean = float(np.mean(values))
    if len(values) == 1:
        return mean, *single_ci
    half = stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def summarize(sweep: Path) -> list[dict[str, Any]]:
    """One row per (stratum, K), sorted; also writes ``summary.csv`` and ``k_sweep.png``."""
    runs = [json.loads(p.read_text()) for p in sorted(sweep.rglob("summary.json"))]
    if not runs:
        raise FileNotFoundError(f"no summary.json under {sweep}: is it a training sweep folder?")
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for run in runs:
        groups[(_stratum(run), int(run["K"]))].append(run)
    rows = []
    for (stratum, k), members in sorted(groups.items()):
        row: dict[str, Any] = {"stratum": stratum, "K": k, "runs": len(members)}
        for column in _COLUMNS:
            values = [float(m.get(column, math.nan)) for m in members]
            single = (
                float(members[0].get(f"{column}_low", math.nan)),
                float(members[0].get(f"{column}_high", math.nan)),
            )
            row[column], row[f"{column} low"], row[f"{column} high"] = _mean_ci(values, single)
        rows.append(row)
    with open(sweep / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    _plot(rows, sweep / "k_sweep.png")
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    titles = {"train/loss": "final training loss", "val/loss": "validation loss",
              "val/auroc": "validation AUROC (95% CI)"}  # fmt: skip
    for stratum in sorted({r["stratum"] for r in rows}):
        mine = sorted((r for r in rows if r["stratum"] == stratum), key=lambda r: r["K"])
        ks = [r["K"] for r in mine]
        for ax, column in zip(axes, _COLUMNS, strict=True):
            values = np.array([r[column] for r in mine])
            low = np.array([r[f"{column} low"] for r in mine])
            high = np.array([r[f"{column} high"] for r in mine])
            errors = np.nan_to_num(np.stack([values - low, high - values]).clip(min=0))
            ax.errorbar(ks, values, yerr=errors, marker="o", capsize=3, label=stratum)
    for ax, column in zip(axes, _COLUMNS, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (tiles per slide in training)")
        ax.set_title(titles[column])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``lightning-wsi-summarize``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m lightning_wsi.summarize", description=__doc__)
    parser.add_argument("sweep", type=Path, help="a multirun folder, e.g. outputs/sweeps/<date>")
    args = parser.parse_args(argv)
    try:
        rows = summarize(args.sweep)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    header = f"{'stratum':<40} {'K':>5} {'runs':>4} {'train loss':>11} {'val loss':>9} "
    print(header + "val AUROC [95% CI]")
    for r in rows:
        print(
            f"{r['stratum']:<40} {r['K']:>5} {r['runs']:>4} {r['train/loss']:>11.4f} "
            f"{r['val/loss']:>9.4f} {r['val/auroc']:.3f} "
            f"[{r['val/auroc low']:.3f}, {r['val/auroc high']:.3f}]"
        )
    print(f"table: {args.sweep / 'summary.csv'}\nplot: {args.sweep / 'k_sweep.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
