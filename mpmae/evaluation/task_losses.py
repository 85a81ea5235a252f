"""Training losses of the GEO-Bench tasks (docs/method.md, GEO-Bench data), picked by task kind."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch.nn.functional as F
from torch import Tensor

from mpmae.tasks import TASK_KINDS, TaskKind

LossFn = Callable[[Tensor, Tensor], Tensor]


def smoothed_bce(logits: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
    """BCE-with-logits against ``target (1 - s) + (1 - target) s``: each label moves s towards 1/2."""
    target = target.to(logits.dtype)
    return F.binary_cross_entropy_with_logits(logits, target * (1 - smoothing) + (1 - target) * smoothing)


def smoothed_ce(logits: Tensor, target: Tensor, smoothing: float = 0.0, ignore_index: int = -100) -> Tensor:
    """Cross-entropy with timm's label smoothing: ``(1 - s) NLL + s * mean_k(-log p_k)``."""
    return F.cross_entropy(logits, target, ignore_index=ignore_index, label_smoothing=smoothing)


def make_loss(kind: TaskKind, smoothing: float = 0.0, ignore_index: int | None = None) -> LossFn:
    """The loss of a task kind; validation and test use ``smoothing=0``, as in the reference.

    ``ignore_index`` applies to segmentation only (the paper's runs use none).
    """
    if kind == "multilabel":
        return partial(smoothed_bce, smoothing=smoothing)
    if kind == "multiclass":
        return partial(smoothed_ce, smoothing=smoothing)
    if kind == "segmentation":
        return partial(smoothed_ce, smoothing=smoothing, ignore_index=-100 if ignore_index is None else ignore_index)
    raise ValueError(f"unknown task kind {kind!r}; valid: {TASK_KINDS}")
