from __future__ import annotations

import math

import pytest
import torch

from mpmae.evaluation.task_losses import make_loss


def test_multilabel_bce_label_smoothing_hand_computed() -> None:
    loss = make_loss("multilabel", smoothing=0.2)(torch.tensor([[2.0, -1.0]]), torch.tensor([[1, 0]]))
    p1, p2 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))
    # targets smoothed to 0.8 and 0.2
    expected = -(0.8 * math.log(p1) + 0.2 * math.log(1 - p1) + 0.2 * math.log(p2) + 0.8 * math.log(1 - p2)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_multiclass_label_smoothing_matches_timm_formula() -> None:
    logits, target, s = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([0]), 0.3
    logp = torch.log_softmax(logits, dim=1)[0]
    expected = (1 - s) * -logp[0] + s * -logp.mean()
    assert make_loss("multiclass", smoothing=s)(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_segmentation_ce_per_pixel_with_ignore_index() -> None:
    logits = torch.zeros(1, 4, 2, 2)
    logits[0, 1, 0, 0] = 3.0
    target = torch.tensor([[[1, -1], [-1, -1]]])
    expected = -torch.log_softmax(torch.tensor([0.0, 3.0, 0.0, 0.0]), 0)[1]
    loss = make_loss("segmentation", ignore_index=-1)(logits, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_unknown_kind_rejected() -> None:
    with pytest.raises(ValueError, match="unknown task kind"):
        make_loss("regression")  # type: ignore[arg-type]
