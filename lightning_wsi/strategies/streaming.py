"""A slide's training parts joined into one step: encoded as they arrive, re-read from a spill file.

With ``SlideDataModule(train_part_size=P)`` under a strategy that streams training parts
(``SlideParallelStrategy`` with ``encode_chunk_size``), a rank's shard of a slide comes from the
loader as parts of at most P tiles, read ahead by its workers. :class:`SlideStreams` wraps the
training loader so that Lightning still sees one batch per slide (one step, one scheduler tick):
the first part's batch, with a :class:`TileStream` under ``STREAM_KEY`` that pulls the others
from the same loader when the step asks for them.

Gradient caching reads every tile twice: the forward without autograd, then the re-encode in
backward. The first pass takes the parts as the loader gives them, moves each through the
trainer's batch transfer (device, colour jitter) and writes its tiles to an anonymous spill file;
the second reads them back a chunk at a time. Host memory is bounded by a part and a chunk,
whatever K. The spill file holds the shard's tiles as they reach the model (uint8 for
``SlideModule``) in ``spill_dir`` (default: the system's temporary folder, ``TMPDIR``, which SLURM
jobs usually point at node-local disk); it is usually served from the page cache, which the
kernel can reclaim, and is deleted when the stream closes. Chunk boundaries are the whole
shard's, as ``tiles.split(chunk)`` would draw them, so a streamed step equals an unstreamed one
exactly. No distributed code here, and no model code.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any, BinaryIO

import torch

from lightning_wsi.strategies.failures import load_error

__all__ = ["STREAM_KEY", "SlideStreams", "TileStream"]

STREAM_KEY = "tile_stream"
_JOINED = ("coords", "tile_index", "slide_index")  # per-tile rows, joined over the parts


class TileStream:
    """A rank's shard of one slide, arriving as parts; read it as chunks, twice.

    The step's batch (part 0's, after transfer) is given to :meth:`begin`; :meth:`split` then
    yields chunks ``[c, 3, H, W]`` of the whole shard: the first call pulls the parts from the
    loader (merging each one's ``coords``, ``tile_index``, ``slide_index`` and problems into the
    batch) and spills their tiles, later calls read the spill file. :meth:`whole` gives the
    shard as one tensor instead (no spill: for a step without gradient caching). ``len()`` is
    the tiles read, known after the first pass.

    Args:
        first: Part 0's batch as the loader gave it (only its slide id and part count are
            used; the step's transferred copy comes through :meth:`begin`).
        rest: The loader's iterator, positioned after part 0.
        to_device: What the trainer does to a batch before the step (precision, hooks,
            device, colour jitter).
        spill_dir: Folder of the spill file; ``None``: the system's temporary folder.
    """

    def __init__(
        self,
        first: Mapping[str, Any],
        rest: Iterator[Any],
        to_device: Callable[[Any], Any],
        spill_dir: str | os.PathLike | None = None,
    ) -> None:
        self.slide_id = str(first.get("slide_id"))
        self.parts = int(first.get("parts", 1))
        self._rest, self._to_device, self._spill_dir = rest, to_device, spill_dir
        self._pulled = 1  # part 0 came with the batch
        self._batch: MutableMapping[str, Any] | None = None
        self._pieces: dict[str, list[torch.Tensor]] = {}
        self._problems: list[dict[str, Any]] = []
        self._reported: str | None = None
        self._rows: int | None = None
        self._read = self._spilled = False
        self._file: BinaryIO | None = None
        self._tile: tuple[tuple[int, int, int], torch.dtype, torch.device] | None = None

    # ------------------------------------------------------------------ the step's side

    def begin(self, batch: MutableMapping[str, Any]) -> None:
        """Take the step's batch (part 0, transferred): the parts' rows and problems are merged
        into it as they arrive, so that after the first pass it reads as the whole shard's."""
        self._batch = batch
        for key in _JOINED:
            if batch.get(key) is not None:
                self._pieces[key] = [torch.as_tensor(batch[key])]
        self._problems = list(batch.get("tile_problems") or ())
        self._reported = batch.get("slide_problem") or None

    def __len__(self) -> int:
        if self._rows is None:
            raise RuntimeError(
                f"slide {self.slide_id!r}: a stream's length is known after its first pass"
            )
        return self._rows

    @property
    def lost(self) -> bool:
        """A part said the slide itself is gone (its file vanished): the rest is not encoded."""
        return self._reported is not None

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Chunks ``[c, 3, H, W]`` of ``size`` tiles (the last may be shorter), in shard order:
        from the loader the first time (spilling them), from the spill file after that."""
        if self._read and not self._spilled:
            raise RuntimeError(
                f"slide {self.slide_id!r}: a stream's parts are read once; whole() keeps no copy"
            )
        if self._read:
            return self._from_spill(size)
        self._spilled = True
        return self._first_pass(size)

    def whole(self) -> torch.Tensor:
        """The whole shard ``[n, 3, H, W]`` as one tensor (the first and only pass; no rows if
        the slide was lost at its first part)."""
        parts = [t.permute(0, 2, 3, 1) for t in self._parts()]
        if not parts:
            assert self._batch is not None
            return self._batch["tiles"]  # part 0's shape, no rows
        return torch.cat(parts).permute(0, 3, 1, 2)

    def close(self, drain: bool = True) -> None:
        """Pull what the step did not (``drain``: the loader then stands at the next slide;
        its problems are still merged), and delete the spill file."""
        try:
            while drain and self._pulled < self.parts:
                self._pull(transfer=False)
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None

    # ------------------------------------------------------------------ first pass

    def _first_pass(self, size: int) -> Iterator[torch.Tensor]:
        carry: torch.Tensor | None = None  # NHWC rows left over from the previous part
        for tiles in self._parts():
            rows = tiles.permute(0, 2, 3, 1)  # the loader's channels-last memory, as it lies
            self._spill(rows)
            if carry is not None and len(carry):
                rows = torch.cat([carry, rows])
            full = len(rows) - len(rows) % size
            for start in range(0, full, size):
                yield rows[start : start + size].permute(0, 3, 1, 2)
            carry = rows[full:].clone()  # a copy: the part itself is let go
            del tiles, rows
        if carry is not None and len(carry):
            yield carry.permute(0, 3, 1, 2)

    def _parts(self) -> Iterator[torch.Tensor]:
        """Each part's tiles on the device, part 0 first; then the batch holds the whole shard's
        rows and problems."""
        if self._batch is None:
            raise RuntimeError(f"slide {self.slide_id!r}: call begin(batch) before reading")
        if self._read:
            raise RuntimeError(f"slide {self.slide_id!r}: a stream's parts are read once")
        self._read, self._rows = True, 0
        batch = self._batch
        tiles = batch["tiles"]
        # The step's batch must not keep part 0 alive (an empty tensor, not a view of it).
        batch["tiles"] = tiles.new_empty((0, *tiles.shape[1:]))
        if not self.lost:
            yield self._count(tiles)
        del tiles  # each part is let go once read
        while self._pulled < self.parts:
            part = self._pull(transfer=not self.lost)
            if part is not None and not self.lost:
                tiles = part["tiles"]
                del part
                yield self._count(tiles)
                del tiles
        for key, pieces in self._pieces.items():
            batch[key] = torch.cat(pieces)
        batch["tile_problems"] = self._problems
        batch["slide_problem"] = self._reported

    def _count(self, tiles: torch.Tensor) -> torch.Tensor:
        assert self._rows is not None
        self._rows += len(tiles)
        return tiles

    def _pull(self, transfer: bool) -> Mapping[str, Any] | None:
        """The next part from the loader, checked, its rows and problems merged (transferred
        first when its tiles will be used)."""
        try:
            part = next(self._rest)
        except StopIteration:
            raise RuntimeError(
                f"slide {self.slide_id!r}: the loader ended after part {self._pulled - 1} of "
                f"{self.parts}; a slide's parts must come consecutively (SlideDataModule's "
                "loader gives them so), or set train_part_size=None"
            ) from None
        error = load_error(part)
        if error is not None:
            raise error
        where = (str(part.get("slide_id")), int(part.get("parts", 1)), int(part.get("part", 0)))
        if where != (self.slide_id, self.parts, self._pulled):
            raise ValueError(
                f"slide {self.slide_id!r}: training part {where[2]} of {where[1]} of slide "
                f"{where[0]!r} arrived where part {self._pulled} of {self.parts} was due; a "
                "slide's parts must come consecutively (SlideDataModule's loader gives them so)"
            )
        self._pulled += 1
        self._problems.extend(part.get("tile_problems") or ())
        if part.get("slide_problem") and self._reported is None:
            self._reported = str(part["slide_problem"])
        if not transfer:
            return None
        part = self._to_device(part)
        for key in _JOINED:
            if part.get(key) is not None:
                self._pieces.setdefault(key, []).append(torch.as_tensor(part[key]))
        return part

    # ------------------------------------------------------------------ spill file

    def _spill(self, rows: torch.Tensor) -> None:
        """Append tiles ``[n, H, W, C]`` to the spill file, as their bytes."""
        if not len(rows):
            return
        data = rows.detach().contiguous().cpu()
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self._spill_dir)
                shape = (rows.shape[1], rows.shape[2], rows.shape[3])
                self._tile = (shape, rows.dtype, rows.device)
            self._file.write(memoryview(data.view(torch.uint8).numpy()).cast("B"))
        except OSError as err:
            where = self._spill_dir if self._spill_dir is not None else tempfile.gettempdir()
            raise OSError(
                f"slide {self.slide_id!r}: cannot write its tiles to a spill file in {where} "
                f"({err.strerror or err}); set strategy.spill_dir to a writable folder with "
                f"room for a shard's tiles ({data[0].nbytes} bytes a tile), or "
                "train_part_size=null to keep them in memory"
            ) from err

    def _from_spill(self, size: int) -> Iterator[torch.Tensor]:
        if not self._rows:
            return
        assert self._file is not None and self._tile is not None
        (h, w, c), dtype, device = self._tile
        width = h * w * c * dtype.itemsize
        self._file.flush()
        for start in range(0, self._rows, size):
            n = min(size, self._rows - start)
            raw = torch.empty((n, h, w, c * dtype.itemsize), dtype=torch.uint8)
            self._file.seek(start * width)
            view = memoryview(raw.numpy()).cast("B")
            done = 0
            while done < len(view):
                got = self._file.readinto(view[done:])
                if not got:
                    raise RuntimeError(
                        f"slide {self.slide_id!r}: its spill file ended early (was the "
                        "temporary folder emptied during the run?)"
                    )
                done += got
            yield raw.view(dtype).to(device).permute(0, 3, 1, 2)


class SlideStreams:
    """Wraps a training loader whose slides come in parts: one batch per slide.

    A slide of one part passes unchanged. The first part of several is yielded with a
    :class:`TileStream` under ``STREAM_KEY`` that pulls the rest when the step reads it; the
    next slide's batch is only fetched after the stream is closed (its unread parts pulled).
    ``len()`` counts slides, so Lightning's steps, schedules and limits count slides. Everything
    else (``sampler``, ``dataset``, ...) is the wrapped loader's.

    Args:
        loader: The training loader; its ``sampler`` has ``num_slides()``.
        to_device: What the trainer does to a batch before the step, for parts 1, 2, ...
        spill_dir: Folder of the streams' spill files (``None``: the temporary folder).
    """

    def __init__(
        self,
        loader: Any,
        to_device: Callable[[Any], Any],
        spill_dir: str | os.PathLike | None = None,
    ) -> None:
        self.loader, self.to_device, self.spill_dir = loader, to_device, spill_dir

    def __iter__(self) -> Iterator[Any]:
        iterator = iter(self.loader)
        stream: TileStream | None = None
        try:
            for batch in iterator:
                parts = int(batch.get("parts", 1)) if isinstance(batch, Mapping) else 1
                if parts <= 1 or load_error(batch) is not None:
                    yield batch
                    continue
                stream = TileStream(batch, iterator, self.to_device, self.spill_dir)
                first = [{**batch, STREAM_KEY: stream}]
                del batch  # the step's batch alone holds part 0's tiles (the stream lets go)
                yield first.pop()
                stream.close()
                stream = None
        finally:  # the loop stopped early (a limit, an error): the loader is not read on
            if stream is not None:
                stream.close(drain=False)

    def __len__(self) -> int:
        return int(self.loader.sampler.num_slides())

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not yet set (unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)
