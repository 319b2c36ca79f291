"""Hydra resolvers the shipped configs use (registered when ``lightning_wsi`` is imported).

``${lwsi_swept:${hydra.overrides.task}}`` names a sweep job's folder by the swept keys only;
``${lwsi_workers:4}`` is a loader worker count that fits the machine.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

from omegaconf import OmegaConf

__all__ = ["loader_workers", "swept_dirname"]

_SWEEPS = ("range(", "choice(", "glob(", "interval(", "shuffle(", "sort(")


def swept_dirname(overrides: Sequence[str], argv: Sequence[str] | None = None) -> str:
    """A sweep job's folder name from the keys the command line sweeps (``K=8,split_seed=1``),
    not every override: a manifest path would nest the folder six levels deep.

    Keys whose value on the command line is a list (``K=8,32``) or a sweep function
    (``range(...)``) count as swept; without them (a job started elsewhere), every override
    whose value is not a path.
    """
    argv = sys.argv[1:] if argv is None else argv
    swept = {
        a.split("=", 1)[0].lstrip("+~")
        for a in argv
        if "=" in a and ("," in _outside_brackets(a.split("=", 1)[1])
                         or a.split("=", 1)[1].startswith(_SWEEPS))
    }  # fmt: skip
    keys = [o.split("=", 1)[0].lstrip("+~") for o in overrides]
    chosen = [o for o, k in zip(overrides, keys, strict=True) if k in swept]
    if not chosen:
        chosen = [o for o in overrides if "/" not in o.split("=", 1)[-1]]
    name = re.sub(r"[^A-Za-z0-9._=,+-]+", "_", ",".join(chosen))[:120]
    return name or "run"


def _outside_brackets(value: str) -> str:
    """``value`` without what lies inside brackets (a list value is not a sweep)."""
    depth, kept = 0, []
    for char in value:
        depth += char in "[({"
        depth -= char in "])}"
        if depth == 0 and char not in "])}":
            kept.append(char)
    return "".join(kept)


def loader_workers(cap: int = 4) -> int:
    """Loader worker processes for this machine: one core is left to the training process."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(int(cap), cores - 1))


OmegaConf.register_new_resolver("lwsi_swept", swept_dirname, replace=True)
OmegaConf.register_new_resolver("lwsi_workers", loader_workers, replace=True)
