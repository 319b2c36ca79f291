"""A dataset whose item is one slide: this rank's tiles of it, read at the target mpp."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_wsi.data.augment import TileAugment
from lightning_wsi.data.sampling import (
    eval_tile_indices,
    sample_tile_indices,
    shard_bounds,
    tile_rng,
)
from lightning_wsi.data.slide import Slide, SlideError
from lightning_wsi.data.tiling import SlideTiles

__all__ = ["SlideEntry", "SlideDataset"]

# Open OpenSlide handles kept per process: enough for a worker's slides, few file descriptors.
_MAX_OPEN_SLIDES = 16


@dataclass(frozen=True)
class SlideEntry:
    """A validated slide of a split: where it is, its target and its tissue tiles."""

    slide_id: str
    path: str
    target: int | float | None  # None: an unlabeled slide (prediction only)
    tiles: SlideTiles


class SlideDataset(Dataset):
    """One item per slide: a mapping with this rank's shard of the slide's sampled tiles.

    In training (``k`` set) each item draws K tiles from ``(seed, epoch, slide_id)``; in
    evaluation (``k=None``) it takes all tiles, or ``eval_k`` spread evenly, in a fixed order. Of
    those, only the ``shard_rank``-th contiguous shard of ``shard_count`` is read from disk.

    Items are keyed ``(slide_index, epoch)``, as
    :class:`~lightning_wsi.data.sampling.SlideSampler` yields them, or by a plain ``slide_index``
    (epoch 0).

    Returns per item:
        ``tiles`` ``[k_r, 3, H, W]`` uint8 (channels-last memory; made float and normalised on
        the device by :func:`~lightning_wsi.data.transfer.normalize_tiles`); ``color_jitter``
        ``[k_r, 4]`` per-tile colour factors when colour jitter is on; ``coords`` ``[k_r, 2]``
        int64 level-0 ``(x, y)``; ``target`` 0-d (int64 class or float32 value); ``slide_id`` str;
        ``tile_index`` ``[k_r]`` int64 positions in the slide's tile list; ``num_tiles`` int, the
        size of the whole sample over all shards.
    """

    def __init__(
        self,
        slides: Sequence[SlideEntry],
        *,
        k: int | None,
        eval_k: int | None = None,
        seed: int = 0,
        shard_rank: int = 0,
        shard_count: int = 1,
        augment: TileAugment | None = None,
    ) -> None:
        self.slides = list(slides)
        self.k = k
        self.eval_k = eval_k
        self.seed = seed
        self.shard_rank = shard_rank
        self.shard_count = shard_count
        self.augment = augment
        self._open: OrderedDict[str, Slide] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.slides)

    def sample_indices(self, index: int, epoch: int) -> np.ndarray:
        """The whole sample of slide ``index`` (all shards), as positions in its tile list."""
        entry = self.slides[index]
        n_tiles = len(entry.tiles)
        if self.k is None:
            return eval_tile_indices(n_tiles, self.eval_k)
        return sample_tile_indices(
            n_tiles, self.k, seed=self.seed, epoch=epoch, slide_id=entry.slide_id
        )

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        entry = self.slides[index]
        sample = self.sample_indices(index, epoch)
        start, stop = shard_bounds(len(sample), self.shard_rank, self.shard_count)
        shard = sample[start:stop]
        coords = entry.tiles.coords[shard]
        item: dict[str, Any] = {}
        symmetries = [0] * len(shard)
        if self.augment is not None:
            draws = [
                self.augment.draw(tile_rng(self.seed, epoch, entry.slide_id, int(t))) for t in shard
            ]
            symmetries = [symmetry for symmetry, _ in draws]
            if self.augment.color_jitter > 0:
                factors = np.stack([f for _, f in draws]) if draws else np.zeros((0, 4), np.float32)
                item["color_jitter"] = torch.from_numpy(factors)
        pixels = self._read(entry, coords, symmetries)
        if entry.target is not None:
            target_dtype = torch.float32 if isinstance(entry.target, float) else torch.int64
            item["target"] = torch.tensor(entry.target, dtype=target_dtype)
        item.update(
            tiles=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            coords=torch.from_numpy(coords.copy()),
            slide_id=entry.slide_id,
            tile_index=torch.from_numpy(shard.copy()),
            num_tiles=len(sample),
        )
        return item

    def _read(self, entry: SlideEntry, coords: np.ndarray, symmetries: Sequence[int]) -> np.ndarray:
        """``[k_r, T, T, 3]`` uint8 tiles at the target mpp, each under its symmetry."""
        size = entry.tiles.tile_size
        out = np.empty((len(coords), size, size, 3), dtype=np.uint8)
        slide = self._slide(entry)
        for i, (x, y) in enumerate(coords):
            try:
                tile = slide.read_tile(int(x), int(y), entry.tiles.tile_size_level0, size)
            except Exception as err:
                raise SlideError(
                    f"slide {entry.slide_id!r}: reading the tile at level-0 ({x}, {y}) of "
                    f"{entry.path} failed ({type(err).__name__}: {err}); the file may be corrupt"
                ) from err
            out[i] = TileAugment.geometry(tile, symmetries[i])
        return out

    def _slide(self, entry: SlideEntry) -> Slide:
        if os.getpid() != self._pid:  # a forked worker must not share its parent's file handles
            self._open, self._pid = OrderedDict(), os.getpid()
        slide = self._open.pop(entry.path, None)
        if slide is None:
            slide = Slide(entry.path, mpp=entry.tiles.slide_mpp, slide_id=entry.slide_id)
            if len(self._open) >= _MAX_OPEN_SLIDES:
                self._open.popitem(last=False)[1].close()
        self._open[entry.path] = slide
        return slide

    def close(self) -> None:
        """Close the slides this process holds open (they reopen on the next read)."""
        if os.getpid() == self._pid:
            for slide in self._open.values():
                slide.close()
        self._open = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # handles do not cross process boundaries (spawn)
        return state
