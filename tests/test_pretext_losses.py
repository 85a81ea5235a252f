"""Per-task losses and aggregators, checked against independent numpy / boolean-indexing computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpmae.modalities import MODALITIES
from mpmae.pretext_losses import (
    UncertaintyWeighting,
    build_aggregator,
    image_classification_loss,
    image_regression_loss,
    patchify,
    pixel_regression_loss,
    pixel_segmentation_loss,
    task_loss,
)


def test_patchify_layout_is_row_col_channel_within_a_patch():
    x = torch.randn(2, 3, 8, 12)
    out = patchify(x, 4)
    assert out.shape == (2, 6, 48)
    n, i, j, r, c, k = 1, 1, 2, 3, 1, 2
    assert out[n, i * 3 + j, (r * 4 + c) * 3 + k] == x[n, k, i * 4 + r, j * 4 + c]


def _numpy_masked_mse(pred, target, mask, p):
    """Squared error pooled over every valid value of every masked patch, in float64."""
    t = patchify(torch.from_numpy(target), p).numpy().astype(np.float64)
    e = (pred.astype(np.float64) - t) ** 2
    keep = np.isfinite(t) & (mask[..., None] == 1)
    return e[keep].mean()


def test_pixel_regression_ignores_no_data_and_visible_patches():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
    target[0, 1, :3, :5] = np.nan
    target[1, :, 4:, 4:] = np.inf
    pred = rng.normal(size=(2, 4, 48)).astype(np.float32)
    mask = np.array([[1, 0, 1, 1], [0, 1, 1, 1]], dtype=np.float32)
    loss = pixel_regression_loss(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(mask), 4)
    assert loss.item() == pytest.approx(_numpy_masked_mse(pred, target, mask, 4), rel=1e-6)


def test_norm_pix_matches_the_reference_formula_without_no_data():
    target = torch.randn(2, 3, 8, 8) * 3 + 1
    pred = torch.randn(2, 4, 48)
    mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 0, 1]])
    t = patchify(target, 4)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    expected = (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(pixel_regression_loss(pred, target, mask, 4, norm_pix=True), expected)


def test_norm_pix_uses_only_valid_values_of_a_patch():
    target = torch.randn(1, 1, 4, 4)
    target[0, 0, 0, :2] = float("nan")
    pred = torch.randn(1, 1, 16)
    t = target.flatten()
    valid = t[~t.isnan()]
    norm = (valid - valid.mean()) / (valid.var() + 1e-6).sqrt()
    expected = ((pred.flatten()[~t.isnan()] - norm) ** 2).mean()
    loss = pixel_regression_loss(pred, target, torch.ones(1, 1), 4, norm_pix=True)
    torch.testing.assert_close(loss, expected)


def test_empty_tasks_give_an_exact_zero_with_finite_gradients():
    pred = torch.randn(2, 4, 16, requires_grad=True)
    all_nan = torch.full((2, 1, 8, 8), float("nan"))
    losses = [
        pixel_regression_loss(pred, all_nan, torch.ones(2, 4), 4, norm_pix=True),
        pixel_regression_loss(pred, torch.randn(2, 1, 8, 8), torch.zeros(2, 4), 4),
        image_regression_loss(pred[:, 0, :3], torch.full((2, 3), float("nan"))),
        pixel_segmentation_loss(pred, torch.full((2, 1, 8, 8), -1), torch.ones(2, 4), 4),
    ]
    for loss in losses:
        assert loss.item() == 0.0
    torch.stack(losses).sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_segmentation_loss_equals_cross_entropy_on_selected_pixels():
    gen = torch.Generator().manual_seed(1)
    k, p = 5, 4
    pred = torch.randn(2, 4, p * p * k, generator=gen)
    target = torch.randint(-1, k, (2, 1, 8, 8), generator=gen)
    mask = torch.tensor([[1.0, 1, 0, 0], [0, 1, 0, 1]])
    logits = pred.reshape(2, 4, p * p, k)
    labels = patchify(target, p)
    keep = (labels >= 0) & (mask[..., None] == 1)
    expected = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(pixel_segmentation_loss(pred, target, mask, p), expected)


def test_image_losses():
    pred = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    target = torch.tensor([[1.0, float("nan")], [0.0, 1.0]])
    assert image_regression_loss(pred, target).item() == pytest.approx((0.25 + 4 + 1) / 3)
    one_hot = torch.tensor([[0, 1], [1, 0]])
    expected = F.cross_entropy(pred, torch.tensor([1, 0]))
    torch.testing.assert_close(image_classification_loss(pred, one_hot), expected)


def test_image_classification_ignores_rows_without_a_class():
    pred = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([[0, 0, 1], [0, 0, 0], [1, 0, 0], [0, 0, 0]])
    expected = F.cross_entropy(pred[[0, 2]], torch.tensor([2, 0]))
    torch.testing.assert_close(image_classification_loss(pred, target), expected)
    as_float = target.float()
    as_float[2, 1] = float("nan")
    torch.testing.assert_close(image_classification_loss(pred, as_float), F.cross_entropy(pred[:1], torch.tensor([2])))
    empty = image_classification_loss(pred, torch.zeros(4, 3, dtype=torch.long))
    assert empty.item() == 0.0
    empty.backward()
    assert torch.isfinite(pred.grad).all()


def test_task_loss_dispatches_on_the_registry():
    mask = torch.ones(1, 1)
    seg_target = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    seg_pred = torch.zeros(1, 1, 64 * 9)
    # uniform logits over DW's 9 classes: cross-entropy log(9)
    loss = task_loss(MODALITIES["dynamic_world"], seg_pred, seg_target, mask, 8)
    assert loss.item() == pytest.approx(np.log(9))
    biome = task_loss(MODALITIES["biome"], torch.zeros(1, 14), torch.eye(14)[:1].long(), mask, 8)
    assert biome.item() == pytest.approx(np.log(14))
    lat = task_loss(MODALITIES["lat"], torch.zeros(1, 2), torch.ones(1, 2), mask, 8)
    assert lat.item() == pytest.approx(1.0)


def test_uncertainty_zero_loss_rule_and_gradient():
    agg = UncertaintyWeighting(3)
    with torch.no_grad():
        agg.log_vars.copy_(torch.tensor([0.5, -1.0, 2.0]))
    total = agg(torch.tensor([2.0, 0.0, 1.0]))
    expected = np.exp(-0.5) * 2 + 0.5 + np.exp(-2.0) * 1 + 2.0
    assert total.item() == pytest.approx(expected, rel=1e-6)
    total.backward()
    grad = agg.log_vars.grad
    assert grad[1].item() == 0.0
    assert grad[0].item() == pytest.approx(1 - 2 * np.exp(-0.5), rel=1e-6)


def test_unweighted_and_weighted_aggregators():
    losses = torch.tensor([1.0, 2.0, 3.0])
    tasks = ["sentinel2", "biome", "lat"]
    assert build_aggregator("unweighted", tasks)(losses).item() == 6.0
    weighted = build_aggregator("weighted", tasks, {"biome": 0.5, "lat": 2.0})
    assert weighted(losses).item() == pytest.approx(1 + 1 + 6)
    assert list(weighted.state_dict()) == []  # weights come from the config, not the checkpoint
    with pytest.raises(ValueError, match="needs task_weights"):
        build_aggregator("weighted", tasks)
    with pytest.raises(ValueError, match="not pretext tasks"):
        build_aggregator("weighted", tasks, {"eco_region": 1.0})
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        build_aggregator("gradnorm", tasks)
