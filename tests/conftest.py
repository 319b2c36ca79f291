"""Shared fixtures: slides with a known geometry, written as real pyramidal TIFFs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from slide_files import write_grid_slide


@pytest.fixture
def grid_slide(tmp_path: Path) -> Callable[..., Path]:
    """``grid_slide(cells, n_x, n_y, cell_px, mpp, flavour="tiff", seed=0)``: a new grid slide."""
    counter = iter(range(10_000))

    def write(*args, flavour: str = "tiff", **kwargs) -> Path:
        suffix = ".svs" if flavour == "svs" else ".tiff"
        path = tmp_path / f"slide{next(counter)}{suffix}"
        return write_grid_slide(path, *args, flavour=flavour, **kwargs)

    return write


@pytest.fixture(autouse=True)
def _restore_environment():
    """Undo what a test's in-process Lightning launch writes into ``os.environ``.

    Lightning's spawn and fork launchers set ``MASTER_PORT``, ``LOCAL_RANK`` and friends in the
    launching process; left behind, they make every later subprocess (a training command, a
    notebook kernel) believe it is a rank of a run that no longer exists.
    """
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
