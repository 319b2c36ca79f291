"""Gradient caching within one rank: encode in chunks without autograd, re-encode to backpropagate.

Forward: each chunk of tiles is encoded under ``no_grad`` and the RNG state before it is kept.
Backward, once the aggregator has given ``dL/df`` for every tile: each chunk is encoded again with
autograd, from the same RNG state (so dropout and drop-path draw the same masks) and under the same
autocast, and its slice of ``dL/df`` is backpropagated at once, so only one chunk's activations
are alive at any time: peak memory is that of one chunk, whatever K is. The cost is a second
encoder forward (three passes instead of two for forward + backward: a floor of 0.75x).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

__all__ = ["Chunks", "RngState", "backward_in_chunks", "encode_in_chunks"]


class Chunks(Protocol):
    """Tiles that can be read ``size`` at a time, in order, more than once: a tensor
    ``[k, 3, H, W]``, or a slide's streamed parts (``streaming.TileStream``)."""

    def split(self, size: int) -> Iterable[torch.Tensor]: ...


@dataclass
class RngState:
    """The CPU generator and, on CUDA, the device generator, as they were at one moment."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def encode_in_chunks(
    encode: Callable[[torch.Tensor], torch.Tensor],
    tiles: Chunks,
    chunk_size: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, list[RngState]]:
    """Encode ``tiles`` ``[k, 3, H, W]`` ``chunk_size`` at a time without autograd.

    Returns:
        Features ``[k, D]`` (no graph; ``None`` when there was no tile) and the RNG state
        before each chunk.
    """
    states, features = [], []
    with torch.no_grad():
        for chunk in tiles.split(chunk_size):
            states.append(RngState.capture(device))
            features.append(encode(chunk))
    return (torch.cat(features) if features else None), states


def backward_in_chunks(
    encode: Callable[[torch.Tensor], torch.Tensor],
    tiles: Chunks,
    grad: torch.Tensor,
    chunk_size: int,
    states: list[RngState],
    context: Callable[[], AbstractContextManager],
    before_last: Callable[[], None] | None = None,
) -> None:
    """Re-encode each chunk with autograd and backpropagate its rows of ``grad`` ``[k, D]``.

    ``context`` re-enters the forward's precision context (autocast); the RNG state after the
    call is the one before it, so the replay leaves no trace in later randomness.
    ``before_last`` runs just before the last chunk's backward, the one that leaves the encoder's
    gradients final (the gradient sum arms its hooks there).
    """
    after = RngState.capture(states[0].device) if states else None
    # Chunk by chunk as ``tiles`` gives them: a streamed slide reads each from its spill file
    # only now, so only one chunk's tiles are alive.
    pieces = zip(tiles.split(chunk_size), grad.split(chunk_size), states, strict=True)
    try:
        for i, (chunk, chunk_grad, state) in enumerate(pieces):
            state.restore()
            with torch.enable_grad(), context():
                features = encode(chunk)
            del chunk
            if not features.requires_grad:  # a frozen encoder: nothing to backpropagate
                return
            if before_last is not None and i == len(states) - 1:
                before_last()
            torch.autograd.backward(features, chunk_grad.to(features.dtype))
            del features
    finally:
        if after is not None:
            after.restore()
