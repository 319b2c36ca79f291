"""Ordinal grades: the cumulative-logit loss by hand, monotone probabilities, the median grade the
metrics score, quadratic weighted kappa against a hand computation, its bootstrap interval, the
PANDA preset, and a few training steps of a real SlideModule."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from slide_batches import make_slides, make_trainer
from torch.utils.data import DataLoader

from lightning_wsi import SlideModule
from lightning_wsi.models.tasks.ordinal import OrdinalTask, median_grade
from lightning_wsi.ordinal_reports import KappaCI, format_kappa, kappa_ci, quadratic_kappa

CONF = Path(__file__).resolve().parents[2] / "conf"


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _qwk(preds: list[int], targets: list[int], c: int) -> float:
    """Cohen's quadratic weighted kappa from its definition (as scikit-learn computes it)."""
    n = len(preds)
    observed = [[0.0] * c for _ in range(c)]
    for p, t in zip(preds, targets, strict=True):
        observed[t][p] += 1
    rows = [sum(observed[i]) for i in range(c)]
    cols = [sum(observed[i][j] for i in range(c)) for j in range(c)]
    w = [[(i - j) ** 2 / (c - 1) ** 2 for j in range(c)] for i in range(c)]
    num = sum(w[i][j] * observed[i][j] for i in range(c) for j in range(c))
    den = sum(w[i][j] * rows[i] * cols[j] / n for i in range(c) for j in range(c))
    return 1 - num / den


# ------------------------------------------------------------------ the task


def test_loss_and_probabilities_by_hand_for_three_grades() -> None:
    task = OrdinalTask(num_classes=3)
    z0, z1 = 0.3, -0.4
    g0 = z0
    g1 = z0 - math.log1p(math.exp(z1))  # g1 = g0 - softplus(z1)
    p_above = [_sigmoid(g0), _sigmoid(g1)]  # P(grade > 0), P(grade > 1)
    expected = [1 - p_above[0], p_above[0] - p_above[1], p_above[1]]
    logits = torch.tensor([z0, z1])
    assert task.num_outputs == 2
    assert task.cumulative_probabilities(logits).tolist() == pytest.approx(p_above, rel=1e-6)
    assert task.predict(logits).tolist() == pytest.approx(expected, rel=1e-5)
    for grade in range(3):
        loss = task.loss(logits, torch.tensor(grade))
        assert float(loss) == pytest.approx(-math.log(expected[grade]), rel=1e-5)
    # written out once: g = [0.3, 0.3 - 0.5130] -> P(grade = 1) = 0.57444 - 0.44701
    assert float(task.loss(logits, torch.tensor(1))) == pytest.approx(2.0605, abs=1e-3)


def test_cumulative_probabilities_never_rise_and_grades_form_a_distribution() -> None:
    task = OrdinalTask(num_classes=6)
    torch.manual_seed(3)
    logits = torch.randn(300, 5) * 4
    logits[0] = torch.tensor([40.0, -200.0, -200.0, 30.0, -60.0])  # vanishing and huge gaps
    logits[1] = torch.tensor([-40.0, 20.0, 20.0, 20.0, 20.0])
    logits[2] = torch.tensor([0.0, -30.0, -30.0, 5.0, -20.0])  # gaps below float32's epsilon
    cumulative = task.cumulative_probabilities(logits)
    assert (cumulative[:, 1:] <= cumulative[:, :-1]).all()
    probs = task.predict(logits)
    assert (probs >= 0).all()
    assert probs.sum(-1).tolist() == pytest.approx([1.0] * 300, abs=1e-5)
    logits.requires_grad_(True)
    targets = torch.arange(300) % 6
    nll = -task.log_probabilities(logits)[torch.arange(300), targets]
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(logits.grad).all()
    for i in (0, 1, 2):
        assert float(task.loss(logits[i], targets[i])) == pytest.approx(float(nll[i]), rel=1e-6)


