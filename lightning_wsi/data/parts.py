"""One slide's evaluation parts collected into the whole slide: features, coords and problems.

With ``SlideDataModule(eval_part_size=P)`` an evaluation item is part ``p`` of ``parts`` of a
slide: P consecutive tiles of its fixed evaluation order (of which a rank holds its shard). The
loader's workers read parts ahead while the model encodes the current one, and host memory is
bounded by a part, whatever the slide's size. Whoever encodes the parts (``SlideModule`` in one
process, ``SlideParallelStrategy`` across ranks) adds each part's encoded features ``[n, D]``,
coords ``[n, 2]`` and problems to a :class:`SlideParts`; at the last part it returns the whole
slide, in the order a one-item evaluation would have seen it, and the slide's verdict over all
its parts (left-out tiles summed and judged against the whole sample's ``max_bad_tiles``, as
:func:`~lightning_wsi.data.problems.slide_problem` judges one item). No distributed code here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lightning_wsi.data.problems import slide_problem

__all__ = ["CollectedSlide", "SlideParts", "whole_slide_batch"]

NO_TILE = "no tile of the slide could be read"


@dataclass
class CollectedSlide:
    """A whole slide after its last part.

    Attributes:
        verdict: Why the slide is not used (dropped), or ``None``.
        features: ``[K, D]`` in evaluation order (``None`` where no features were added: a
            rank that does not aggregate, or a dropped slide).
        coords: ``[K, 2]`` int64 level-0 ``(x, y)``, or ``None`` if the parts had none.
        slide_index: ``[K]`` int64 member of each tile for a patient bag, else ``None``.
        rows: ``K``, the tiles that were read and encoded.
    """

    verdict: str | None
    features: torch.Tensor | None
    coords: torch.Tensor | None
    slide_index: torch.Tensor | None
    rows: int


class SlideParts:
    """Collects the parts of one slide at a time, which must arrive in order.

    Call :meth:`begin` with each part's batch (it checks the order), :meth:`add_problems` and
    :meth:`add` with what the part gave, then, when :attr:`last` is true, :meth:`finish`. Part 0
    always starts a new slide: a slide left unfinished (an evaluation loop stopped early, such
    as Lightning's sanity check) is discarded.
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.slide_id: str | None = None
        self.part, self.parts = -1, 0
        self.num_tiles, self.max_bad_tiles, self.bad_tiles, self.rows = 0, 0, 0, 0
        self.reported: str | None = None
        self._features: list[torch.Tensor] = []
        self._coords: list[torch.Tensor] = []
        self._slide_index: list[torch.Tensor] = []

    def begin(self, batch: Mapping[str, Any]) -> None:
        """Start part ``batch["part"]`` of ``batch["parts"]`` (0 and 1 when absent).

        Raises:
            ValueError: The part does not follow the previous one of the same slide; the message
                names the slide, the parts and the fix.
        """
        slide_id = str(batch.get("slide_id"))
        part, parts = int(batch.get("part", 0)), int(batch.get("parts", 1))
        if not 0 <= part < parts:
            raise ValueError(
                f"slide {slide_id!r}: part {part} of {parts} is not a part of the slide; "
                "items need 0 <= part < parts (SlideDataset makes them so)"
            )
        if part == 0:
            self._reset()
            self.slide_id, self.parts = slide_id, parts
            num_tiles = batch.get("num_tiles")
            self.num_tiles = int(num_tiles) if num_tiles is not None else -1
            self.max_bad_tiles = int(batch.get("max_bad_tiles", 0))
        elif (slide_id, parts, part) != (self.slide_id, self.parts, self.part + 1):
            before = (
                f"part {self.part} of {self.parts} of slide {self.slide_id!r}"
                if self.slide_id is not None
                else "no part of it"
            )
            raise ValueError(
                f"slide {slide_id!r}: evaluation part {part} of {parts} arrived after {before}; "
                "a slide's parts must come consecutively, in order: evaluate with "
                "SlideDataModule's loaders (their SlideSampler keeps parts together), or set "
                "eval_part_size=None for one item per slide"
            )
        self.part = part

    @property
    def last(self) -> bool:
        """The current part is the slide's last."""
        return self.part == self.parts - 1

    @property
    def dropped(self) -> bool:
        """The slide is already lost, whatever its remaining parts hold (skip encoding them)."""
        return bool(self.reported) or self.bad_tiles > self.max_bad_tiles

    def add_problems(self, bad_tiles: int, reported: str | None) -> None:
        """Tiles this part left out (all ranks together) and a reason the loader gave, if any
        (the first reason of the slide is kept)."""
        self.bad_tiles += int(bad_tiles)
        if reported and not self.reported:
            self.reported = str(reported)

    def add(
        self,
        rows: int,
        features: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
        slide_index: torch.Tensor | None = None,
    ) -> None:
        """This part's ``rows`` encoded tiles: ``features`` ``[rows, D]`` (``None`` where this
        process does not aggregate), ``coords`` ``[rows, 2]``, ``slide_index`` ``[rows]``."""
        for name, value in (
            ("features", features),
            ("coords", coords),
            ("slide_index", slide_index),
        ):
            if value is not None and len(value) != rows:
                raise ValueError(
                    f"slide {self.slide_id!r} part {self.part}: {name} has {len(value)} rows "
                    f"for {rows} tiles"
                )
        self.rows += int(rows)
        if features is not None:
            self._features.append(features)
        if coords is not None:
            self._coords.append(coords)
        if slide_index is not None:
            self._slide_index.append(slide_index)

    def finish(self) -> CollectedSlide:
        """The whole slide, after its last part; the collector is then empty.

        Raises:
            RuntimeError: The current part is not the slide's last.
        """
        if not self.last:
            raise RuntimeError(
                f"slide {self.slide_id!r}: finish() at part {self.part} of {self.parts}; call "
                "it after the last part"
            )
        num_tiles = self.num_tiles if self.num_tiles >= 0 else self.rows + self.bad_tiles
        verdict = slide_problem(self.bad_tiles, num_tiles, self.max_bad_tiles, self.reported)
        if verdict is None and self.rows == 0:
            verdict = NO_TILE
        slide = CollectedSlide(
            verdict,
            None if verdict or not self._features else torch.cat(self._features),
            _cat(self._coords) if verdict is None else None,
            _cat(self._slide_index) if verdict is None else None,
            self.rows,
        )
        self._reset()
        return slide


def _cat(pieces: list[torch.Tensor]) -> torch.Tensor | None:
    return torch.cat(pieces) if pieces else None


def whole_slide_batch(batch: Mapping[str, Any], slide: CollectedSlide) -> dict[str, Any]:
    """The last part's ``batch`` as the whole slide's: no ``tiles`` or ``tile_index``, the
    slide's ``coords`` ``[K, 2]`` (and ``slide_index`` ``[K]`` for a bag)."""
    whole = {k: v for k, v in batch.items() if k not in ("tiles", "tile_index", "color_jitter")}
    whole["coords"] = slide.coords
    if slide.slide_index is not None or "slide_index" in whole:
        whole["slide_index"] = slide.slide_index
    return whole
