"""Which tiles of which slide each rank loads: K-tile sampling, rank shards and slide order.

Every random choice is a pure function of ``(seed, epoch, slide_id[, tile])`` and never of the
rank, the world size or the worker, so a run's inputs are the same however it is parallelised:
under slide parallelism rank r loads the r-th contiguous shard of the very sample a single process
would draw, and the shards concatenated in rank order are exactly that sample.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch.utils.data import DistributedSampler

__all__ = [
    "SlideGroup",
    "SlideSampler",
    "check_part_size",
    "eval_tile_indices",
    "num_parts",
    "part_bounds",
    "sample_tile_indices",
    "shard_bounds",
    "slide_group",
    "slide_key",
    "tile_rng",
    "train_num_parts",
]

# Tags that keep the random streams of sampling and augmentation apart for the same slide.
_SAMPLE_STREAM, _AUGMENT_STREAM, _ORDER_STREAM = 0, 1, 2


def slide_key(slide_id: str) -> int:
    """A stable integer for a slide id (``hash()`` differs between processes; CRC-32 does not)."""
    return zlib.crc32(str(slide_id).encode("utf-8"))


def sample_tile_indices(
    n_tiles: int, k: int, *, seed: int, epoch: int, slide_id: str
) -> np.ndarray:
    """K distinct tile indices drawn from ``(seed, epoch, slide_id)``, in ascending order.

    A slide with at most ``k`` tiles uses all of them. Ascending order keeps reads local in the
    file; the aggregator sees coordinates, not the order.

    Returns:
        ``[min(k, n_tiles)]`` int64.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n_tiles <= k:
        return np.arange(n_tiles, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch, slide_key(slide_id), _SAMPLE_STREAM])
    return np.sort(rng.choice(n_tiles, size=k, replace=False)).astype(np.int64)


def eval_tile_indices(n_tiles: int, eval_k: int | None = None) -> np.ndarray:
    """All tiles, or ``eval_k`` spread evenly over the slide's tile list: fixed, no randomness."""
    if eval_k is None or n_tiles <= eval_k:
        return np.arange(n_tiles, dtype=np.int64)
    return (np.arange(eval_k, dtype=np.int64) * n_tiles) // eval_k


def check_part_size(part_size: int | None, key: str = "eval_part_size") -> None:
    """``part_size`` (the setting ``key``) is an integer >= 1 or ``None``; else a one-line
    ``ValueError`` that names ``key``."""
    if part_size is not None and (
        isinstance(part_size, bool) or not isinstance(part_size, int) or part_size < 1
    ):
        what = "evaluation" if key == "eval_part_size" else "training"
        raise ValueError(
            f"{key} must be an integer >= 1 (tiles per {what} item) or None "
            f"(one item per slide), got {key}={part_size!r}"
        )


