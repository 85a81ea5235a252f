"""Per-task pretext losses and the aggregators that combine them (docs/method.md, Pretext tasks and losses).

Departures from the reference, all deliberate (docs/method.md): no-data target values (NaN or +-inf) are
left out of the loss instead of being regressed to 0 (D6); a task with nothing to score returns an
exact 0, never NaN, so the uncertainty weighting's zero-loss rule can fire (D7); patches whose loss is
exactly 0 are not dropped from the average. Every loss is computed in float32 with masks as weights, never
by boolean indexing, so nothing waits on the host.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpmae.config import check_task_weights
from mpmae.modalities import Modality

#: Added to a patch's variance before the norm-pix division, as in MAE.
NORM_PIX_EPS = 1e-6


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(N, K, H, W) -> (N, L, p*p*K), patches in row-major order, K fastest within a patch."""
    n, k, h, w = x.shape
    p = patch_size
    x = x.reshape(n, k, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(n, (h // p) * (w // p), p * p * k)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and exactly 0 where nothing was counted."""
    return num / den.clamp_min(1)


def _normalise_patches(t: Tensor, valid: Tensor) -> Tensor:
    """Standardise each patch over its valid values (unbiased variance, as the reference)."""
    count = valid.sum(dim=-1, keepdim=True)
    mean = _ratio((t * valid).sum(dim=-1, keepdim=True), count)
    var = ((t - mean).square() * valid).sum(dim=-1, keepdim=True) / (count - 1).clamp_min(1)
    return (t - mean) / (var + NORM_PIX_EPS).sqrt()


def pixel_regression_loss(
    pred: Tensor, target: Tensor, mask: Tensor, patch_size: int, norm_pix: bool = False
) -> Tensor:
    """Mean squared error over the valid target values of the masked patches.

    ``pred`` (N, L, p*p*K), ``target`` (N, K, H, W) with NaN for no-data, ``mask`` (N, L), 1 = masked.
    With every value valid this equals the reference's mean over masked patches of per-patch MSE.
    """
    t = patchify(target.float(), patch_size)
    valid = torch.isfinite(t)
    t = torch.where(valid, t, 0.0)
    valid = valid.float()
    if norm_pix:
        t = _normalise_patches(t, valid)
    err = (pred.float() - t).square() * valid
    m = mask.float()
    return _ratio((err.sum(dim=-1) * m).sum(), (valid.sum(dim=-1) * m).sum())


def pixel_segmentation_loss(pred: Tensor, target: Tensor, mask: Tensor, patch_size: int) -> Tensor:
    """Cross-entropy over the labelled pixels (target != -1) of the masked patches.

    ``pred`` (N, L, p*p*K) logits, ``target`` (N, 1, H, W) int64 class indices.
    """
    n, length, _ = pred.shape
    t = patchify(target, patch_size)
    # classes on dim 1 (a free transposed view): log-softmax then runs along the long pixel axis
    logits = pred.float().reshape(n, length * t.shape[-1], -1).transpose(1, 2)
    ce = F.cross_entropy(logits, t.reshape(n, -1), ignore_index=-1, reduction="none")
    weight = (t >= 0).float() * mask.float().unsqueeze(-1)
    return _ratio((ce.view_as(weight) * weight).sum(), weight.sum())


def image_regression_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over the valid entries of (N, K) targets."""
    valid = torch.isfinite(target)
    err = (pred.float() - torch.where(valid, target.float(), 0.0)).square() * valid
    return _ratio(err.sum(), valid.sum())


def image_classification_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy against the class of a one-hot (N, K) target (class = argmax).

    Rows with no class (all zero) or a non-finite entry are no-data: ignored, and 0 when none is left.
    """
    t = target.float()
    valid = torch.isfinite(t).all(dim=-1) & (torch.nan_to_num(t, nan=0.0).amax(dim=-1) > 0)
    labels = torch.where(valid, torch.nan_to_num(t, nan=0.0).argmax(dim=-1), -1)
    ce = F.cross_entropy(pred.float(), labels, ignore_index=-1, reduction="none")
    return _ratio(ce.sum(), valid.sum())


def task_loss(
    modality: Modality, pred: Tensor, target: Tensor, mask: Tensor, patch_size: int, norm_pix: bool = False
) -> Tensor:
    """The pretext loss of one modality, chosen by its level and task in the registry."""
    if modality.level == "pixel":
        if modality.task == "segmentation":
            return pixel_segmentation_loss(pred, target, mask, patch_size)
        return pixel_regression_loss(pred, target, mask, patch_size, norm_pix)
    if modality.task == "classification":
        return image_classification_loss(pred, target)
    return image_regression_loss(pred, target)


class UncertaintyWeighting(nn.Module):
    """``sum_i 1[L_i != 0] (exp(-s_i) L_i + s_i)`` with learnable log-variances ``s`` (Kendall et al.).

    A task whose loss is exactly 0 (nothing to score) contributes nothing, not ``s_i``.
    """

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))

    def forward(self, losses: Tensor) -> Tensor:
        weighted = torch.exp(-self.log_vars) * losses + self.log_vars
        return torch.where(losses != 0, weighted, torch.zeros_like(weighted)).sum()


class Unweighted(nn.Module):
    """The plain sum of the task losses."""

    def forward(self, losses: Tensor) -> Tensor:
        return losses.sum()


class Weighted(nn.Module):
    """A fixed weighted sum of the task losses."""

    weights: Tensor

    def __init__(self, weights: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, losses: Tensor) -> Tensor:
        return (self.weights * losses).sum()


def build_aggregator(
    kind: str, tasks: Sequence[str], task_weights: Mapping[str, float] | None = None
) -> nn.Module:
    """The loss aggregator ``kind`` for ``tasks``; ``weighted`` needs ``task_weights`` (missing tasks: 1)."""
    if kind == "uncertainty":
        return UncertaintyWeighting(len(tasks))
    if kind == "unweighted":
        return Unweighted()
    if kind == "weighted":
        check_task_weights(kind, task_weights, tasks, required=True)
        assert task_weights is not None
        return Weighted([float(task_weights.get(t, 1.0)) for t in tasks])
    raise ValueError(f"unknown loss aggregation {kind!r}; valid: uncertainty, unweighted, weighted")
