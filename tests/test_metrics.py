"""Classification metrics checked against scikit-learn, fed in uneven batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from dltemplate.metrics.base import MetricCollection
from dltemplate.metrics.classification import (
    Accuracy,
    ConfusionMatrix,
    PrecisionRecallF1,
    TopKAccuracy,
)

NUM_CLASSES = 5
NEVER_PREDICTED = NUM_CLASSES - 1
BATCH_SIZES = [7, 1, 13, 32, 4, 23]  # uneven, 80 samples in all


@pytest.fixture
def data() -> tuple[torch.Tensor, torch.Tensor]:
    """Random logits and targets; the last class is in the targets but never predicted."""
    gen = torch.Generator().manual_seed(0)
    n = sum(BATCH_SIZES)
    logits = torch.randn(n, NUM_CLASSES, generator=gen)
    logits[:, NEVER_PREDICTED] = -100.0  # never the argmax, never in the top k < C
    targets = torch.randint(0, NUM_CLASSES, (n,), generator=gen)
    targets[:3] = NEVER_PREDICTED  # make sure the class occurs as a label
    return logits, targets


def feed(metric, logits: torch.Tensor, targets: torch.Tensor, sizes=BATCH_SIZES):
    start = 0
    for size in sizes:
        metric.update(logits[start : start + size], targets[start : start + size])
        start += size
    assert start == len(targets)
    return metric


def test_accuracy_matches_sklearn(data):
    logits, targets = data
    acc = feed(Accuracy(), logits, targets).compute()
    expected = accuracy_score(targets.numpy(), logits.argmax(1).numpy())
    assert acc == {"accuracy": pytest.approx(expected)}
    assert 0.0 < expected < 1.0  # a meaningful check, not a trivial 0 or 1


@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_accuracy_matches_sklearn(data, k):
    logits, targets = data
    result = feed(TopKAccuracy(k=k), logits, targets).compute()
    expected = top_k_accuracy_score(
        targets.numpy(), logits.numpy(), k=k, labels=list(range(NUM_CLASSES))
    )
    assert set(result) == {f"top{k}_accuracy"}
    assert result[f"top{k}_accuracy"] == pytest.approx(expected)


def test_topk_accuracy_grows_with_k_and_k_above_classes_is_one(data):
    logits, targets = data
    scores = [
        feed(TopKAccuracy(k=k), logits, targets).compute()[f"top{k}_accuracy"]
        for k in range(1, NUM_CLASSES + 2)
    ]
    assert scores == sorted(scores)
    assert scores[-1] == 1.0  # k > C: every target is among "the top k"


def test_confusion_matrix_matches_sklearn(data):
    logits, targets = data
    cm = feed(ConfusionMatrix(NUM_CLASSES), logits, targets)
    expected = confusion_matrix(
        targets.numpy(), logits.argmax(1).numpy(), labels=list(range(NUM_CLASSES))
    )
    report = cm.report()
    assert report["confusion_matrix"] == expected.tolist()
    assert report["class_names"] == [str(i) for i in range(NUM_CLASSES)]
    assert cm.compute() == {}
    # the never-predicted class has an empty column but a non-empty row
    matrix = np.array(report["confusion_matrix"])
    assert matrix[:, NEVER_PREDICTED].sum() == 0
    assert matrix[NEVER_PREDICTED].sum() >= 3


def test_confusion_matrix_class_names_and_reset(data):
    logits, targets = data
    names = ["a", "b", "c", "d", "e"]
    cm = feed(ConfusionMatrix(NUM_CLASSES, class_names=names), logits, targets)
    assert cm.report()["class_names"] == names
    cm.reset()
    assert cm.report()["confusion_matrix"] == [[0] * NUM_CLASSES] * NUM_CLASSES


def _sklearn_prf(logits, targets, average):
    p, r, f, _ = precision_recall_fscore_support(
        targets.numpy(),
        logits.argmax(1).numpy(),
        labels=list(range(NUM_CLASSES)),
        average=average,
        zero_division=0,
    )
    return p, r, f


def test_precision_and_recall_match_sklearn(data):
    logits, targets = data
    metric = feed(PrecisionRecallF1(NUM_CLASSES), logits, targets)
    p, r, _ = _sklearn_prf(logits, targets, None)
    report = metric.report()
    np.testing.assert_allclose(report["precision"], p)
    np.testing.assert_allclose(report["recall"], r)
    # the never-predicted class: 0/0 precision is 0, as zero_division=0
    assert report["precision"][NEVER_PREDICTED] == 0.0
    assert report["recall"][NEVER_PREDICTED] == 0.0
    assert report["f1"][NEVER_PREDICTED] == 0.0

    pm, rm, _ = _sklearn_prf(logits, targets, "macro")
    result = metric.compute()
    assert result["precision_macro"] == pytest.approx(pm)
    assert result["recall_macro"] == pytest.approx(rm)


def test_f1_matches_sklearn(data):
    logits, targets = data
    metric = feed(PrecisionRecallF1(NUM_CLASSES), logits, targets)
    _, _, f = _sklearn_prf(logits, targets, None)
    np.testing.assert_allclose(metric.report()["f1"], f)
    _, _, fm = _sklearn_prf(logits, targets, "macro")
    assert metric.compute()["f1_macro"] == pytest.approx(fm)


def test_f1_of_a_perfect_classifier_is_one():
    targets = torch.tensor([0, 1, 2, 2, 1, 0, 2])
    metric = PrecisionRecallF1(3)
    metric.update(torch.nn.functional.one_hot(targets, 3).float(), targets)
    assert metric.compute() == {"precision_macro": 1.0, "recall_macro": 1.0, "f1_macro": 1.0}


def test_metrics_before_any_update_are_zero():
    assert Accuracy().compute() == {"accuracy": 0.0}
    assert TopKAccuracy(k=2).compute() == {"top2_accuracy": 0.0}
    assert PrecisionRecallF1(3).compute() == {
        "precision_macro": 0.0,
        "recall_macro": 0.0,
        "f1_macro": 0.0,
    }


def test_reset_forgets_previous_batches(data):
    logits, targets = data
    acc = Accuracy()
    acc.update(logits, (logits.argmax(1) + 1) % NUM_CLASSES)  # all wrong
    acc.reset()
    acc.update(logits[:10], logits[:10].argmax(1))  # all right
    assert acc.compute() == {"accuracy": 1.0}


def _collection() -> MetricCollection:
    return MetricCollection(
        [
            Accuracy(),
            TopKAccuracy(k=2),
            PrecisionRecallF1(NUM_CLASSES),
            ConfusionMatrix(NUM_CLASSES),
        ]
    )


def test_collection_sync_of_two_halves_equals_one_collection_of_everything(data):
    logits, targets = data
    half = 37  # uneven halves
    first, second = _collection(), _collection()
    feed(first, logits[:half], targets[:half], [5, 20, 12])
    feed(second, logits[half:], targets[half:], [30, 1, 12])
    whole = feed(_collection(), logits, targets)

    # the "other process" states, captured before either reduces (as an all-reduce sees them)
    snapshots = [[t.clone() for t in c.state()] for c in (first, second)]

    def fake_all_reduce_sum(tensors: list[torch.Tensor]) -> None:
        assert len(tensors) == len(snapshots[0])
        for i, t in enumerate(tensors):
            t.copy_(snapshots[0][i] + snapshots[1][i])

    assert first.compute() != whole.compute()  # before the sync, a half is not the whole
    first.sync(fake_all_reduce_sum)
    second.sync(fake_all_reduce_sum)

    expected = whole.compute()
    for synced in (first, second):
        got = synced.compute()
        assert got.keys() == expected.keys()
        for key in expected:
            assert got[key] == pytest.approx(expected[key]), key
        assert synced.report()["confusion_matrix"] == whole.report()["confusion_matrix"]


def test_collection_compute_and_report_merge_all_metrics(data):
    logits, targets = data
    coll = feed(_collection(), logits, targets)
    assert set(coll.compute()) == {
        "accuracy",
        "top2_accuracy",
        "precision_macro",
        "recall_macro",
        "f1_macro",
    }
    report = coll.report()
    assert {"confusion_matrix", "class_names", "precision", "recall", "f1"} <= set(report)
    coll.reset()
    assert coll.compute()["accuracy"] == 0.0


def test_sync_with_no_state_does_not_call_all_reduce():
    calls = []
    MetricCollection([]).sync(calls.append)
    assert calls == []


def test_counting_metrics_applied_in_groups_equal_batch_by_batch(data):
    """Counting metrics are kept and applied several batches at once: the same counts."""
    logits, targets = data
    grouped, one_by_one = _collection(), _collection()
    one_by_one.defer = 0
    grouped.defer = 4
    for start in range(0, len(targets), 9):
        for c in (grouped, one_by_one):
            c.update(logits[start : start + 9], targets[start : start + 9])
    assert grouped._pending  # some batches are still waiting...
    states = grouped.state(), one_by_one.state()  # ...and are applied before the state is read
    assert len(states[0]) == len(states[1])
    assert all(torch.equal(a, b) for a, b in zip(*states))
    assert grouped.report() == one_by_one.report()