def test_scored_grade_is_the_median_of_the_predicted_probabilities() -> None:
    task = OrdinalTask(num_classes=6)
    torch.manual_seed(4)
    logits = torch.randn(500, 5) * 3
    grades = task.grade(logits)
    assert grades.tolist() == median_grade(task.predict(logits)).tolist()
    assert grades.tolist() == (task.cumulative_probabilities(logits) > 0.5).sum(-1).tolist()
    for lg, g in zip(logits[:20], grades[:20], strict=True):
        preds, target = task.metric_inputs(lg, torch.tensor(4))
        assert preds.tolist() == [int(g)] and target.tolist() == [4]
        assert preds.dtype == torch.long
    # median, not arg-max: P = [0.1, 0.44, 0.46] scores grade 1
    g0, g1 = math.log(0.9 / 0.1), math.log(0.46 / 0.54)
    logits = torch.tensor([g0, math.log(math.expm1(g0 - g1))])
    probs = OrdinalTask(3).predict(logits)
    assert probs.tolist() == pytest.approx([0.1, 0.44, 0.46], abs=1e-6)
    assert int(OrdinalTask(3).grade(logits)) == 1 and int(probs.argmax()) == 2


def test_metrics_are_quadratic_kappa_and_accuracy_of_the_median_grade() -> None:
    task = OrdinalTask(num_classes=6)
    torch.manual_seed(5)
    targets = [i % 6 for i in range(40)]
    logits = [torch.randn(5) + torch.tensor([t - 2.5, -1.0, -1.0, -1.0, -1.0]) for t in targets]
    metrics = task.metrics()
    assert set(metrics) == {"qwk", "accuracy"}
    for lg, t in zip(logits, targets, strict=True):
        for metric in metrics.values():
            metric.update(*task.metric_inputs(lg, torch.tensor(t)))
    grades = [int(task.grade(lg)) for lg in logits]
    assert len(set(grades)) > 2 and grades != targets  # neither trivial nor perfect
    reference = _qwk(grades, targets, 6)
    assert float(metrics["qwk"].compute()) == pytest.approx(reference, rel=1e-5)
    accuracy = sum(g == t for g, t in zip(grades, targets, strict=True)) / 40
    assert float(metrics["accuracy"].compute()) == pytest.approx(accuracy)
    assert quadratic_kappa(grades, targets, 6) == pytest.approx(reference, rel=1e-12)
    assert quadratic_kappa([0, 1, 2, 2], [0, 1, 1, 2], 3) == pytest.approx(0.8)


def test_bad_targets_and_head_sizes_name_the_fix() -> None:
    task = OrdinalTask(num_classes=6)
    with pytest.raises(ValueError, match=r"grade in 0\.\.5 .*got 6; check the manifest's `label`"):
        task.loss(torch.zeros(5), torch.tensor(6))
    with pytest.raises(ValueError, match=r"got 2\.5"):
        task.loss(torch.zeros(5), torch.tensor(2.5))
    with pytest.raises(ValueError, match=r"\[\.\.\., 5\] .*got \(6,\).*num_outputs=5"):
        task.predict(torch.zeros(6))
    with pytest.raises(ValueError, match="task.num_classes.*6 for ISUP"):
        OrdinalTask(num_classes=1)
    assert float(task.loss(torch.zeros(5), torch.tensor(3.0))) > 0  # a float grade is accepted


# ------------------------------------------------------------------ kappa with its interval


def _noisy_grades(n: int, seed: int) -> tuple[list[int], list[int]]:
    rng = np.random.default_rng(seed)
    targets = (np.arange(n) % 6).tolist()
    preds = np.clip(np.array(targets) + rng.integers(-1, 2, n), 0, 5).tolist()
    return preds, targets


def test_kappa_interval_is_the_percentiles_of_resampled_kappas() -> None:
    preds, targets = _noisy_grades(60, seed=0)
    ci = kappa_ci(preds, targets, num_classes=6, n_bootstrap=200, seed=7)
    assert ci.has_interval and ci.note == "" and ci.resamples == 200
    assert ci.kappa == pytest.approx(_qwk(preds, targets, 6), rel=1e-12)
    idx = np.random.default_rng(7).integers(0, 60, (200, 60))
    scores = [_qwk([preds[i] for i in row], [targets[i] for i in row], 6) for row in idx]
    low, high = np.percentile(scores, [2.5, 97.5])
    assert (ci.low, ci.high) == pytest.approx((low, high), rel=1e-12)
    assert ci.low < ci.kappa < ci.high
    assert kappa_ci(preds, targets, 6, n_bootstrap=200, seed=7) == ci
    line = format_kappa(ci)
    assert re.fullmatch(
        r"val/qwk 0\.\d{3} \[0\.\d\d, 0\.\d\d\]  \(95% bootstrap CI, 200 resamples\)", line
    )
    assert format_kappa(KappaCI(0.8123, 0.704, 0.897, resamples=1000)) == (
        "val/qwk 0.812 [0.70, 0.90]  (95% bootstrap CI, 1000 resamples)"
    )


