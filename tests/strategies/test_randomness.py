"""Each rank's random stream, and its exact replay by chunked re-encoding."""

from __future__ import annotations

import contextlib

import torch

from lightning_wsi.models.encoders import create_encoder
from lightning_wsi.strategies.chunked import backward_in_chunks, encode_in_chunks
from lightning_wsi.strategies.randomness import rank_stream, stream_seed


def test_stream_seeds_differ_by_rank_and_step_and_repeat() -> None:
    seeds = {stream_seed(7, rank, epoch, batch) for rank in range(4) for epoch in range(3)
             for batch in range(5)}  # fmt: skip
    assert len(seeds) == 60
    assert stream_seed(7, 1, 2, 3) == stream_seed(7, 1, 2, 3)
    assert stream_seed(7, 1, 2, 3) != stream_seed(8, 1, 2, 3)


def test_the_stream_leaves_the_global_generator_where_it_was() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with rank_stream(stream_seed(0, 1, 0, 0), torch.device("cpu")):
        inside = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)
    with rank_stream(stream_seed(0, 1, 0, 0), torch.device("cpu")):
        assert torch.equal(torch.rand(3), inside)


def test_vit_drop_path_replays_bit_for_bit_in_chunked_backward() -> None:
    """The features the aggregator saw (no-grad chunks) are the features backpropagated
    (recomputed chunks), although drop-path draws a different mask for every chunk."""
    torch.manual_seed(0)
    encoder = create_encoder("test_vit", img_size=32, drop_path_rate=0.5).train()
    tiles = torch.randn(7, 3, 32, 32)
    recomputed: list[torch.Tensor] = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        out = encoder(x)
        if torch.is_grad_enabled():
            recomputed.append(out.detach().clone())
        return out

    with rank_stream(stream_seed(0, 1, 0, 0), torch.device("cpu")):
        features, states = encode_in_chunks(encode, tiles, 3, torch.device("cpu"))
    with torch.no_grad():
        plain = encoder.eval()(tiles)
    encoder.train()
    assert not torch.allclose(features, plain)  # drop-path acted
    grad = torch.randn_like(features)
    before = torch.get_rng_state()
    backward_in_chunks(encode, tiles, grad, 3, states, contextlib.nullcontext)
    assert torch.equal(torch.cat(recomputed), features)
    assert torch.equal(torch.get_rng_state(), before)  # the replay leaves no trace
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)
