"""Evaluation metrics accumulated over a whole split (docs/method.md, GEO-Bench data; no per-batch averages, D13).

Every metric keeps the sufficient statistics of its split in one float64 tensor ``counts``: ``update``
adds a batch's counts, ``compute`` turns the sum into the metric. Summing counts, never metric values,
makes two accumulated batches give exactly the metric of their concatenation, and lets ``sync`` add
the counts of every data-parallel rank with one ``all_reduce``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from mpmae.tasks import TASK_KINDS, TaskKind


class Accumulator:
    """Sums of a split's sufficient statistics; subclasses say what to add per batch and how to finish."""

    def __init__(self, size: int | tuple[int, ...]) -> None:
        self.counts = torch.zeros(size, dtype=torch.float64)

    def reset(self) -> None:
        self.counts = torch.zeros_like(self.counts)

    def _add(self, stats: Tensor) -> None:
        """The counts follow the batch's device, so there is no host sync per batch."""
        self.counts = self.counts.to(stats.device) + stats.double()

    def sync(self) -> None:
        """Sum the counts over the ranks of the default process group (no-op without one)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts)

    def compute(self) -> float:
        raise NotImplementedError


class SplitMetric(Accumulator):
    """A task metric: ``update(logits, target)`` per batch, ``compute()`` once per split."""

    def update(self, logits: Tensor, target: Tensor) -> None:
        self._add(self.batch_counts(logits.detach(), target))

    def batch_counts(self, logits: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError


class MultilabelF1(SplitMetric):
    """Micro F1 over every (sample, label) pair: 2 TP / (2 TP + FP + FN), a positive is sigmoid > 0.5.

    A split without any positive, true or predicted, scores 0 (torchmetrics' ``zero_division=0``).
    """

    def __init__(self) -> None:
        super().__init__(3)

    def batch_counts(self, logits: Tensor, target: Tensor) -> Tensor:
        pred = logits > 0  # sigmoid(z) > 0.5 exactly when z > 0
        true = target > 0.5
        tp = (pred & true).sum()
        return torch.stack([tp, pred.sum() - tp, true.sum() - tp])

    def compute(self) -> float:
        tp, fp, fn = self.counts.tolist()
        denominator = 2 * tp + fp + fn
        return 2 * tp / denominator if denominator > 0 else 0.0


class MulticlassAccuracy(SplitMetric):
    """Micro accuracy: correct arg-max predictions over samples; targets are class indices (N,)."""

    def __init__(self) -> None:
        super().__init__(2)

    def batch_counts(self, logits: Tensor, target: Tensor) -> Tensor:
        correct = (logits.argmax(dim=1) == target).sum()
        return torch.stack([correct, correct.new_tensor(target.numel())])

    def compute(self) -> float:
        correct, total = self.counts.tolist()
        if total == 0:
            raise ValueError("accuracy of an empty split")
        return correct / total


class MeanIoU(SplitMetric):
    """Macro mIoU: per class, intersection / union of predicted and true pixels summed over the split.

    The mean runs over the classes present in the target or in the prediction (union > 0); a class
    absent from both is left out rather than scored 0 or 1, as torchmetrics' ``JaccardIndex`` (macro)
    does. Pixels whose target is ``ignore_index`` count for no class.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None) -> None:
        super().__init__((2, num_classes))
        self.num_classes = num_classes
        self.ignore_index = ignore_index

    def _histogram(self, labels: Tensor) -> Tensor:
        hist = torch.bincount(labels, minlength=self.num_classes)
        if hist.numel() > self.num_classes:
            raise ValueError(f"class index {hist.numel() - 1} out of range for {self.num_classes} classes")
        return hist

    def batch_counts(self, logits: Tensor, target: Tensor) -> Tensor:
        pred = logits.argmax(dim=1)
        if self.ignore_index is not None:
            valid = target != self.ignore_index
            pred, target = pred[valid], target[valid]
        pred, target = pred.flatten(), target.flatten()
        intersection = self._histogram(target[pred == target])
        union = self._histogram(pred) + self._histogram(target) - intersection
        return torch.stack([intersection, union])

    def compute(self) -> float:
        intersection, union = self.counts
        present = union > 0
        if not present.any():
            raise ValueError("mIoU of a split without labelled pixels")
        return (intersection[present] / union[present]).mean().item()


class Mean(Accumulator):
    """A split's mean of a per-sample value (the loss), from batch means weighted by batch sizes."""

    def __init__(self) -> None:
        super().__init__(2)

    def update(self, batch_mean: Tensor, count: int) -> None:
        batch_mean = batch_mean.detach().double()
        self._add(torch.stack([batch_mean * count, batch_mean.new_tensor(count)]))

    def compute(self) -> float:
        total, count = self.counts.tolist()
        if count == 0:
            raise ValueError("mean of an empty split")
        return total / count


def make_metric(kind: TaskKind, num_classes: int, ignore_index: int | None = None) -> SplitMetric:
    """The paper's metric of a task kind (docs/method.md, GEO-Bench data): micro F1, micro accuracy or macro mIoU."""
    if kind == "multilabel":
        return MultilabelF1()
    if kind == "multiclass":
        return MulticlassAccuracy()
    if kind == "segmentation":
        return MeanIoU(num_classes, ignore_index)
    raise ValueError(f"unknown task kind {kind!r}; valid: {TASK_KINDS}")
