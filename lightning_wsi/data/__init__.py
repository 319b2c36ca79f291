"""Slides in, one-slide batches out: reading at a target mpp, tissue tiling, sampling, loaders."""

from lightning_wsi.data.augment import TileAugment, color_jitter
from lightning_wsi.data.datamodule import BadSlideError, SlideDataModule
from lightning_wsi.data.dataset import SlideDataset, SlideEntry
from lightning_wsi.data.manifest import BadSlide, ManifestError, read_manifest
from lightning_wsi.data.manifest_tiling import SlideJob, TilingSummary, tile_many
from lightning_wsi.data.sampling import (
    SlideSampler,
    eval_tile_indices,
    sample_tile_indices,
    shard_bounds,
)
from lightning_wsi.data.slide import Slide, SlideError
from lightning_wsi.data.synthetic import (
    make_synthetic_dataset,
    make_synthetic_slide,
    write_pyramidal_tiff,
)
from lightning_wsi.data.tiling import SlideTiles, tile_slide
from lightning_wsi.data.tissue import tissue_mask
from lightning_wsi.data.transfer import normalize_tiles

__all__ = [
    "BadSlide",
    "BadSlideError",
    "ManifestError",
    "Slide",
    "SlideDataModule",
    "SlideDataset",
    "SlideEntry",
    "SlideError",
    "SlideJob",
    "SlideSampler",
    "SlideTiles",
    "TileAugment",
    "TilingSummary",
    "color_jitter",
    "eval_tile_indices",
    "make_synthetic_dataset",
    "make_synthetic_slide",
    "normalize_tiles",
    "read_manifest",
    "sample_tile_indices",
    "shard_bounds",
    "tile_many",
    "tile_slide",
    "tissue_mask",
    "write_pyramidal_tiff",
]
