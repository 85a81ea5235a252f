from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from mpmae.evaluation.split_metrics import Mean, MeanIoU, MulticlassAccuracy, MultilabelF1, make_metric


def one_hot_logits(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Logits whose arg-max over dim 1 is ``pred`` (N, ...) -> (N, K, ...)."""
    return torch.nn.functional.one_hot(pred, num_classes).movedim(-1, 1).float()


def test_multilabel_f1_hand_computed() -> None:
    target = torch.tensor([[1, 0, 1], [0, 1, 0]])
    logits = torch.tensor([[2.0, -1.0, -3.0], [1.0, 1.0, -1.0]])  # TP 2, FP 1, FN 1
    metric = MultilabelF1()
    metric.update(logits, target)
    assert metric.compute() == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))


def test_multilabel_f1_threshold_is_sigmoid_half() -> None:
    metric = MultilabelF1()
    metric.update(torch.tensor([[0.0, 1e-6]]), torch.tensor([[1, 1]]))  # sigmoid(0) = 0.5 is negative
    assert metric.compute() == pytest.approx(2 / 3)


def test_f1_is_split_level_not_batch_mean() -> None:
    a = (torch.tensor([[5.0, -5.0]]), torch.tensor([[1, 0]]))  # batch F1 = 1
    b = (torch.full((1, 2), -5.0), torch.ones(1, 2))  # batch F1 = 0
    c = (torch.tensor([[-5.0, -5.0]]), torch.tensor([[1, 0]]))
    accumulated, whole = MultilabelF1(), MultilabelF1()
    for logits, target in (a, b, c):
        accumulated.update(logits, target)
    whole.update(torch.cat([a[0], b[0], c[0]]), torch.cat([a[1], b[1], c[1]]))
    assert accumulated.compute() == whole.compute() == pytest.approx(2 / (2 + 3))  # TP 1, FN 3


def test_f1_without_any_positive_is_zero() -> None:
    metric = MultilabelF1()
    metric.update(torch.full((2, 3), -1.0), torch.zeros(2, 3))
    assert metric.compute() == 0.0


def test_accuracy_accumulates_counts() -> None:
    metric = MulticlassAccuracy()
    metric.update(one_hot_logits(torch.tensor([0, 1, 2]), 3), torch.tensor([0, 1, 1]))  # 2 / 3
    metric.update(one_hot_logits(torch.tensor([2]), 3), torch.tensor([0]))  # 0 / 1
    assert metric.compute() == pytest.approx(2 / 4)  # the per-batch mean would be 1/3
    metric.reset()
    with pytest.raises(ValueError, match="empty"):
        metric.compute()


def test_miou_hand_computed_with_ignore_and_absent_class() -> None:
    target = torch.tensor([[[0, 0, 1], [1, -1, 3]]])
    pred = torch.tensor([[[0, 1, 1], [1, 0, 3]]])
    metric = MeanIoU(4, ignore_index=-1)
    metric.update(one_hot_logits(pred, 4), target)
    # class 0: 1/2, class 1: 2/3, class 2 absent from both: left out, class 3: 1/1
    assert metric.compute() == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)


def test_miou_class_only_predicted_scores_zero() -> None:
    metric = MeanIoU(3)
    metric.update(one_hot_logits(torch.tensor([[[0, 2]]]), 3), torch.tensor([[[0, 0]]]))
    assert metric.compute() == pytest.approx((1 / 2 + 0) / 2)


def test_miou_split_level_equals_concatenation() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 5, 5)
    target = torch.randint(0, 3, (4, 5, 5))
    target[0] = 0  # batches differ in class content, so a per-batch mean would differ
    accumulated, whole, batch_scores = MeanIoU(3), MeanIoU(3), []
    for i in range(0, 4, 2):
        accumulated.update(logits[i:i + 2], target[i:i + 2])
        single = MeanIoU(3)
        single.update(logits[i:i + 2], target[i:i + 2])
        batch_scores.append(single.compute())
    whole.update(logits, target)
    assert accumulated.compute() == pytest.approx(whole.compute(), abs=1e-12)
    assert accumulated.compute() != pytest.approx(sum(batch_scores) / 2, abs=1e-4)


def test_miou_rejects_out_of_range_class() -> None:
    with pytest.raises(ValueError, match="out of range"):
        MeanIoU(2).update(one_hot_logits(torch.tensor([[[0, 1]]]), 2), torch.tensor([[[0, 2]]]))


def test_mean_weights_batches_by_size() -> None:
    mean = Mean()
    mean.update(torch.tensor(1.0), 3)
    mean.update(torch.tensor(5.0), 1)
    assert mean.compute() == pytest.approx(2.0)


def test_sync_sums_counts_over_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    other_rank = MulticlassAccuracy()
    other_rank.update(one_hot_logits(torch.tensor([1, 1, 1]), 2), torch.tensor([0, 0, 0]))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda t: t.add_(other_rank.counts))
    metric = MulticlassAccuracy()
    metric.update(one_hot_logits(torch.tensor([0]), 2), torch.tensor([0]))
    metric.sync()
    assert metric.compute() == pytest.approx(1 / 4)


def test_make_metric_by_kind() -> None:
    assert isinstance(make_metric("multilabel", 5), MultilabelF1)
    assert isinstance(make_metric("multiclass", 5), MulticlassAccuracy)
    seg = make_metric("segmentation", 5, ignore_index=-1)
    assert isinstance(seg, MeanIoU) and seg.ignore_index == -1
    with pytest.raises(ValueError, match="unknown task kind"):
        make_metric("regression", 5)  # type: ignore[arg-type]