def num_parts(n: int, part_size: int | None) -> int:
    """How many items a sample of ``n`` tiles makes with ``part_size`` tiles per item
    (``None``: one); a sample without tiles is still one item, which says so."""
    if part_size is None or n <= part_size:
        return 1
    return -(-n // part_size)


def train_num_parts(n: int, shard_count: int, part_size: int | None) -> int:
    """Training items of a sample of ``n`` tiles sharded over ``shard_count`` ranks, each rank
    reading ``part_size`` of its shard at a time: the same count on every rank (that of the
    largest shard), so the ranks of a group step through a slide's parts together."""
    return num_parts(-(-n // shard_count), part_size)


def part_bounds(n: int, part: int, part_size: int | None) -> tuple[int, int]:
    """``[start, stop)`` of part ``part`` of a sample of ``n`` tiles: consecutive runs of
    ``part_size`` (the last may be shorter), so the parts in order are the whole sample."""
    count = num_parts(n, part_size)
    if not 0 <= part < count:
        raise ValueError(f"part must lie in [0, {count}) for {n} tiles, got {part}")
    if part_size is None:
        return 0, n
    return part * part_size, min(n, (part + 1) * part_size)


def shard_bounds(k: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of rank's contiguous shard of k items; sizes differ by at most one.

    The first ``k % world_size`` ranks hold one item more (``numpy.array_split``'s rule); with
    fewer items than ranks the last ranks hold none.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    base, extra = divmod(k, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


@dataclass(frozen=True)
class SlideGroup:
    """Where a rank sits among the groups of ranks that share one slide per step.

    ``world_size`` ranks form ``count = world_size / size`` groups of ``size`` consecutive ranks
    (on a cluster, a group of 8 is a node). Group ``index`` trains the slides ``index``,
    ``index + count``, ... of the epoch's order; its rank ``rank`` reads and encodes shard
    ``rank`` of each slide's tiles, and its rank 0 aggregates.
    """

    index: int
    count: int
    rank: int
    size: int

    @property
    def leader(self) -> int:
        """Global rank of the group's rank 0, which aggregates its slide."""
        return self.index * self.size

    @property
    def ranks(self) -> list[int]:
        """Global ranks of the group, in shard order."""
        return list(range(self.leader, self.leader + self.size))


def slide_group(rank: int, world_size: int, group_size: int | None = None) -> SlideGroup:
    """The group of ``rank`` when groups of ``group_size`` ranks share a slide.

    ``group_size=None`` is one group of all ranks (every rank gets every slide); ``1`` is plain
    slide data parallelism (every rank its own slides).

    Raises:
        ValueError: ``group_size`` is not a positive divisor of ``world_size``.
    """
    size = world_size if group_size is None else group_size
    valid = isinstance(size, int) and not isinstance(size, bool) and size >= 1
    if not valid or world_size % size:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"strategy.slide_group_size={group_size!r} must divide the world size {world_size} "
            f"(devices x nodes): use one of {divisors}, or null for one group of all ranks."
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    return SlideGroup(rank // size, world_size // size, rank % size, size)


def tile_rng(seed: int, epoch: int, slide_id: str, tile_index: int) -> np.random.Generator:
    """The augmentation randomness of one tile: same tile, same epoch, same draw, on any rank."""
    return np.random.default_rng([seed, epoch, slide_key(slide_id), _AUGMENT_STREAM, tile_index])


class SlideSampler(DistributedSampler):
    """Slide order for one rank; yields ``(slide_index, epoch)`` so the dataset needs no state.

    Ranks form groups of ``group_size`` that share a slide (``slide_group``); chosen by the data
    module from the strategy:

    * slide parallel (one group, ``split_slides=False``): every rank gets every slide in the same
      order; the dataset loads only the rank's shard of each slide's tiles.
    * data parallel (groups of one, ``split_slides=True``): ranks split the slides, as
      ``DistributedSampler`` does.
    * groups of ``group_size`` ranks: group g gets the slides g, g + G, g + 2G, ... of the epoch's
      order (G groups), every rank of the group the same ones. Given the group size the order is
      independent of the world size: step s trains the G consecutive slides sG .. sG + G - 1.

    With more than one group, the training order is padded by repeating slides from its start so
    every group steps equally; evaluation orders are not padded (every slide once).

    In parts (``parts`` given, a count per slide: evaluation parts, or training parts under a
    strategy that streams them): a slide of ``parts[i]`` parts is yielded as
    ``(i, epoch, None, 0)``, ..., ``(i, epoch, None, parts[i] - 1)``, consecutively;
    every rank of a group gets the same ``(slide, part)`` sequence, and a group's slides are the
    same as without parts. A dropped slide is one item, ``(i, epoch, reason, 0)``.

    It subclasses ``DistributedSampler`` so Lightning leaves it in place instead of injecting
    its own. The epoch is taken from ``epoch_source`` when given (the trainer's progress): with
    loader workers a resumed run creates its first iterator before ``set_epoch`` is called
    (Lightning issue #21938), and an epoch read late would replay epoch 0's sample.

    Args:
        n_slides: number of slides in the split.
        shuffle: a new slide order every epoch, from ``(seed, epoch)``.
        seed: the run's data seed.
        num_replicas: world size.
        rank: this process's global rank.
        split_slides: data-parallel mode (see above); ignored when ``group_size`` is given.
        pad: repeat slides so all groups get the same count (training with several groups).
        epoch_source: returns the current epoch; overrides ``set_epoch``.
        dropped_source: returns ``{slide_index: reason}`` of slides dropped earlier in the run;
            they keep their place in the order (every rank steps equally) but are yielded as
            ``(slide_index, epoch, reason)``, which the dataset answers without reading them.
        group_size: ranks per slide group (see above); must divide ``num_replicas``.
        parts: items per slide (``SlideDataset.num_parts``), or ``None`` for one item per slide
            with today's keys.
    """

    def __init__(
        self,
        n_slides: int,
        *,
        shuffle: bool,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        split_slides: bool = False,
        pad: bool = False,
        epoch_source: Callable[[], int] | None = None,
        dropped_source: Callable[[], Mapping[int, str]] | None = None,
        group_size: int | None = None,
        parts: Sequence[int] | None = None,
    ) -> None:
        if parts is not None and (len(parts) != n_slides or any(int(p) < 1 for p in parts)):
            raise ValueError(
                f"parts must give a count >= 1 for each of the {n_slides} slides, got {parts!r}"
            )
        self.parts = None if parts is None else [int(p) for p in parts]
        # DistributedSampler.__init__ needs a dataset and maybe a process group; set its fields.
        self.n_slides = n_slides
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.split_slides = split_slides
        self.pad = pad
        self.epoch = 0
        self.epoch_source = epoch_source
        self.dropped_source = dropped_source
        self.drop_last = False
        if group_size is None:
            group_size = 1 if split_slides else num_replicas
        self.group = slide_group(rank, num_replicas, group_size)

    def current_epoch(self) -> int:
        return int(self.epoch_source()) if self.epoch_source is not None else self.epoch

    def order(self, epoch: int) -> np.ndarray:
        """This rank's slide indices for ``epoch``: its group's share of the epoch's order."""
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch, _ORDER_STREAM])
            order = rng.permutation(self.n_slides)
        else:
            order = np.arange(self.n_slides)
        groups = self.group.count
        if groups == 1:
            return order
        if self.pad and len(order) % groups:
            missing = groups - len(order) % groups
            order = np.concatenate([order, np.resize(order, missing)])
        return order[self.group.index :: groups]

    def keys(self, epoch: int) -> list[tuple]:
        """The dataset keys of ``epoch`` for this rank, in order (see the class docstring)."""
        dropped = self.dropped_source() if self.dropped_source is not None else {}
        keys: list[tuple] = []
        for i in (int(i) for i in self.order(epoch)):
            if self.parts is None:
                keys.append((i, epoch, dropped[i]) if i in dropped else (i, epoch))
            elif i in dropped:
                keys.append((i, epoch, dropped[i], 0))
            else:
                keys.extend((i, epoch, None, p) for p in range(self.parts[i]))
        return keys

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.keys(self.current_epoch()))

    def num_slides(self) -> int:
        """Slides (not parts) this rank is given in an epoch."""
        return len(self.order(self.current_epoch()))

    def __len__(self) -> int:
        # With parts, a dropped slide is one item: the length must match the iteration, or the
        # evaluation loop would stop early.
        if self.parts is None:
            return len(self.order(0))
        return len(self.keys(self.current_epoch()))
