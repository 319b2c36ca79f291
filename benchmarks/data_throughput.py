"""Tiles per second of SlideDataset against a bare OpenSlide read_region loop, and tiling time.

Both sides read the same slides and the same K coordinates per slide, in the same order, through
a DataLoader with the same number of workers; the dataset also samples, shards and applies the
training augmentation (flips/rotations on the uint8 pixels), which is what training uses. Tiles
leave both as uint8; normalisation to float happens on the device after transfer and is not part
of either side. Ratio = dataset / bare.

    python benchmarks/data_throughput.py [--slides 8] [--k 128] [--repeats 6] [--persistent]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import openslide
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_wsi.data import SlideDataModule, make_synthetic_dataset, tile_slide
from lightning_wsi.data.dataset import SlideDataset


class BareReads(Dataset):
    """One item per slide: ``read_region`` of the same coordinates, as uint8 ``[k, H, W, 3]``."""

    def __init__(self, dataset: SlideDataset, epoch: int) -> None:
        self.jobs = []
        for index, entry in enumerate(dataset.slides):
            coords = entry.tiles.coords[dataset.sample_indices(index, epoch)]
            self.jobs.append(
                (entry.path, coords, entry.tiles.tile_size_level0, entry.tiles.tile_size)
            )

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> torch.Tensor:
        path, coords, size0, size = self.jobs[index]
        slide = openslide.OpenSlide(path)
        level = slide.get_best_level_for_downsample(size0 / size + 1e-3)
        size_level = round(size0 / slide.level_downsamples[level])
        out = np.empty((len(coords), size, size, 3), np.uint8)
        for i, (x, y) in enumerate(coords):
            region = slide.read_region((int(x), int(y)), level, (size_level, size_level))
            if size_level != size:
                region = region.resize((size, size))
            out[i] = np.asarray(region)[..., :3]
        slide.close()
        return torch.from_numpy(out)


def _tiles_per_second(dataset: Dataset | DataLoader, workers: int = 0, sampler=None) -> float:
    loader = dataset
    if not isinstance(dataset, DataLoader):
        loader = DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=workers)
    start, n = time.perf_counter(), 0
    for item in loader:
        n += len(item["tiles"] if isinstance(item, dict) else item)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=None)
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--k", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument(
        "--persistent",
        action="store_true",
        help="persistent workers and open slides, as in training (OpenSlide's tile cache then "
        "serves repeated reads of these small slides)",
    )
    args = parser.parse_args()
    root = args.root or Path(tempfile.mkdtemp()) / "synthetic"
    manifest = make_synthetic_dataset(root, n_slides=args.slides, progress=False)

    dm = SlideDataModule(manifest, k=args.k, val_fraction=0.0, progress=False, tiling_workers=0)
    dm.setup("predict")
    train = dm.train_dataloader()
    dataset, sampler = train.dataset, train.sampler
    bare = BareReads(dataset, epoch=0)
    keys = [(i, 0) for i in range(len(dataset))]  # the same slides and epoch as the bare loop

    print(
        f"{len(dataset)} slides, K={args.k}, {dataset.slides[0].tiles.tile_size} px tiles; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'workers':>7} {'bare tiles/s':>13} {'dataset tiles/s':>16} {'ratio':>6}")
    for workers in (0, 1, 2):
        bare_side, ds_side = bare, dataset
        if args.persistent and workers:  # training's steady state: workers and handles stay
            kw = {"batch_size": None, "num_workers": workers, "persistent_workers": True}
            bare_side, ds_side = DataLoader(bare, **kw), DataLoader(dataset, sampler=keys, **kw)
        _tiles_per_second(bare_side, workers)  # warm the page cache and the worker start-up
        _tiles_per_second(ds_side, workers, sampler=keys)
        ratios, bare_rates, ds_rates = [], [], []
        for repeat in range(args.repeats):  # interleaved, alternating which side goes first,
            b = 0.0  # so drift in machine load hits both sides alike
            if repeat % 2 == 0:
                b = _tiles_per_second(bare_side, workers)
            if not args.persistent:
                dataset.close()  # start cold like the bare loop, which opens every slide afresh
            d = _tiles_per_second(ds_side, workers, sampler=keys)
            if repeat % 2 == 1:
                b = _tiles_per_second(bare_side, workers)
            bare_rates.append(b)
            ds_rates.append(d)
            ratios.append(d / b)
        print(
            f"{workers:>7} {statistics.median(bare_rates):>13.0f} "
            f"{statistics.median(ds_rates):>16.0f} {statistics.median(ratios):>6.2f}"
        )
    del sampler

    times, counts = [], []
    for entry in dataset.slides:
        start = time.perf_counter()
        tiles = tile_slide(entry.path, mpp=0.5, tile_size=224)
        times.append(time.perf_counter() - start)
        counts.append(len(tiles))
    print(
        f"tiling (no cache): {statistics.median(times):.3f} s per slide median, "
        f"{max(times):.3f} s max, {statistics.median(counts):.0f} tissue tiles per slide median"
    )


if __name__ == "__main__":
    main()
