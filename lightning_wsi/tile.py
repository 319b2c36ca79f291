"""Tile a manifest's slides into the coordinate cache and print a summary.

``python -m lightning_wsi.tile`` with no arguments writes the embedded synthetic dataset (if
absent) and tiles it; ``--manifest slides.csv`` tiles your own archive, e.g. once on a CPU node
before training on GPUs.

Exit codes: 0 when every listed slide is tiled, when bad slides are skipped
(``--on-bad-slide skip``) and at least one slide is usable, and for a manifest that lists no
slide (nothing asked, nothing failed: the line says so); 2 for bad input, each in one line: a
missing or unreadable manifest, missing columns, bad slides under ``--on-bad-slide raise``, or
no usable slide at all. Bad slides are listed, with their reasons, in
``<cache dir>/<manifest stem>.bad_slides.csv``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lightning_wsi.data.datamodule import BadSlideError, SlideDataModule
from lightning_wsi.data.external_tiling import write_clam_h5
from lightning_wsi.data.manifest import BadSlide, ManifestError
from lightning_wsi.data.names import inside, safe_name
from lightning_wsi.data.synthetic import make_synthetic_dataset

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tiling command; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        manifest = args.manifest or _synthetic(args)
        datamodule = _datamodule(args, manifest)
        try:
            datamodule.prepare_data()
            datamodule.setup(stage="predict")
        except BadSlideError as err:
            listed = _save_bad_slides(datamodule, err.bad_slides)
            print(f"error: {_bad_slides_line(manifest, err.bad_slides, listed)}", file=sys.stderr)
            return 2
        code = _report(datamodule, _save_bad_slides(datamodule, datamodule.bad_slides))
        if code == 0 and args.clam_h5 is not None:
            written = write_clam_files(datamodule, args.clam_h5)
            print(f"{len(written)} CLAM coordinate files in {args.clam_h5}")
        return code
    except ManifestError as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
    except OSError as err:  # an unwritable cache or synthetic root, a vanished file
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_wsi.tile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--manifest", type=Path, help="CSV with slide_id, path, label[, split, mpp]"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("outputs/synthetic"),
        help="where the synthetic dataset goes when no manifest is given",
    )
    parser.add_argument(
        "--n-slides", type=_bounded(int, 1), default=40, help="synthetic slides to write"
    )
    parser.add_argument(
        "--mpp", type=_bounded(float, 0, inclusive=False), default=0.5, help="tile µm per pixel"
    )
    parser.add_argument(
        "--tile-size", type=_bounded(int, 1), default=224, help="tile side in pixels"
    )
    parser.add_argument("--min-tissue-fraction", type=_bounded(float, 0, 1), default=0.5)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument(
        "--workers", type=_bounded(int, 0), default=None, help="tiling processes (0: this one)"
    )
    parser.add_argument("--on-bad-slide", choices=("raise", "skip"), default="raise")
    parser.add_argument(
        "--clam-h5", type=Path, default=None, metavar="DIR",
        help="also write each slide's tiles as a CLAM coordinate file DIR/<slide id>.h5",
    )  # fmt: skip
    return parser


def write_clam_files(datamodule: SlideDataModule, folder: Path) -> list[Path]:
    """Each usable slide's tiling as ``folder/<slide id>.h5`` in CLAM's layout, so CLAM's and
    TRIDENT's tools open what we tiled (a manifest ``coords`` column reads them back)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for split in datamodule.splits.values():
        for entry in split:
            if len(entry.tiles):
                path = inside(folder, entry.slide_id, ".h5", unique=safe_name(entry.slide_id)
                              != entry.slide_id)  # fmt: skip
                written.append(write_clam_h5(path, entry.tiles, entry.path))
    return written


def _bounded(
    kind: type, low: float, high: float | None = None, inclusive: bool = True
) -> Callable[[str], int | float]:
    """An argparse type: a finite ``kind`` of the text, from ``low`` (or above it) to ``high``."""
    bounds = f"{'>=' if inclusive else '>'} {low}" + ("" if high is None else f" and <= {high}")

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        above = value >= low if inclusive else value > low
        if not (math.isfinite(value) and above and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"must be a number {bounds}, got {text}")
        return value

    return parse


def _synthetic(args: argparse.Namespace) -> Path:
    manifest = make_synthetic_dataset(args.root, n_slides=args.n_slides)
    print(f"synthetic dataset: {manifest}")
    return manifest


def _datamodule(args: argparse.Namespace, manifest: Path) -> SlideDataModule:
    return SlideDataModule(
        manifest,
        mpp=args.mpp,
        tile_size=args.tile_size,
        min_tissue_fraction=args.min_tissue_fraction,
        cache_dir=args.cache_dir,
        tiling_workers=args.workers,
        on_bad_slide=args.on_bad_slide,
        val_fraction=0.0,
        require_labels=False,  # tiling needs no labels or splits: a multiclass manifest tiles too
    )


def _report(datamodule: SlideDataModule, listed: str) -> int:
    """Print what was tiled; the exit code: 2 when slides were asked for and none is usable."""
    summary = datamodule.tiling_summary
    counts = sorted(len(e.tiles) for split in datamodule.splits.values() for e in split)
    bad = datamodule.bad_slides
    if not counts and not bad:
        print(f"manifest {datamodule.manifest} lists no slide: nothing to tile")
        return 0
    if not counts:
        print(
            f"error: no usable slide in manifest {datamodule.manifest}: {len(bad)} of "
            f"{len(bad)} slides are bad ({listed})",
            file=sys.stderr,
        )
        return 2
    if summary is not None and summary.n_cached == len(summary.results):
        print(summary)  # the data module prints it only when it tiled something
    skipped = f"{len(bad)} skipped" + (f" ({listed})" if bad else "")
    print(
        f"{len(counts)} usable slides, tiles per slide min/median/max "
        f"{counts[0]}/{counts[len(counts) // 2]}/{counts[-1]}; {skipped}; "
        f"cache: {datamodule.cache_dir}"
    )
    return 0


def _save_bad_slides(datamodule: SlideDataModule, bad: Sequence[BadSlide]) -> str:
    """Write the bad slides (id, path, reason) beside the cache; say where, for one line.

    With no bad slide, a list left by an earlier run is removed: it would mislead.
    """
    path = Path(datamodule.cache_dir) / f"{Path(datamodule.manifest).stem}.bad_slides.csv"
    try:
        if not bad:
            path.unlink(missing_ok=True)
            return ""
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["slide_id", "path", "reason"])
            writer.writerows([b.slide_id, b.path, b.reason] for b in bad)
    except OSError as err:
        return f"not listed: {path} cannot be written ({err.strerror or err})"
    return f"listed in {path}"


def _bad_slides_line(manifest: Path, bad: Sequence[BadSlide], listed: str) -> str:
    first = _one_line(bad[0]) if bad else ""
    return (
        f"{len(bad)} slides in manifest {manifest} cannot be used (first: {first}); {listed}. "
        "Fix or remove these rows, or pass --on-bad-slide skip to go on without them"
    )


def _one_line(thing: object) -> str:
    return " ".join(str(thing).split())


if __name__ == "__main__":
    sys.exit(main())
