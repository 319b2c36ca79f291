"""Tasks: losses and metrics against hand computations on known logits."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_wsi.models.tasks import BinaryTask, MulticlassTask, RegressionTask, build_task


def _update_all(task, logits: list[torch.Tensor], targets: list[torch.Tensor]) -> dict:
    metrics = task.metrics()
    for lg, tg in zip(logits, targets, strict=True):
        for metric in metrics.values():
            metric.update(*task.metric_inputs(lg, tg))
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def _auroc(scores: list[float], labels: list[int]) -> float:
    """Probability that a positive outscores a negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_binary_loss_and_metrics_by_hand() -> None:
    raw = [2.0, -1.0, 0.5, -0.2, 1.5, -3.0, 0.1]
    labels = [1, 0, 0, 1, 1, 0, 0]
    task = BinaryTask()
    logits = [torch.tensor([v]) for v in raw]
    targets = [torch.tensor(y) for y in labels]
    for v, y, lg, tg in zip(raw, labels, logits, targets, strict=True):
        p = 1 / (1 + math.exp(-v))
        expected = -(y * math.log(p) + (1 - y) * math.log(1 - p))
        assert float(task.loss(lg, tg)) == pytest.approx(expected, rel=1e-6)
    got = _update_all(task, logits, targets)
    probs = [1 / (1 + math.exp(-v)) for v in raw]
    assert got["auroc"] == pytest.approx(_auroc(probs, labels))
    predicted = [p >= 0.5 for p in probs]
    sens = sum(p and y for p, y in zip(predicted, labels, strict=True)) / sum(labels)
    spec = sum(not p and not y for p, y in zip(predicted, labels, strict=True)) / labels.count(0)
    assert got["balanced_accuracy"] == pytest.approx((sens + spec) / 2)
    assert got["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 4) / 2)  # written out once


def test_binary_pos_weight() -> None:
    loss = BinaryTask(pos_weight=3.0).loss(torch.tensor([0.0]), torch.tensor(1))
    assert float(loss) == pytest.approx(3 * math.log(2), rel=1e-6)


def test_multiclass_loss_and_metrics_by_hand() -> None:
    torch.manual_seed(1)
    task = MulticlassTask(num_classes=3)
    logits = [torch.randn(3) * 2 for _ in range(12)]
    labels = [i % 3 for i in range(12)]
    targets = [torch.tensor(y) for y in labels]
    for lg, y, tg in zip(logits, labels, targets, strict=True):
        expected = -math.log(float(lg.softmax(0)[y]))
        assert float(task.loss(lg, tg)) == pytest.approx(expected, rel=1e-5)
    got = _update_all(task, logits, targets)
    probs = [lg.softmax(0).tolist() for lg in logits]
    one_vs_rest = [_auroc([p[c] for p in probs], [y == c for y in labels]) for c in range(3)]
    assert got["auroc"] == pytest.approx(sum(one_vs_rest) / 3, rel=1e-5)
    argmax = [max(range(3), key=p.__getitem__) for p in probs]
    recalls = [
        sum(a == c for a, y in zip(argmax, labels, strict=True) if y == c) / labels.count(c)
        for c in range(3)
    ]
    assert got["balanced_accuracy"] == pytest.approx(sum(recalls) / 3, rel=1e-5)


def test_regression_loss_and_metrics_by_hand() -> None:
    preds = [0.5, 1.5, -0.3, 2.0, 0.9]
    truth = [0.4, 1.0, 0.1, 2.5, 0.7]
    task = RegressionTask()
    got = _update_all(task, [torch.tensor([p]) for p in preds], [torch.tensor(t) for t in truth])
    n = len(preds)
    mp, mt = sum(preds) / n, sum(truth) / n
    cov = sum((p - mp) * (t - mt) for p, t in zip(preds, truth, strict=True))
    var_p = sum((p - mp) ** 2 for p in preds)
    var_t = sum((t - mt) ** 2 for t in truth)
    assert got["pearson"] == pytest.approx(cov / math.sqrt(var_p * var_t), rel=1e-5)
    mse = sum((p - t) ** 2 for p, t in zip(preds, truth, strict=True)) / n
    assert got["mse"] == pytest.approx(mse, rel=1e-5)
    mae = sum(abs(p - t) for p, t in zip(preds, truth, strict=True)) / n
    assert got["mae"] == pytest.approx(mae, rel=1e-5)
    assert float(task.loss(torch.tensor([0.5]), torch.tensor(0.4))) == pytest.approx(0.01)


def test_predictions() -> None:
    assert float(BinaryTask().predict(torch.tensor([0.0]))) == 0.5
    assert MulticlassTask(4).predict(torch.zeros(4)).tolist() == [0.25] * 4
    assert float(RegressionTask().predict(torch.tensor([1.25]))) == 1.25
    assert RegressionTask.prediction_key == "prediction"


def test_build_task_validates_its_input() -> None:
    assert build_task("binary").num_outputs == 1
    assert build_task("multiclass", num_classes=5).num_outputs == 5
    assert build_task("survival").num_outputs == 4  # time bins
    assert build_task("ordinal", num_classes=6).num_outputs == 5  # cumulative logits
    with pytest.raises(
        ValueError, match=r"\['binary', 'multiclass', 'ordinal', 'regression', 'survival'\].*'cox'"
    ):
        build_task("cox")
    with pytest.raises(ValueError, match=r"Task 'ordinal' needs `num_classes`"):
        build_task("ordinal")
    with pytest.raises(ValueError, match="num_classes"):
        build_task("multiclass")
    with pytest.raises(ValueError, match="larger than 1, but got 1"):
        MulticlassTask(num_classes=1)
    with pytest.raises(ValueError, match="multiclass"):
        build_task("binary", num_classes=3)
