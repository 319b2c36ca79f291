"""Tile a manifest's slides into the coordinate cache and print a summary.

``python -m lightning_wsi.tile`` with no arguments writes the embedded synthetic dataset (if
absent) and tiles it; ``--manifest slides.csv`` tiles your own archive, e.g. once on a CPU node
before training on GPUs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_wsi.data.datamodule import BadSlideError, SlideDataModule
from lightning_wsi.data.manifest import ManifestError
from lightning_wsi.data.synthetic import make_synthetic_dataset

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the tiling command; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m lightning_wsi.tile", description=__doc__)
    parser.add_argument(
        "--manifest", type=Path, help="CSV with slide_id, path, label[, split, mpp]"
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("outputs/synthetic"),
        help="where the synthetic dataset goes when no manifest is given",
    )
    parser.add_argument("--n-slides", type=int, default=40, help="synthetic slides to write")
    parser.add_argument("--mpp", type=float, default=0.5, help="tile microns per pixel")
    parser.add_argument("--tile-size", type=int, default=224, help="tile side in pixels")
    parser.add_argument("--min-tissue-fraction", type=float, default=0.5)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=None, help="tiling processes")
    parser.add_argument("--on-bad-slide", choices=("raise", "skip"), default="raise")
    args = parser.parse_args(argv)

    manifest = args.manifest
    if manifest is None:
        manifest = make_synthetic_dataset(args.root, n_slides=args.n_slides)
        print(f"synthetic dataset: {manifest}")
    datamodule = SlideDataModule(
        manifest,
        mpp=args.mpp,
        tile_size=args.tile_size,
        min_tissue_fraction=args.min_tissue_fraction,
        cache_dir=args.cache_dir,
        tiling_workers=args.workers,
        on_bad_slide=args.on_bad_slide,
        val_fraction=0.0,
    )
    try:
        datamodule.prepare_data()
        datamodule.setup(stage="predict")
    except (BadSlideError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = datamodule.tiling_summary
    if summary is not None and summary.n_cached == len(summary.results):
        print(summary)  # the data module prints it only when it tiled something
    counts = [len(e.tiles) for split in datamodule.splits.values() for e in split]
    print(
        f"{len(counts)} usable slides, tiles per slide min/median/max "
        f"{min(counts)}/{sorted(counts)[len(counts) // 2]}/{max(counts)}; "
        f"{len(datamodule.bad_slides)} skipped; cache: {datamodule.cache_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
