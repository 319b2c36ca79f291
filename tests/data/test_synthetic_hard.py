"""The "hard" synthetic task: sparse small lesions, distractors on all slides, classic unchanged."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from scipy import ndimage

from lightning_wsi.data.synthetic import make_synthetic_dataset, make_synthetic_slide

SMALL_UM = (400, 300)
TILE_PX = 56  # a 112 µm tile at 2 µm/px


def _sha(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def test_classic_pixels_are_those_before_the_hard_variant_existed():
    # Hashes computed on the code before `task` was added (commit c462fe4).
    positive = make_synthetic_slide(3, positive=True, size_um=SMALL_UM, mpp=1.0)
    negative = make_synthetic_slide(4, size_um=SMALL_UM, mpp=1.0, task="classic")
    assert _sha(positive.image) == (
        "e0e52acf2f03e1fcc5ac84f645de397d4124e1243fbf5cd38e468d4550d669c1"
    )
    assert _sha(negative.image) == (
        "3cdc4f60bd82d007b173bd309d09266563f5add148d9f4d355305b6aca27154c"
    )
    assert positive.lesions == [(62, 46, 164, 162)]
    assert positive.distractors == [] and positive.distractor_mask is None


@pytest.fixture(scope="module")
def hard_pairs() -> list[tuple]:
    """(positive, negative) "hard" slides of the same seed at the demo's 2 µm/px."""
    return [
        (
            make_synthetic_slide(seed, positive=True, mpp=2.0, task="hard"),
            make_synthetic_slide(seed, positive=False, mpp=2.0, task="hard"),
        )
        for seed in range(2)
    ]


def test_hard_lesions_are_one_to_three_and_one_to_two_tiles_across(hard_pairs):
    for positive, _ in hard_pairs:
        assert positive.label == 1 and positive.task == "hard"
        assert 1 <= len(positive.lesions) <= 3, positive.lesions
        for _, _, w, h in positive.lesions:  # radius 0.5-0.85 tiles, 0.52-1.48x by the wobble
            assert 0.52 * TILE_PX <= max(w, h) <= 2 * 0.85 * 1.48 * TILE_PX, (w, h)
        assert 0.005 <= positive.lesion_fraction <= 0.05, positive.lesion_fraction


def test_every_hard_slide_has_the_same_distractors_whatever_its_label(hard_pairs):
    for positive, negative in hard_pairs:
        assert negative.label == 0 and negative.lesions == [] and not negative.lesion_mask.any()
        assert 1 <= len(negative.distractors) <= 2
        assert positive.distractors == negative.distractors
        assert np.array_equal(positive.distractor_mask, negative.distractor_mask)
        for _, _, w, h in negative.distractors:  # radius 0.25-0.65 tiles, two may touch
            assert 0.26 * TILE_PX <= max(w, h) <= 2 * 2 * 0.65 * 1.48 * TILE_PX, (w, h)
        # lesions are placed away from the aggregates: no lesion pixel lies in one
        assert not (positive.lesion_mask & positive.distractor_mask).any()


def test_a_hard_positive_differs_from_its_negative_only_at_its_lesions():
    positive = make_synthetic_slide(7, positive=True, size_um=(900, 700), mpp=1.0, task="hard")
    negative = make_synthetic_slide(7, positive=False, size_um=(900, 700), mpp=1.0, task="hard")
    assert positive.lesions and positive.image.shape == negative.image.shape
    changed = (positive.image != negative.image).any(axis=2)
    # the lesion's soft edge: a separable 4 µm Gaussian truncated at 4 sigma, a 16 µm square
    near = ndimage.distance_transform_cdt(~positive.lesion_mask, metric="chessboard") <= 16
    assert changed.any() and not (changed & ~near).any()
    assert changed[positive.lesion_mask].mean() > 0.9


def test_hard_is_deterministic_and_not_classic():
    a = make_synthetic_slide(5, positive=True, size_um=(800, 600), mpp=1.0, task="hard")
    b = make_synthetic_slide(5, positive=True, size_um=(800, 600), mpp=1.0, task="hard")
    classic = make_synthetic_slide(5, positive=True, size_um=(800, 600), mpp=1.0)
    assert _sha(a.image) == _sha(b.image) and a.lesions == b.lesions
    assert _sha(a.image) != _sha(classic.image)
    assert np.array_equal(a.tissue_mask, classic.tissue_mask)  # same tissue, new law on it


def test_unknown_task_is_refused_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"data\.synthetic\.task.*'easy'"):
        make_synthetic_dataset(tmp_path, 2, task="easy")
    with pytest.raises(ValueError, match=r"`task` in \('classic', 'hard'\).*'Hard'"):
        make_synthetic_slide(0, task="Hard")


def test_the_dataset_records_its_task_and_regenerates_for_the_other(tmp_path):
    small = {"mpps": {"tiff": 2.0, "svs": 2.0}, "num_workers": 0, "progress": False}
    manifest = make_synthetic_dataset(tmp_path, 1, **small)
    params = json.loads((tmp_path / "synthetic.json").read_text())
    assert "task" not in params  # classic datasets written before the option stay valid
    classic = (tmp_path / "slides" / "syn_000.tiff").read_bytes()

    assert make_synthetic_dataset(tmp_path, 1, task="hard", **small) == manifest
    assert json.loads((tmp_path / "synthetic.json").read_text())["task"] == "hard"
    hard = (tmp_path / "slides" / "syn_000.tiff").read_bytes()
    assert hard != classic

    make_synthetic_dataset(tmp_path, 1, task="classic", **small)
    assert (tmp_path / "slides" / "syn_000.tiff").read_bytes() == classic
