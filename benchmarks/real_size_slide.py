"""Every tile of a slide of real size: tiling time, loader throughput, read level, memory.

Writes (once, then reused) a 60,000 x 40,000 px slide at 0.25 µm/px (15 x 10 mm, a resection
at 40x) the way an Aperio scanner writes it: an SVS (BigTIFF) of 256-px JPEG tiles, levels at
4x downsamples (0.25, 1, 4, 16 µm/px), tissue on about half of it. Its tissue is a mosaic of
pre-drawn H&E texture tiles (``make_synthetic_slide``) under a smooth tissue mask, written
tile by tile, so neither the writer nor anything else holds the whole level in memory. Then:

1. tissue detection + grid, uncached (goal: under 5 s) and the tiles found at 0.5 µm/px, 224 px;
2. the pyramid level reads come from, at 0.5 and 1 µm/px (the finest level not finer than the
   target would need: level 0 for 0.5, level 1 for 1 µm/px);
3. tiles/s of the training loader (``SlideDataset``, sampling and shards included) against a
   bare OpenSlide ``read_region`` loop over the same coordinates (goal: ratio >= 0.9);
4. with ``--step``, one training step over **all** tissue tiles (``k=None``) on one CPU process,
   chunked gradient caching, a small encoder, the shard streamed from the loader in parts of
   ``--train-part-size`` tiles (``SlideDataModule(train_part_size=...)``, spilled between the
   encode and the re-encode); in a fresh process each, its peak RSS above the process's
   footprint before the step, against the same step with 1,000 tiles (goal: at most 1.3x) and
   against the all-tiles step as one item (``train_part_size=None``), and the time;
5. with ``--step`` or ``--validate-only``, validation on all tissue tiles, streamed in parts of
   ``--eval-part-size`` tiles (``SlideDataModule(eval_part_size=...)``), against the one-item
   path (``eval_part_size=None``, all tiles in one item): peak RSS above the set-up process and,
   on CUDA, peak device memory; with parts it no longer grows with the slide.

    python benchmarks/real_size_slide.py [--root outputs/benchmarks/real_size] [--step]
    python benchmarks/real_size_slide.py --validate-only   # the slide written once, then cached
    python benchmarks/real_size_slide.py --step-only --train-only   # the training steps only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WIDTH, HEIGHT, MPP = 60_000, 40_000, 0.25
TILE = 256  # the TIFF's tile side
LEVELS = 4  # 1, 4, 16, 64 x downsample
MASK_PX = 64  # level-0 pixels per tissue-mask pixel (16 µm)
N_TEXTURES = 24


def _textures(seed: int) -> np.ndarray:
    """``[N, 256, 256, 3]`` uint8 tissue texture at 0.25 µm/px, from synthetic slides' tissue."""
    from lightning_wsi.data import make_synthetic_slide

    out = []
    for i in range(N_TEXTURES):
        slide = make_synthetic_slide(seed * 1000 + i, positive=i % 6 == 0, mpp=MPP,
                                     size_um=(400, 400), tissue_fraction=0.75)  # fmt: skip
        img, mask = slide.image, slide.tissue_mask
        ys, xs = np.nonzero(mask)  # a 64 µm window well inside the tissue
        scale = slide.mask_mpp / MPP
        best = None
        for y0 in range(0, img.shape[0] - TILE, 64):
            for x0 in range(0, img.shape[1] - TILE, 64):
                m = mask[int(y0 / scale) : int((y0 + TILE) / scale),
                         int(x0 / scale) : int((x0 + TILE) / scale)]  # fmt: skip
                if m.size and (best is None or m.mean() > best[0]):
                    best = (m.mean(), y0, x0)
        _, y0, x0 = best
        out.append(img[y0 : y0 + TILE, x0 : x0 + TILE])
    return np.stack(out)


