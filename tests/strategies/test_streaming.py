"""``TileStream`` and ``SlideStreams`` on hand-made parts: chunks, spill, problems, order."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lightning_wsi.strategies.failures import LOAD_ERROR_KEY
from lightning_wsi.strategies.streaming import STREAM_KEY, SlideStreams, TileStream


def _part(slide: str, part: int, parts: int, tiles: torch.Tensor, start: int) -> dict[str, Any]:
    """A loader item: ``tiles`` ``[n, 3, H, W]`` channels-last, as ``SlideDataset`` gives."""
    n = len(tiles)
    return {
        "tiles": tiles,
        "coords": torch.arange(start, start + n).repeat(2, 1).T.contiguous(),
        "tile_index": torch.arange(start, start + n),
        "slide_id": slide,
        "part": part,
        "parts": parts,
        "tile_problems": [],
        "slide_problem": None,
        "num_tiles": 0,
    }


def _slide(slide: str, sizes: list[int], dtype: torch.dtype = torch.uint8) -> list[dict]:
    """A slide's parts of ``sizes`` tiles of fresh random pixels."""
    items, start = [], 0
    for p, n in enumerate(sizes):
        if dtype == torch.uint8:
            pixels = torch.randint(0, 256, (n, 5, 5, 3), dtype=torch.uint8)
        else:
            pixels = torch.randn(n, 5, 5, 3).to(dtype)
        items.append(_part(slide, p, len(sizes), pixels.permute(0, 3, 1, 2), start))
        start += n
    return items


def _stream(items: list[dict], to_device: Any = lambda b: b) -> tuple[TileStream, dict]:
    rest = iter(items[1:])
    stream = TileStream(items[0], rest, to_device)
    batch = dict(items[0])
    stream.begin(batch)
    return stream, batch


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("sizes", "chunk"), [([10, 10, 3], 4), ([7, 0, 5], 3), ([5], 8)])
def test_chunks_are_the_whole_shards_split_on_both_passes(
    sizes: list[int], chunk: int, dtype: torch.dtype
) -> None:
    items = _slide("s", sizes, dtype)
    whole = torch.cat([i["tiles"].permute(0, 2, 3, 1) for i in items]).permute(0, 3, 1, 2)
    want = list(whole.split(chunk))
    stream, batch = _stream(items)
    for _ in range(2):  # from the loader (spilling), then from the spill file
        got = list(stream.split(chunk))
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and torch.equal(g, w)
            assert g.stride() == w.stride()  # channels-last, as the loader's tensor
    assert len(stream) == sum(sizes)
    # The batch now reads as the whole shard's, and no longer holds part 0's tiles.
    assert torch.equal(batch["tile_index"], torch.arange(sum(sizes)))
    assert batch["coords"].shape == (sum(sizes), 2)
    assert len(batch["tiles"]) == 0
    stream.close()


def test_whole_gives_the_shard_in_one_tensor_without_a_spill() -> None:
    items = _slide("s", [4, 6])
    stream, _ = _stream(items)
    whole = stream.whole()
    assert torch.equal(whole, torch.cat([i["tiles"] for i in items]))
    assert stream._file is None
    with pytest.raises(RuntimeError, match="read once"):
        list(stream.split(2))
    lost = _slide("s", [4, 6])
    lost[0]["slide_problem"] = "slide 's': its file vanished"
    stream, batch = _stream(lost)
    assert stream.whole().shape == (0, 3, 5, 5) and len(stream) == 0  # no error: a verdict
    assert batch["slide_problem"] == "slide 's': its file vanished"


def test_a_part_is_let_go_once_its_chunks_are_read() -> None:
    # Host memory is bounded by the part: no earlier part stays alive during the first pass.
    refs: list[weakref.ref] = []

    def loader() -> Iterator[dict]:  # makes each part when asked, as a loader does
        for p in range(4):
            pixels = torch.randint(0, 256, (6, 5, 5, 3), dtype=torch.uint8)
            item = _part("s", p, 4, pixels.permute(0, 3, 1, 2), 6 * p)
            refs.append(weakref.ref(item["tiles"]))
            yield item
            del item, pixels

    items = loader()
    first = next(items)
    stream = TileStream(first, items, lambda b: b)
    stream.begin(dict(first))
    del first
    alive = []
    for _ in stream.split(4):
        gc.collect()
        alive.append(sum(r() is not None for r in refs))
    assert len(refs) == 4
    assert max(alive) <= 2  # the part being read, and the one whose last rows carry over
    stream.close()


