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
from lightning_wsi.data.problems import DEFAULT_MAX_BAD_TILE_FRACTION, max_bad_tiles, slide_problem
from lightning_wsi.data.sampling import (
    check_part_size,
    eval_tile_indices,
    num_parts,
    part_bounds,
    sample_tile_indices,
    shard_bounds,
    tile_rng,
    train_num_parts,
)
from lightning_wsi.data.slide import Slide, SlideError
from lightning_wsi.data.tiling import SlideTiles

__all__ = ["BagEntry", "SlideEntry", "SlideDataset", "slides_of"]

# Open OpenSlide handles kept per process: enough for a worker's slides, few file descriptors.
_MAX_OPEN_SLIDES = 16


@dataclass(frozen=True)
class SlideEntry:
    """A validated slide of a split: where it is, its target and its tissue tiles."""

    slide_id: str
    path: str
    target: int | float | tuple[float, float] | None  # None: unlabeled (prediction only)
    tiles: SlideTiles


@dataclass(frozen=True)
class BagEntry:
    """A patient's slides as one item: K tiles are sampled over the union of their tissue
    tiles (so each slide weighs by its tile count) and sharded like one slide's tiles.

    Attributes:
        slide_id: The patient's id (items and predictions are named by it).
        target: The patient's target (every slide's).
        members: The slides, in manifest order; tile ``t`` of the bag is tile ``t - start`` of
            the member whose tiles start at ``start``.
    """

    slide_id: str
    target: int | float | tuple[float, float] | None
    members: tuple[SlideEntry, ...]

    @property
    def path(self) -> str:
        return "; ".join(m.path for m in self.members)

    @property
    def starts(self) -> np.ndarray:
        return np.cumsum([0] + [len(m.tiles) for m in self.members])[:-1]


def slides_of(entry: SlideEntry | BagEntry) -> tuple[SlideEntry, ...]:
    """The slides of an item: a bag's members, or the slide itself."""
    return entry.members if isinstance(entry, BagEntry) else (entry,)


def _n_tiles(entry: SlideEntry | BagEntry) -> int:
    return sum(len(m.tiles) for m in slides_of(entry))


