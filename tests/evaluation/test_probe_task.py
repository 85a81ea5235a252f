"""The probe score Tune ranks by: a continuous per-tile score, its bootstrap interval, the land-cover cross-fit."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mpmae.config import DataConfig, PretrainConfig, ProbeConfig
from mpmae.data.downstream import land_cover_task
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.evaluation.probe_task import (
    ProbeTask,
    load_probe_task,
    pooled_score,
    score_interval,
    tile_scores,
)
from mpmae.models.convnextv2 import ConvNeXtV2
from tests.crafted.tiny import templated_images

LN3 = math.log(3.0)


def test_multiclass_tiles_score_their_true_class_probability() -> None:
    logits = torch.tensor([[LN3, 0.0], [0.0, 0.0], [LN3, 0.0]])  # softmax: (3/4, 1/4), (1/2, 1/2), (3/4, 1/4)
    stats = tile_scores(logits, torch.tensor([0, 1, 1]), "multiclass")
    assert stats.flatten().tolist() == pytest.approx([0.75, 1.0, 0.5, 1.0, 0.25, 1.0])
    assert pooled_score(stats) == pytest.approx(0.5)  # accuracy: 1/3


def test_multilabel_tiles_give_the_terms_of_a_soft_micro_f1() -> None:
    logits = torch.tensor([[0.0, LN3], [LN3, LN3]])  # sigmoid: (1/2, 3/4), (3/4, 3/4)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    stats = tile_scores(logits, labels, "multilabel")
    assert stats.flatten().tolist() == pytest.approx([2 * 0.5, 0.5 + 0.75 + 1, 2 * 1.5, 1.5 + 2])
    assert pooled_score(stats) == pytest.approx(4 / 5.75)  # summed over tiles, as micro F1 sums its counts
    confident = tile_scores(torch.tensor([[30.0, -30.0]]), torch.tensor([[1.0, 0.0]]), "multilabel")
    assert pooled_score(confident) == pytest.approx(1.0)


def test_segmentation_has_no_tile_score() -> None:
    with pytest.raises(ValueError, match="classification"):
        tile_scores(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4), "segmentation")


def test_interval_of_equal_tiles_has_no_width() -> None:
    stats = torch.tensor([[0.3, 1.0]] * 10, dtype=torch.float64)
    assert score_interval(stats) == pytest.approx((0.3, 0.3))


def test_interval_of_a_proportion_is_the_normal_one_and_seeded() -> None:
    """400 tiles scoring 0 or 1, half each: 0.5 +- 1.96 sqrt(0.25 / 400) = 0.5 +- 0.049."""
    stats = torch.stack([torch.arange(400) % 2, torch.ones(400)], dim=1).double()
    low, high = score_interval(stats, seed=3)
    assert pooled_score(stats) == 0.5
    assert low == pytest.approx(0.451, abs=0.01) and high == pytest.approx(0.549, abs=0.01)
    assert score_interval(stats, seed=3) == (low, high)


def test_cross_fitted_probe_scores_every_tile_once(encoder: ConvNeXtV2) -> None:
    """A separable task: every tile right, and the true class gets what the head learns from targets smoothed
    by 0.2 over 3 classes, 0.8 + 0.2 / 3."""
    x, y = templated_images(24, 3)
    parts = ((x[:12], y[:12]), (x[12:], y[12:]))
    task = ProbeTask("templates", parts, (((1,), 0), ((0,), 1)), "multiclass", 3, epochs=300, seed=0)
    result = task(encoder)
    assert result.accuracy == 1.0
    assert result.score == pytest.approx(0.8 + 0.2 / 3, abs=0.02)
    assert result.low < result.score < result.high < result.low + 0.02
    assert task(encoder) == result
    assert result.metrics() == {"probe_score": result.score, "probe_score_low": result.low,
                                "probe_score_high": result.high, "probe_accuracy": 1.0}
    half = ProbeTask("templates", parts, (((0,), 1),), "multiclass", 3, epochs=300, seed=0)(encoder)
    assert half.high - half.low > result.high - result.low  # half the tiles scored: a wider interval


@pytest.mark.parametrize(("tiles", "folds"), [(120, 5), (40, 2)])
def test_land_cover_folds_cover_the_val_tiles(tmp_path: Path, tiles: int, folds: int) -> None:
    """Five folds (two on a split of under ten tiles), each scored by a head trained on all the others."""
    data = write_synthetic_mmearth(tmp_path / "data", tiles=tiles, seed=2)
    task = load_probe_task(PretrainConfig(data=DataConfig(path=str(data), crop_size=56),
                                          probe=ProbeConfig(task="land_cover")))
    x, y = land_cover_task(data, "val", 56)
    assert len(task.parts) == folds
    assert torch.equal(torch.cat([p[0] for p in task.parts]), x)
    assert torch.equal(torch.cat([p[1] for p in task.parts]), y)
    assert sorted(scored for _, scored in task.rounds) == list(range(folds))
    assert all(set(trained) == set(range(folds)) - {scored} for trained, scored in task.rounds)
