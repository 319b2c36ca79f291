"""Each rank's own random stream for the encoder: dropout and drop-path as one large device draws.

Every rank starts from the same seed and consumes randomness identically, so without this tile j
of every rank's shard would get the same dropout and drop-path masks. One large device holding all
K tiles draws an independent mask for every tile; here each rank encodes inside a stream seeded
from ``(seed, rank, epoch, batch)``: different on every rank, the same run after run for the same
seed and world size, and the same after a resume (the batch's position, not a counter, seeds it).
The global generators are restored afterwards, so nothing outside the encoder sees a difference.
Chunked re-encoding replays the states captured inside the stream (``chunked.RngState``).
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["rank_stream", "stream_seed"]


def stream_seed(seed: int, rank: int, epoch: int, batch: int) -> int:
    """A 63-bit seed drawn from ``(seed, rank, epoch, batch)`` (numpy's SeedSequence mixing)."""
    words = [int(w) & 0xFFFFFFFF for w in (seed, seed >> 32, rank, epoch, batch)]
    state = np.random.SeedSequence(words).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


@contextmanager
def rank_stream(seed: int, device: torch.device) -> Generator[None, None, None]:
    """Run the body with the CPU generator (and ``device``'s CUDA generator) seeded by ``seed``;
    restore both afterwards."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    torch.default_generator.manual_seed(seed)
    if cuda is not None:
        torch.cuda.default_generators[_index(device)].manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
