"""K-tile sampling, rank shards and slide order: the invariants slide parallelism rests on."""

from __future__ import annotations

import numpy as np
import pytest

from lightning_wsi.data.sampling import (
    SlideGroup,
    SlideSampler,
    eval_tile_indices,
    sample_tile_indices,
    shard_bounds,
    slide_group,
)


def test_sample_is_k_distinct_sorted_and_seeded():
    a = sample_tile_indices(1000, 64, seed=3, epoch=0, slide_id="S1")
    assert a.dtype == np.int64 and len(a) == 64 and len(set(a.tolist())) == 64
    assert np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1000
    np.testing.assert_array_equal(a, sample_tile_indices(1000, 64, seed=3, epoch=0, slide_id="S1"))
    for other in (
        sample_tile_indices(1000, 64, seed=3, epoch=1, slide_id="S1"),  # epochs differ
        sample_tile_indices(1000, 64, seed=4, epoch=0, slide_id="S1"),  # seeds differ
        sample_tile_indices(1000, 64, seed=3, epoch=0, slide_id="S2"),  # slides differ
    ):
        assert not np.array_equal(a, other)


def test_small_slide_uses_all_tiles():
    np.testing.assert_array_equal(
        sample_tile_indices(5, 64, seed=0, epoch=7, slide_id="x"), range(5)
    )
    with pytest.raises(ValueError, match="k must be >= 1"):
        sample_tile_indices(5, 0, seed=0, epoch=0, slide_id="x")


def test_eval_indices_fixed_and_capped():
    np.testing.assert_array_equal(eval_tile_indices(7), range(7))
    capped = eval_tile_indices(1000, 10)
    np.testing.assert_array_equal(capped, [0, 100, 200, 300, 400, 500, 600, 700, 800, 900])
    assert len(eval_tile_indices(3, 10)) == 3


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 7, 64, 65, 66, 67])
def test_shards_are_contiguous_balanced_and_cover(k, world_size):
    bounds = [shard_bounds(k, r, world_size) for r in range(world_size)]
    assert bounds[0][0] == 0 and bounds[-1][1] == k
    for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False):
        assert stop == start
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
    with pytest.raises(ValueError):
        shard_bounds(k, world_size, world_size)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_slide_parallel_ranks_see_the_same_slides_in_the_same_order(world_size):
    samplers = [
        SlideSampler(13, shuffle=True, seed=5, num_replicas=world_size, rank=r)
        for r in range(world_size)
    ]
    for epoch in (0, 1):
        for s in samplers:
            s.set_epoch(epoch)
        orders = [list(s) for s in samplers]
        assert all(o == orders[0] for o in orders)
        assert sorted(i for i, _ in orders[0]) == list(range(13))
        assert all(e == epoch for _, e in orders[0])
    assert [i for i, _ in samplers[0]] != [i for i, _ in SlideSampler(13, shuffle=True, seed=5)]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_data_parallel_ranks_split_the_slides(world_size):
    def order(rank, pad):
        sampler = SlideSampler(
            10, shuffle=True, seed=1, num_replicas=world_size, rank=rank, split_slides=True, pad=pad
        )
        return [i for i, _ in sampler]

    unpadded = [order(r, pad=False) for r in range(world_size)]
    assert sorted(sum(unpadded, [])) == list(range(10))  # each slide exactly once
    padded = [order(r, pad=True) for r in range(world_size)]
    assert len({len(p) for p in padded}) == 1  # equal steps on every rank
    assert set(sum(padded, [])) == set(range(10))


def _group_orders(n, world, size, pad, epoch=0):
    """Each rank's slide indices with groups of ``size`` ranks."""
    orders = []
    for rank in range(world):
        sampler = SlideSampler(
            n, shuffle=True, seed=4, num_replicas=world, rank=rank, group_size=size, pad=pad
        )
        sampler.set_epoch(epoch)
        orders.append([i for i, _ in sampler])
    return orders


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3, 4])
def test_groups_take_every_gth_slide_of_the_one_process_order(size, groups):
    """Group g gets slides g, g + G, ... of the single-process order; every rank of a group the
    same ones. Read back group by group, step by step, they are that order whatever the world
    size: every slide once in evaluation, and padded from the start in training."""
    world, n = size * groups, 11
    for epoch in (0, 1):
        single = SlideSampler(n, shuffle=True, seed=4)
        single.set_epoch(epoch)
        order = [i for i, _ in single]
        for pad in (False, True):
            orders = _group_orders(n, world, size, pad, epoch)
            for rank, ranks_order in enumerate(orders):
                assert ranks_order == orders[rank - rank % size]  # the group's leader's
            leaders = orders[::size]
            steps = max(len(o) for o in leaders)
            merged = [o[s] for s in range(steps) for o in leaders if s < len(o)]
            missing = (-n) % groups if pad else 0
            assert merged == order + order[:missing]
            if pad:  # every group steps equally
                assert {len(o) for o in leaders} == {steps}


def test_slide_group_places_ranks_in_consecutive_blocks():
    assert slide_group(5, 8, 4) == SlideGroup(index=1, count=2, rank=1, size=4)
    assert slide_group(5, 8, 4).leader == 4 and slide_group(5, 8, 4).ranks == [4, 5, 6, 7]
    assert slide_group(5, 8) == SlideGroup(index=0, count=1, rank=5, size=8)  # one group
    assert slide_group(5, 8, 1) == SlideGroup(index=5, count=8, rank=0, size=1)


@pytest.mark.parametrize("size", [3, 0, 8, True])
def test_a_group_size_that_does_not_divide_the_world_is_refused(size):
    expected = (
        rf"strategy\.slide_group_size={size!r} must divide the world size 4 \(devices x nodes\): "
        r"use one of \[1, 2, 4\], or null for one group of all ranks\.$"
    )
    with pytest.raises(ValueError, match=expected):
        SlideSampler(10, shuffle=True, num_replicas=4, rank=0, group_size=size)


def test_epoch_source_wins_over_set_epoch():
    """A resumed run's first iterator is created before set_epoch: read the trainer's epoch."""
    epoch = {"value": 3}
    sampler = SlideSampler(8, shuffle=True, seed=0, epoch_source=lambda: epoch["value"])
    sampler.set_epoch(0)
    items = list(sampler)
    assert {e for _, e in items} == {3}
    reference = SlideSampler(8, shuffle=True, seed=0)
    reference.set_epoch(3)
    assert items == list(reference)