def test_kappa_interval_is_withheld_where_it_means_nothing() -> None:
    preds, targets = _noisy_grades(12, seed=1)
    few = kappa_ci(preds, targets, 6)
    assert few.kappa == pytest.approx(_qwk(preds, targets, 6)) and not few.has_interval
    assert few.note == "12 slides: too few for a bootstrap interval, need >= 20"
    assert math.isnan(few.low) and math.isnan(few.high) and few.resamples == 0
    assert format_kappa(few).endswith("(no interval: 12 slides: too few for a bootstrap "
                                      "interval, need >= 20)")  # fmt: skip
    one = kappa_ci([0, 1, 2] * 10, [3] * 30, 6)
    assert math.isnan(one.kappa) and "all of grade 3" in one.note
    assert (
        format_kappa(one)
        == "val/qwk n/a  (30 slides, all of grade 3: kappa needs targets of >= 2 grades)"
    )
    perfect = kappa_ci([0, 1, 2] * 10, [0, 1, 2] * 10, 6)
    assert perfect.kappa == 1.0 and "every resample gives kappa 1.000" in perfect.note
    rare = kappa_ci([0] * 24 + [5], [0] * 24 + [5], 6)  # the grade-5 slide is in ~64% of resamples
    assert re.fullmatch(
        r"only 6\d% of 1000 resamples hold >= 2 target grades, need >= 90%", rare.note
    )
    off = kappa_ci(preds * 2, targets * 2, 6, n_bootstrap=0)
    assert off.note == "bootstrap off (0 resamples)" and math.isfinite(off.kappa)


def test_kappa_refuses_probabilities_and_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match=r"`preds` to be integer grades in 0\.\.5, got \[0\.3\]"):
        kappa_ci([0.3, 1, 2], [0, 1, 2], 6)
    with pytest.raises(ValueError, match=r"`targets` .* got \[7\.0\]"):
        kappa_ci([0, 1, 2], [0, 1, 7], 6)
    with pytest.raises(ValueError, match="as many preds as targets, got 3 and 2"):
        kappa_ci([0, 1, 2], [0, 1], 6)


# ------------------------------------------------------------------ preset and training


def test_panda_preset_mirrors_the_monai_tutorial() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose("train", overrides=["experiment=panda_isup"])
    assert (cfg.task.name, cfg.task.num_classes) == ("ordinal", 6)
    assert (cfg.K, cfg.tile_size, cfg.mpp) == (44, 256, 2.0)
    assert (cfg.encoder.name, cfg.aggregator.name) == ("resnet50", "transformer")
    assert (cfg.encoder_lr, cfg.aggregator_lr, cfg.model.weight_decay) == (3e-5, 3e-5, 0.0)
    assert (cfg.trainer.max_epochs, cfg.trainer.accumulate_grad_batches) == (50, 4)
    assert cfg.data.datamodule.task == "ordinal" and cfg.model.num_classes == 6
    assert OrdinalTask(cfg.task.num_classes).num_outputs == 5


def test_slide_module_with_the_ordinal_task_trains_and_logs_kappa() -> None:
    slides = make_slides(8, k=4, tile_size=32, task="multiclass", num_classes=6)
    module = SlideModule("test_resnet", "gma", OrdinalTask(6), warmup_steps=0)
    before = [p.detach().clone() for p in module.aggregator.parameters()]
    trainer = make_trainer(max_epochs=1, limit_train_batches=4)
    trainer.fit(
        module,
        DataLoader(slides[:4], batch_size=None),
        DataLoader(slides[4:], batch_size=None),
    )
    metrics = trainer.callback_metrics
    assert math.isfinite(float(metrics["train/loss_epoch"]))
    assert math.isfinite(float(metrics["val/loss"]))
    assert {"val/qwk", "val/accuracy"} <= set(metrics)
    assert 0.0 <= float(metrics["val/accuracy"]) <= 1.0
    after = list(module.aggregator.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    out = module.predict_output(module(slides[0]["tiles"]), slides[0])
    assert out["probabilities"].shape == (6,)
    assert float(out["probabilities"].sum()) == pytest.approx(1.0, abs=1e-5)