def test_problems_of_every_part_are_merged_and_a_lost_slide_stops_encoding() -> None:
    items = _slide("s", [4, 4, 4, 4])
    items[1]["tile_problems"] = [{"x": 1, "y": 2, "error": "bad"}]
    items[2]["slide_problem"] = "slide 's': its file /x.svs disappeared during the run"
    items[2]["tiles"] = items[2]["tiles"][:0]
    pulled = []
    stream, batch = _stream(items, lambda b: pulled.append(b["part"]) or b)
    chunks = list(stream.split(4))
    assert len(chunks) == 2 and len(stream) == 8  # parts 0 and 1; nothing after the loss
    assert pulled == [1, 2]  # part 3 drained without moving it to the device
    assert stream.lost
    assert batch["slide_problem"].endswith("disappeared during the run")
    assert batch["tile_problems"] == [{"x": 1, "y": 2, "error": "bad"}]


def test_parts_out_of_order_or_missing_or_failing_are_named() -> None:
    items = _slide("s", [2, 2, 2])
    stream, _ = _stream([items[0], items[2]])
    with pytest.raises(ValueError, match=r"slide 's': training part 2 of 3 .* part 1 of 3"):
        list(stream.split(2))
    stream, _ = _stream(items[:2])
    with pytest.raises(RuntimeError, match=r"slide 's': the loader ended after part 1 of 3"):
        list(stream.split(2))
    marker = {"tiles": torch.zeros((0, 3, 1, 1), dtype=torch.uint8),
              LOAD_ERROR_KEY: OSError("disk gone")}  # fmt: skip
    stream, _ = _stream([items[0], marker])
    with pytest.raises(OSError, match="disk gone"):
        list(stream.split(2))
    with pytest.raises(RuntimeError, match="known after its first pass"):
        len(TileStream(items[0], iter(()), lambda b: b))


class _Loader:
    """Items in order; ``sampler.num_slides()`` as ``SlideSampler`` gives it."""

    def __init__(self, items: list[dict], slides: int) -> None:
        self.items, self.fetched = items, 0
        self.sampler = type("Sampler", (), {"num_slides": lambda _: slides})()

    def __iter__(self) -> Iterator[dict]:
        for item in self.items:
            self.fetched += 1
            yield item


def test_slide_streams_yield_one_batch_per_slide() -> None:
    one = _slide("one", [3])
    many = _slide("many", [2, 2, 2])
    last = _slide("last", [2, 1])
    loader = _Loader(one + many + last, slides=3)
    streams = SlideStreams(loader, lambda b: b)
    assert len(streams) == 3
    assert streams.sampler is loader.sampler  # the loader's attributes pass through
    batches = iter(streams)
    first = next(batches)
    assert first is one[0] and STREAM_KEY not in first  # a one-part slide passes unchanged
    second = next(batches)
    assert second[STREAM_KEY].slide_id == "many"
    assert torch.equal(second["tiles"], many[0]["tiles"])
    assert loader.fetched == 2  # the later parts wait for the step
    third = next(batches)  # the step read nothing: "many"'s other parts are pulled first
    assert loader.fetched == 5 and third[STREAM_KEY].slide_id == "last"
    third[STREAM_KEY].begin(dict(third))
    assert len(list(third[STREAM_KEY].split(2))) == 2
    assert loader.fetched == 6
    with pytest.raises(StopIteration):
        next(batches)


def test_a_loop_that_stops_inside_a_slide_reads_no_further() -> None:
    loader = _Loader(_slide("many", [2, 2, 2]) + _slide("next", [1]), slides=2)
    batches = iter(SlideStreams(loader, lambda b: b))
    stream = next(batches)[STREAM_KEY]
    stream.begin(dict(loader.items[0]))
    next(iter(stream.split(1)))  # the step has started reading part 0 (the file exists)
    assert stream._file is not None
    batches.close()  # a limit reached: Lightning lets go of the iterator
    assert loader.fetched == 1 and stream._file is None


def test_a_spill_folder_that_cannot_be_written_is_named_with_the_fix(tmp_path) -> None:
    items = _slide("s", [2, 2])
    missing = tmp_path / "no" / "such"
    stream = TileStream(items[0], iter(items[1:]), lambda b: b, spill_dir=missing)
    stream.begin(dict(items[0]))
    with pytest.raises(OSError, match=rf"slide 's': cannot write its tiles to a spill file in "
                       rf"{missing} .*set strategy.spill_dir .*75 bytes a tile"):  # fmt: skip
        list(stream.split(2))