def _mask(seed: int) -> np.ndarray:
    """Tissue mask at 16 µm/px (one pixel per ``MASK_PX`` level-0 px): smooth noise cut at its
    median inside an ellipse, so tissue covers about half the slide in irregular pieces."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    h, w = -(-HEIGHT // MASK_PX), -(-WIDTH // MASK_PX)
    field = ndimage.gaussian_filter(rng.standard_normal((h, w)), 18)
    yy, xx = np.mgrid[0:h, 0:w]
    field -= 3 * field.std() * (((yy - h / 2) / (0.48 * h)) ** 2 + ((xx - w / 2) / (0.48 * w)) ** 2)
    return field > np.quantile(field, 0.5)


def _level_tiles(level: int, textures: list[np.ndarray], mask: np.ndarray, seed: int):
    """Yield the level's 256-px tiles row by row: texture mosaic under the mask, glass elsewhere."""
    ds = 4**level
    w, h = -(-WIDTH // ds), -(-HEIGHT // ds)
    piece = TILE // ds if ds <= TILE else 1  # a level-0 texture tile's side at this level
    tex = textures[level]  # [N, piece, piece, 3]
    glass = np.array([242, 241, 244], np.uint8)
    for ty in range(-(-h // TILE)):
        for tx in range(-(-w // TILE)):
            y = np.arange(ty * TILE, (ty + 1) * TILE)
            x = np.arange(tx * TILE, (tx + 1) * TILE)
            y0, x0 = y * ds, x * ds  # level-0 coordinates of each pixel
            ti, tj = (y0 // TILE)[:, None], (x0 // TILE)[None, :]
            which = (ti * 7919 + tj * 104729 + seed) % N_TEXTURES
            py, px = (y % piece)[:, None], (x % piece)[None, :]
            tile = tex[which, py, px]
            inside = mask[np.clip(y0 // MASK_PX, 0, mask.shape[0] - 1)[:, None],
                          np.clip(x0 // MASK_PX, 0, mask.shape[1] - 1)[None, :]]  # fmt: skip
            inside &= (y0 < HEIGHT)[:, None] & (x0 < WIDTH)[None, :]
            yield np.where(inside[..., None], tile, glass)


def write_slide(path: Path, seed: int = 0) -> Path:
    """Write the slide (about 1.5 GB of JPEG tiles) unless a complete one is there."""
    import tifffile

    done = path.with_suffix(".json")
    if path.exists() and done.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base = _textures(seed)
    textures = []
    for level in range(LEVELS):  # each level's texture tiles: the level-0 ones, area-averaged
        ds = min(4**level, TILE)
        t = base.reshape(N_TEXTURES, TILE // ds, ds, TILE // ds, ds, 3).mean((2, 4))
        textures.append(np.round(t).astype(np.uint8))
    mask = _mask(seed)
    head = (
        f"Aperio Image Library v12.0.0\r\n{WIDTH}x{HEIGHT} [0,0 {WIDTH}x{HEIGHT}] ({TILE}x{TILE})"
    )
    tmp = path.with_suffix(".part")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level in range(LEVELS):
            ds = 4**level
            shape = (-(-HEIGHT // ds), -(-WIDTH // ds), 3)
            desc = f"{head} JPEG/RGB Q=80|AppMag = 40|MPP = {MPP}" if level == 0 else head
            tif.write(
                _level_tiles(level, textures, mask, seed), shape=shape, dtype=np.uint8,
                tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                compressionargs={"level": 80},
                subfiletype=0 if level == 0 else 1, description=desc,
                resolution=(1e4 / (MPP * ds), 1e4 / (MPP * ds)), resolutionunit="CENTIMETER",
                metadata=None,
            )  # fmt: skip
    os.replace(tmp, path)
    took = time.perf_counter() - start
    done.write_text(json.dumps({"seed": seed, "tissue": float(mask.mean()), "write_s": took}))
    print(f"wrote {path} ({path.stat().st_size / 2**30:.2f} GiB) in {took:.0f} s")
    return path


def _bare_rate(path: Path, coords: np.ndarray, size0: int, size: int) -> tuple[float, int]:
    """Tiles/s of a bare OpenSlide loop over ``coords`` and the level it read."""
    import openslide

    slide = openslide.OpenSlide(str(path))
    level = slide.get_best_level_for_downsample(size0 / size + 1e-3)
    size_level = round(size0 / slide.level_downsamples[level])
    start = time.perf_counter()
    for x, y in coords:
        region = slide.read_region((int(x), int(y)), level, (size_level, size_level))
        if size_level != size:
            region = region.resize((size, size))
        np.asarray(region)[..., :3].copy()
    rate = len(coords) / (time.perf_counter() - start)
    slide.close()
    return rate, level


def _step_worker(
    path: str, k: int | None, chunk: int, stage: str = "fit", part_size: int | None = None,
    train_part_size: int | None = None,
) -> dict:  # fmt: skip
    """In this process: one chunked training step over ``k`` tiles (``None``: all), or
    (``stage="validate"``) validation on all tiles in parts of ``part_size`` (``None``: one
    item), on CUDA when there is one, through the data module as training reads the slide. Peak
    RSS is measured above the footprint just before the step (after setup), and peak device
    memory on CUDA."""
    import lightning as L
    import torch

    from lightning_wsi import SlideDataModule, SlideModule, SlideParallelStrategy

    torch.manual_seed(0)
    split = "train" if stage == "fit" else "val"
    manifest = Path(path).with_name(f"manifest_{split}.csv")
    column, value = ("", "") if stage == "fit" else (",split", ",val")  # fit: val_fraction 0
    manifest.write_text(f"slide_id,path,label{column}\nreal,{Path(path).name},1{value}\n")
    dm = SlideDataModule(
        manifest, k=k or "all", mpp=0.5, tile_size=224, num_workers=0, progress=False,
        cache_dir=str(Path(path).parent / ".tiles"), eval_k=None, val_fraction=0.0,
        eval_part_size=part_size, train_part_size=train_part_size,
    )  # fmt: skip
    module = SlideModule("test_resnet", "gma", "binary", lr_schedule="constant",
                         eval_chunk_size=chunk)  # fmt: skip
    cuda = stage != "fit" and torch.cuda.is_available()
    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, max_steps=1, logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        strategy=SlideParallelStrategy(encode_chunk_size=chunk),
    )  # fmt: skip
    dm.setup(stage)
    tiles = len(dm.splits[split][0].tiles) if k is None or stage != "fit" else k

    def rss(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(field)

    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = rss("VmRSS")
    start = time.perf_counter()
    if stage == "fit":
        trainer.fit(module, dm)
    else:
        trainer.validate(module, dm, verbose=False)
    took = time.perf_counter() - start
    device = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return {"tiles": tiles, "peak_mib": (rss("VmHWM") - before) / 1024, "seconds": took,
            "device_mib": device}  # fmt: skip


def _run_step(
    path: Path, k: int | None, chunk: int, stage: str = "fit", part_size: int | None = None,
    train_part_size: int | None = None,
) -> dict:  # fmt: skip
    call = (f"b._step_worker({str(path)!r}, {k!r}, {chunk}, {stage!r}, {part_size!r}, "
            f"{train_part_size!r})")  # fmt: skip
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import real_size_slide as b; print(json.dumps({call}))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def _read_figures(path: Path, k: int) -> None:
    """Tiling time, tiles found, read levels and loader throughput (parts 1-3)."""
    from lightning_wsi.data import tile_slide
    from lightning_wsi.data.dataset import SlideDataset, SlideEntry
    from lightning_wsi.data.slide import Slide

    times = []
    for _ in range(3):
        start = time.perf_counter()
        tiles = tile_slide(path, mpp=0.5, tile_size=224)
        times.append(time.perf_counter() - start)
    print(f"tissue detection + grid (uncached, incl. the probe read): median "
          f"{statistics.median(times):.2f} s of 3 (goal < 5 s); {len(tiles)} tissue tiles at "
          f"0.5 µm/px, 224 px")  # fmt: skip

    with Slide(path) as slide:
        for mpp in (0.5, 1.0):
            level = slide.best_level(mpp / slide.mpp)
            print(f"reads at {mpp} µm/px come from level {level} "
                  f"({slide.mpp * slide.level_downsamples[level]:.2f} µm/px)")  # fmt: skip

    entry = SlideEntry(slide_id="real", path=str(path), target=1, tiles=tiles)
    dataset = SlideDataset([entry], k=k, seed=0)
    coords = tiles.coords[dataset.sample_indices(0, 0)]
    ratios, bare_rates, ds_rates = [], [], []
    for repeat in range(4):
        dataset.close()
        start = time.perf_counter()
        n = len(dataset[(0, repeat % 2)]["tiles"])
        d = n / (time.perf_counter() - start)
        b, level = _bare_rate(path, tiles.coords[dataset.sample_indices(0, repeat % 2)],
                              tiles.tile_size_level0, tiles.tile_size)  # fmt: skip
        ratios.append(d / b), bare_rates.append(b), ds_rates.append(d)
    print(f"K={len(coords)} tiles, one process: bare OpenSlide {statistics.median(bare_rates):.0f} "
          f"tiles/s (level {level}), training loader {statistics.median(ds_rates):.0f} tiles/s, "
          f"ratio {statistics.median(ratios):.2f} (goal >= 0.9)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("outputs/benchmarks/real_size"))
    parser.add_argument("--k", type=int, default=512, help="tiles in the throughput comparison")
    parser.add_argument("--step", action="store_true", help="also the all-tiles training step")
    parser.add_argument("--step-only", action="store_true", help="only the steps (slide written)")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument(
        "--validate-only", action="store_true",
        help="only validation in parts against one item (slide written)",
    )  # fmt: skip
    parser.add_argument("--eval-part-size", type=int, default=1024)
    parser.add_argument("--train-part-size", type=int, default=1024)
    parser.add_argument("--train-only", action="store_true", help="no validation figures")
    args = parser.parse_args()

    import openslide

    path = write_slide(args.root / "real_size.svs")
    with openslide.OpenSlide(str(path)) as osr:
        dims = osr.level_dimensions
        print(f"{path.name}: {osr.properties.get('openslide.vendor')}, levels {dims}, "
              f"{path.stat().st_size / 2**30:.2f} GiB")  # fmt: skip

    if not (args.step_only or args.validate_only):
        _read_figures(path, args.k)
    if args.validate_only:
        _validation_figures(path, args.chunk, args.eval_part_size)
        return

    if args.step or args.step_only:
        parts = args.train_part_size
        small = _run_step(path, 1000, args.chunk, train_part_size=parts)
        full = _run_step(path, None, args.chunk, train_part_size=parts)
        whole = _run_step(path, None, args.chunk, train_part_size=None)
        print(
            f"chunk {args.chunk}, test_resnet, one CPU process, peak RSS above the set-up process:"
        )
        for name, r in (
            ("train, 1,000 tiles", small),
            (f"train, all tiles in parts of {parts}", full),
            ("train, all tiles as one item", whole),
        ):
            _print_run(name, r)
        spill = full["tiles"] * 224 * 224 * 3 / 2**20
        ratio, before = full["peak_mib"] / small["peak_mib"], whole["peak_mib"] / small["peak_mib"]
        print(f"  training peak ratio all (parts) / 1,000: {ratio:.2f} (goal <= 1.3); all as "
              f"one item / 1,000: {before:.2f}; spill file {spill:.0f} MiB")  # fmt: skip
        if not args.train_only:
            _validation_figures(path, args.chunk, args.eval_part_size)


def _print_run(name: str, r: dict) -> None:
    device = f", device peak {r['device_mib']:.0f} MiB" if r.get("device_mib") is not None else ""
    print(f"  {name:>34}: {r['tiles']} tiles, peak +{r['peak_mib']:.0f} MiB{device}, "
          f"{r['seconds']:.1f} s")  # fmt: skip


def _validation_figures(path: Path, chunk: int, part_size: int) -> None:
    """Validation on all tiles: in parts of ``part_size``, and as one item (part 5)."""
    parts = _run_step(path, None, chunk, "validate", part_size)
    whole = _run_step(path, None, chunk, "validate", None)
    print(f"validation, chunk {chunk}, test_resnet, one process, peak RSS above set-up:")
    _print_run(f"in parts of {part_size} tiles", parts)
    _print_run("as one item (eval_part_size=None)", whole)
    print(f"  peak ratio parts / one item: {parts['peak_mib'] / whole['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
