"""The slide manifest: a CSV with ``slide_id``, ``path``, ``label`` and optional ``split``, ``mpp``.

Reading checks the columns and every row, and collects every problem with the slide it belongs
to, so one run reports all bad rows at once instead of dying on the first.
"""

from __future__ import annotations

import csv
import io
import math
import os
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "BadSlide",
    "ManifestError",
    "SlideRecord",
    "TASKS",
    "SPLITS",
    "parse_survival",
    "parse_target",
    "read_manifest",
    "stratified_split",
]

REQUIRED_COLUMNS = ("slide_id", "path", "label")
SPLITS = ("train", "val", "test")
TASKS = ("binary", "multiclass", "regression", "ordinal", "survival")
OPTIONAL_COLUMNS = ("split", "mpp", "patient_id", "time", "event", "coords")


class ManifestError(ValueError):
    """The manifest itself is unusable (missing, not UTF-8 CSV text, missing columns, duplicate
    ids, an empty split)."""


@dataclass(frozen=True)
class SlideRecord:
    """One manifest row; ``path`` is resolved against the manifest's folder."""

    slide_id: str
    path: str
    label: str
    split: str | None = None
    mpp: float | None = None
    row: int = 0
    patient_id: str | None = None  # several slides of one patient never straddle two splits
    time: str = ""  # survival: follow-up time (any unit, > 0)
    event: str = ""  # survival: 1 = event observed, 0 = censored
    coords: str | None = None  # the slide's own tiling (CLAM/TRIDENT .h5 or x,y CSV), resolved


@dataclass(frozen=True)
class BadSlide:
    """A slide that cannot be used, and why; reported, never silently dropped."""

    slide_id: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.slide_id} ({self.path}): {self.reason}"


def read_manifest(
    manifest: str | os.PathLike, require_labels: bool = True, required: Sequence[str] = ()
) -> tuple[list[SlideRecord], list[BadSlide]]:
    """Read a manifest CSV (``require_labels=False``: the ``label`` column may be absent or
    empty, as for slides to predict; ``required``: further columns that must be present, e.g.
    ``("time", "event")`` for survival).

    The file is UTF-8 text, with or without the byte-order mark Excel writes, and with LF or
    CRLF line ends.

    Returns:
        The usable rows, and the rows that are bad in themselves (empty id or path, a path to
        the same file as an earlier row, an ``mpp`` that is not a positive number, a ``split``
        outside train/val/test).

    Raises:
        ManifestError: the file is missing, a folder, unreadable or not UTF-8 CSV text, a
            required column is absent, or ids repeat.
    """
    manifest = Path(manifest)
    required = (*(REQUIRED_COLUMNS if require_labels else ("slide_id", "path")), *required)
    records: list[SlideRecord] = []
    bad: list[BadSlide] = []
    seen_ids: dict[str, int] = {}
    seen_files: dict[tuple, SlideRecord] = {}
    for number, row in _read_rows(manifest, required):
        slide_id, raw_path = row["slide_id"], row["path"]
        if not slide_id or not raw_path:
            bad.append(BadSlide(slide_id or f"<line {number}>", raw_path, "empty slide_id or path"))
            continue
        if slide_id in seen_ids:
            raise ManifestError(
                f"manifest {manifest}: slide_id {slide_id!r} appears on lines {seen_ids[slide_id]} "
                f"and {number}; slide ids must be unique"
            )
        seen_ids[slide_id] = number
        record, reason = _parse_row(manifest, row, number)
        first = seen_files.setdefault(_file_key(record.path), record)
        if first is not record:
            reason = (
                f"same file as slide {first.slide_id!r} (line {first.row}); "
                "one file must be one slide"
            )
        if reason:
            bad.append(BadSlide(slide_id, record.path, reason))
        else:
            records.append(record)
    return records, bad