def _locate(entry: SlideEntry | BagEntry, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For bag tile positions: the member of each and the position in that member's tiles."""
    if not isinstance(entry, BagEntry):
        return np.zeros(len(positions), dtype=np.int64), positions
    member = np.searchsorted(entry.starts, positions, side="right") - 1
    return member.astype(np.int64), positions - entry.starts[member]


class SlideDataset(Dataset):
    """One item per slide: a mapping with this rank's shard of the slide's sampled tiles.

    In training (``k`` set) each item draws K tiles from ``(seed, epoch, slide_id)``; in
    evaluation (``k=None``) it takes all tiles, or ``eval_k`` spread evenly, in a fixed order. Of
    those, only the ``shard_rank``-th contiguous shard of ``shard_count`` is read from disk.

    Items are keyed ``(slide_index, epoch)``, as
    :class:`~lightning_wsi.data.sampling.SlideSampler` yields them, or by a plain ``slide_index``
    (epoch 0); ``(slide_index, epoch, reason)`` asks for a slide dropped earlier in the run,
    which is not read again (an item without tiles whose ``slide_problem`` is ``reason``).

    Evaluation in parts (``part_size``, with ``k=None``): an item is part ``p`` of a slide, keyed
    ``(slide_index, epoch, reason_or_None, p)``: the ``p``-th run of ``part_size`` consecutive
    positions of the slide's evaluation order (``num_parts(index)`` parts in all), of which this
    rank reads its shard, so an item's memory is bounded by ``part_size`` whatever the slide's
    size. ``num_tiles`` and ``max_bad_tiles`` stay the whole slide's; ``tile_problems`` are the
    part's. A part of a slide of several parts reports only what stops the whole slide (its file
    vanished); whether the slide's left-out tiles are too many is judged over all its parts, by
    whoever collects them (:class:`~lightning_wsi.data.parts.SlideParts`).

    Training in parts (``train_part_size``, for a strategy that streams training parts:
    ``SlideParallelStrategy`` with ``encode_chunk_size``): part ``p`` is the ``p``-th run of
    ``train_part_size`` tiles of this rank's own shard, so a rank's parts in order are exactly its
    shard of the K tiles. Every rank has ``num_parts(index)`` parts (those of the largest
    shard; a smaller shard's last part may be empty). As in evaluation, ``num_tiles`` and
    ``max_bad_tiles`` stay the whole sample's and the slide is judged over all its parts.

    A bad tile costs a tile: a read that fails is retried once with the slide reopened; if it
    fails again the tile is left out of the item (and listed in ``tile_problems``). When the file
    has vanished or cannot be reopened, or more than ``max_bad_tile_fraction`` of the sample
    failed, the item carries no tiles and a ``slide_problem`` (:mod:`~lightning_wsi.data.problems`).

    Returns per item:
        ``tiles`` ``[k_r, 3, H, W]`` uint8 (channels-last memory; made float and normalised on
        the device by :func:`~lightning_wsi.data.transfer.normalize_tiles`); ``color_jitter``
        ``[k_r, 4]`` per-tile colour factors when colour jitter is on; ``coords`` ``[k_r, 2]``
        int64 level-0 ``(x, y)``; ``target`` 0-d (int64 class or float32 value); ``slide_id`` str;
        ``tile_index`` ``[k_r]`` int64 positions in the slide's tile list; ``num_tiles`` int, the
        size of the whole sample over all shards; ``tile_problems`` list of ``{"x", "y",
        "error"}`` of tiles left out; ``max_bad_tiles`` int, how many the whole sample
        tolerates; ``slide_problem`` str or ``None``; ``part`` int (0-based) and ``parts`` int,
        this item's part of the slide and how many it has (``0`` and ``1`` without parts).
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
        max_bad_tile_fraction: float = DEFAULT_MAX_BAD_TILE_FRACTION,
        part_size: int | None = None,
        train_part_size: int | None = None,
    ) -> None:
        check_part_size(part_size)
        check_part_size(train_part_size, "train_part_size")
        if part_size is not None and k is not None:
            raise ValueError(
                f"eval_part_size applies to evaluation (k=None), got k={k} with "
                f"part_size={part_size}; training reads in parts with train_part_size"
            )
        if part_size is not None and train_part_size is not None:
            raise ValueError(
                "a dataset reads in evaluation parts (part_size) or training parts "
                f"(train_part_size), not both: got {part_size} and {train_part_size}"
            )
        if not 0.0 <= max_bad_tile_fraction < 1.0:
            raise ValueError(
                f"max_bad_tile_fraction must lie in [0, 1), got {max_bad_tile_fraction}"
            )
        self.slides = list(slides)
        self.max_bad_tile_fraction = max_bad_tile_fraction
        self.k = k
        self.eval_k = eval_k
        self.seed = seed
        self.shard_rank = shard_rank
        self.shard_count = shard_count
        self.augment = augment
        self.part_size = part_size if train_part_size is None else train_part_size
        self.shard_parts = train_part_size is not None  # parts of the shard, not the sample
        self._open: OrderedDict[str, Slide] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.slides)

    def sample_indices(self, index: int, epoch: int) -> np.ndarray:
        """The whole sample of slide ``index`` (all shards), as positions in its tile list."""
        entry = self.slides[index]
        n_tiles = _n_tiles(entry)
        if self.k is None:
            return eval_tile_indices(n_tiles, self.eval_k)
        return sample_tile_indices(
            n_tiles, self.k, seed=self.seed, epoch=epoch, slide_id=entry.slide_id
        )

    def num_parts(self, index: int) -> int:
        """Items of slide ``index``: 1 without ``part_size``. (A training sample's size is
        ``min(k, tiles)`` in every epoch, so epoch 0's gives every epoch's count.)"""
        return self._count_parts(len(self.sample_indices(index, 0)))

    def _count_parts(self, n: int) -> int:
        """Items of a sample of ``n`` tiles."""
        if self.part_size is None:
            return 1
        if self.shard_parts:
            return train_num_parts(n, self.shard_count, self.part_size)
        return num_parts(n, self.part_size)

    def __getitem__(self, key: int | tuple) -> dict[str, Any]:
        index, epoch, dropped, part = _parse_key(key)
        entry = self.slides[index]
        sample = self.sample_indices(index, epoch)
        parts = 1 if dropped is not None else self._count_parts(len(sample))
        if part >= parts:
            setting = "train_part_size" if self.shard_parts else "eval_part_size"
            raise IndexError(
                f"slide {entry.slide_id!r} has {parts} parts ({setting}={self.part_size}), "
                f"part {part} was asked for"
            )
        shard = self._part_shard(sample, part, parts)
        symmetries, factors = [0] * len(shard), None
        if self.augment is not None:
            draws = [
                self.augment.draw(tile_rng(self.seed, epoch, entry.slide_id, int(t))) for t in shard
            ]
            symmetries = [symmetry for symmetry, _ in draws]
            if self.augment.color_jitter > 0:
                factors = np.stack([f for _, f in draws]) if draws else np.zeros((0, 4), np.float32)
        tolerated = max_bad_tiles(len(sample), self.max_bad_tile_fraction)
        if dropped is not None:
            pixels, kept, problems, problem = self._empty(entry), [], [], str(dropped)
        else:
            pixels, kept, problems, problem = self._read(entry, shard, symmetries)
            if parts == 1:  # else judged over the slide's parts, by the collector
                problem = slide_problem(len(problems), len(sample), tolerated, problem)
        if problem is not None:  # nothing of this slide is used in this step
            pixels, kept = self._empty(entry), []
        shard = shard[kept]
        member, local = _locate(entry, shard)
        coords = np.stack(
            [slides_of(entry)[m].tiles.coords[t] for m, t in zip(member, local, strict=True)]
        ) if len(shard) else np.zeros((0, 2), dtype=np.int64)  # fmt: skip
        item: dict[str, Any] = {}
        if factors is not None:
            item["color_jitter"] = torch.from_numpy(np.ascontiguousarray(factors[kept]))
        if entry.target is not None:  # a class, a value, or (time, event) for survival
            integer = isinstance(entry.target, int) and not isinstance(entry.target, bool)
            item["target"] = torch.tensor(
                entry.target, dtype=torch.int64 if integer else torch.float32
            )
        item.update(
            tiles=torch.from_numpy(pixels).permute(0, 3, 1, 2),
            coords=torch.from_numpy(coords.astype(np.int64)),
            slide_id=entry.slide_id,
            tile_index=torch.from_numpy(shard.copy()),
            num_tiles=len(sample),
            tile_problems=problems,
            max_bad_tiles=tolerated,
            slide_problem=problem,
            part=part,
            parts=parts,
        )
        if isinstance(entry, BagEntry):  # which slide each tile is from (heatmaps per slide)
            item["slide_index"] = torch.from_numpy(member)
            item["slide_ids"] = [m.slide_id for m in entry.members]
        return item

    def _part_shard(self, sample: np.ndarray, part: int, parts: int) -> np.ndarray:
        """This rank's positions of ``part`` of ``parts``: in evaluation its shard of the
        part's run of the sample; in training the part's run of its shard of the sample."""
        size = self.part_size if parts > 1 else None
        if not self.shard_parts:
            first, last = part_bounds(len(sample), part, size)
            start, stop = shard_bounds(last - first, self.shard_rank, self.shard_count)
            return sample[first + start : first + stop]
        start, stop = shard_bounds(len(sample), self.shard_rank, self.shard_count)
        mine = sample[start:stop]
        if size is None:
            return mine
        return mine[min(part * size, len(mine)) : (part + 1) * size]

    def _empty(self, entry: SlideEntry | BagEntry) -> np.ndarray:
        size = slides_of(entry)[0].tiles.tile_size
        return np.empty((0, size, size, 3), dtype=np.uint8)

    def _read(
        self, entry: SlideEntry | BagEntry, shard: np.ndarray, symmetries: Sequence[int]
    ) -> tuple[np.ndarray, list[int], list[dict[str, Any]], str | None]:
        """Read this shard's tiles at the target mpp, each under its symmetry.

        Returns:
            ``[n, T, T, 3]`` uint8 tiles that could be read, their positions in ``shard``, the
            ``{"x", "y", "error"}`` of tiles left out, and a reason when the slide itself is
            gone (then nothing else is read).
        """
        members = slides_of(entry)
        size = members[0].tiles.tile_size
        out = np.empty((len(shard), size, size, 3), dtype=np.uint8)
        kept: list[int] = []
        problems: list[dict[str, Any]] = []
        for i, (m, t) in enumerate(zip(*_locate(entry, shard), strict=True)):
            slide = members[m]
            x, y = (int(v) for v in slide.tiles.coords[t])
            try:
                tile = self._read_tile(slide, x, y)
            except SlideError as err:  # the file vanished or cannot be opened again
                return out[:0], [], problems, str(err)
            except Exception as err:  # noqa: BLE001 - twice unreadable: this tile is left out
                problem = {"x": x, "y": y, "error": _reason(err)}
                if isinstance(entry, BagEntry):
                    problem["slide_id"] = slide.slide_id
                problems.append(problem)
                continue
            out[len(kept)] = TileAugment.geometry(tile, symmetries[i])
            kept.append(i)
        return out[: len(kept)], kept, problems, None

    def _read_tile(self, entry: SlideEntry, x: int, y: int) -> np.ndarray:
        """One tile; on failure the slide is reopened and the read tried once more.

        Raises:
            SlideError: The slide cannot be opened again (moved, deleted, truncated).
            Exception: The second read failed too.
        """
        size, size0 = entry.tiles.tile_size, entry.tiles.tile_size_level0
        try:
            return self._slide(entry).read_tile(x, y, size0, size)
        except Exception:  # noqa: BLE001 - a transient failure (NFS, a handle gone bad): retry
            self._forget(entry)
        if not os.path.isfile(entry.path):
            raise SlideError(
                f"slide {entry.slide_id!r}: its file {entry.path} disappeared during the run"
            )
        return self._slide(entry).read_tile(x, y, size0, size)

    def _forget(self, entry: SlideEntry) -> None:
        slide = self._open.pop(entry.path, None)
        if slide is not None:
            try:
                slide.close()
            except Exception:  # noqa: BLE001 - a broken handle may fail to close; it is gone
                pass

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


def _parse_key(key: int | tuple) -> tuple[int, int, str | None, int]:
    """``(slide_index, epoch, dropped reason or None, part)`` of a dataset key."""
    if not isinstance(key, tuple):
        return int(key), 0, None, 0
    index, epoch, dropped, part = (tuple(key) + (0, 0, None, 0)[len(key) :])[:4]
    return int(index), int(epoch), None if dropped is None else str(dropped), int(part)


def _reason(error: BaseException) -> str:
    """What a failed tile read says, on one line."""
    if isinstance(error, MemoryError):
        return "out of memory while reading the tile"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