def _read_rows(manifest: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of every data row, keys and values stripped; checks the columns."""
    text = _read_text(manifest)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise ManifestError(
                f"manifest {manifest} lacks column(s) {missing}; it has {reprlib.repr(columns)}. "
                f"Required: {list(required)}, optional: "
                f"{[c for c in OPTIONAL_COLUMNS if c not in required]}"
            )
        return [
            (reader.line_num, {k.strip(): (v or "").strip() for k, v in row.items() if k})
            for row in reader
        ]
    except csv.Error as err:
        raise ManifestError(
            f"manifest {manifest} is not a readable CSV (line {reader.line_num}: {err}); "
            "save it as comma-separated text (CSV UTF-8)"
        ) from None


def _read_text(manifest: Path) -> str:
    """The manifest's text, decoded as UTF-8 (a leading byte-order mark dropped)."""
    if manifest.is_dir():
        raise ManifestError(
            f"manifest {manifest} is a directory; give the CSV file in it, e.g. "
            f"{manifest / 'manifest.csv'}"
        )
    if not manifest.is_file():
        raise ManifestError(f"manifest not found: {manifest}")
    try:
        data = manifest.read_bytes()
    except OSError as err:
        raise ManifestError(f"cannot read manifest {manifest}: {err.strerror or err}") from None
    return _decode(manifest, data)


def _decode(manifest: Path, data: bytes) -> str:
    """UTF-8 text, or a ``ManifestError`` saying what the bytes are instead and how to fix it."""
    fix = "save it as CSV UTF-8 (in Excel: Save As > CSV UTF-8)"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ManifestError(f"manifest {manifest} is UTF-16 text, not UTF-8; {fix}")
    if b"\0" in data:
        raise ManifestError(
            f"manifest {manifest} is not text (it holds NUL bytes: a binary file?); give a CSV "
            "file with slide_id, path, label columns"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ManifestError(
            f"manifest {manifest} is not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
            f"{fix}"
        ) from None


def _parse_row(manifest: Path, row: dict[str, str], number: int) -> tuple[SlideRecord, str]:
    """The record of a row with an id and a path, and why it is bad (``""`` if it is not)."""
    path = Path(row["path"]).expanduser()
    path = str(path if path.is_absolute() else (manifest.parent / path))
    split = row.get("split") or None
    mpp = None
    reason = ""
    if row.get("mpp"):
        try:
            mpp = float(row["mpp"])
        except ValueError:
            mpp = math.nan
        if not (math.isfinite(mpp) and mpp > 0):
            reason = f"mpp {row['mpp']!r} is not a positive number"
    if split is not None and split not in SPLITS:
        reason = f"split {split!r} is not one of {list(SPLITS)}"
    coords = None
    if row.get("coords"):
        coords_path = Path(row["coords"]).expanduser()
        coords = str(coords_path if coords_path.is_absolute() else manifest.parent / coords_path)
    record = SlideRecord(
        row["slide_id"], path, row.get("label", ""), split, mpp, number,
        patient_id=row.get("patient_id") or None, time=row.get("time", ""),
        event=row.get("event", ""), coords=coords,
    )  # fmt: skip
    return record, reason


def _file_key(path: str) -> tuple:
    """What makes two paths one file: device and inode where the file exists (a symlink, a
    hard link, ``a/../a``, another case on a case-insensitive disk), else the real path.

    Some network and FUSE mounts report inode 0 for every file; there the real path decides.
    """
    try:
        stat = os.stat(path)
    except OSError:  # missing or unreadable: the tiler reports it
        return ("path", os.path.realpath(path))
    if stat.st_ino == 0:
        return ("path", os.path.realpath(path))
    return ("inode", stat.st_dev, stat.st_ino)


def parse_survival(time: str, event: str) -> tuple[float, float]:
    """``(time, event)`` of a survival row, or ``ValueError`` naming the column and the fix.

    ``time`` is a positive finite number in any unit; ``event`` is 1 (observed) or 0 (censored).
    """
    try:
        value = float(time)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        why = "is missing" if not time else f"{time!r} is not a positive number"
        raise ValueError(f"survival time {why}: give the follow-up time (> 0) in column `time`")
    if event not in ("0", "1", "0.0", "1.0"):
        why = "is missing" if not event else f"{event!r} is not 0 or 1"
        raise ValueError(f"survival event {why}: column `event` is 1 (observed) or 0 (censored)")
    return value, float(event)


def parse_target(
    label: str, task: str, classes: Sequence[str] | None = None, num_classes: int | None = None
) -> int | float:
    """The training target of a label, or ``ValueError`` saying which labels the task accepts.

    Binary and multiclass labels are class indices (``0``, ``1``, ...) or, when ``classes`` is
    given, class names; regression labels are numbers.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    if task == "regression":
        try:
            value = float(label)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ValueError(f"label {label!r} is not a finite number (task 'regression')")
        return value
    if classes is not None:
        if label in classes:
            return list(classes).index(label)
        allowed = list(classes)
    else:
        n = 2 if task == "binary" else num_classes
        allowed = list(range(n)) if n else "integers >= 0"
        try:
            value = float(label)
        except ValueError:
            value = math.nan
        if value.is_integer() and value >= 0 and (n is None or value < n):
            return int(value)
    raise ValueError(f"label {label!r} is not a class of task {task!r}; allowed: {allowed}")


def stratified_split(
    targets: Sequence[int | float],
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float = 0.0,
    n_bins: int = 4,
) -> list[str]:
    """A seeded split into train/val/test that keeps class proportions in every part.

    Regression targets are stratified by quantile bins. Monte Carlo cross-validation is a sweep
    over ``seed``. Every class with at least one slide per part gives one to each part that has a
    non-zero fraction.

    Returns:
        The split name of each slide, in input order.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction and test_fraction must be in [0, 1) with a sum below 1, got "
            f"{val_fraction} and {test_fraction}"
        )
    values = np.asarray(targets, dtype=np.float64)
    if values.size and any(isinstance(t, float) for t in targets):
        edges = np.quantile(values, np.linspace(0, 1, n_bins + 1)[1:-1])
        strata = np.searchsorted(edges, values, side="right")
    else:
        strata = values.astype(np.int64)
    rng = np.random.default_rng(seed)
    splits = np.full(len(values), "train", dtype=object)
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        n_val = _part_size(len(members), val_fraction, available=len(members))
        n_test = _part_size(len(members), test_fraction, available=len(members) - n_val)
        splits[members[:n_val]] = "val"
        splits[members[n_val : n_val + n_test]] = "test"
    return splits.tolist()


def _part_size(n: int, fraction: float, available: int) -> int:
    """round(n * fraction) of ``available``: at least one if asked for, never the last one."""
    if fraction <= 0 or available < 2:
        return 0
    return min(available - 1, max(1, round(n * fraction)))
