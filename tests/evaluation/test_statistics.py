"""The benchmark's statistics against values worked out by hand: IQM, stratified bootstrap, normalised aggregate,
and the bootstrap of a split metric over its samples."""

from __future__ import annotations

import numpy as np
import pytest

from mpmae.evaluation.statistics import (
    bootstrap_metric,
    estimate,
    iqm,
    min_max_normalise,
    percentile_interval,
    stratified_bootstrap_iqm,
)


@pytest.mark.parametrize(("values", "expected"), [
    ([1, 2, 3, 4], 2.5),  # int(0.25 * 4) = 1 cut from each end: mean of 2, 3
    ([4, 1, 3, 2], 2.5),
    ([1, 2, 3], 2.0),  # int(0.75) = 0: nothing cut
    ([1, 2, 3, 4, 100], 3.0),  # one cut from each end: mean of 2, 3, 4
    ([1, 2, 3, 4, 5, 6, 7, 100], 4.5),  # two cut from each end: mean of 3, 4, 5, 6
    ([0.7], 0.7),
])
def test_iqm_is_the_mean_of_the_middle_half(values: list[float], expected: float) -> None:
    assert iqm(values) == pytest.approx(expected)


def test_with_two_seeds_the_interval_spans_them() -> None:
    """Resampling two seeds gives a, (a+b)/2 or b (1/4, 1/2, 1/4): the 95 % interval is [a, b]."""
    assert stratified_bootstrap_iqm([[0.62, 0.58]]) == (0.58, 0.62)
    assert stratified_bootstrap_iqm([[0.5]]) == (0.5, 0.5)
    found = estimate([[0.62, 0.58]])
    assert (found.n, found.mean, found.iqm) == (2, pytest.approx(0.6), pytest.approx(0.6))
    assert (found.ci_low, found.ci_high) == (0.58, 0.62)


def test_the_bootstrap_resamples_within_each_stratum() -> None:
    """Each task keeps its own seeds: two tasks of constant scores pool to [0, 0, 1, 1] in every resample, so
    the interval is a point (resampling the pool as one would draw [0, 0, 0, 0] and [1, 1, 1, 1] too)."""
    assert stratified_bootstrap_iqm([[0.0, 0.0], [1.0, 1.0]], resamples=200) == (0.5, 0.5)


def test_the_bootstrap_is_seeded() -> None:
    scores = [[0.1, 0.5, 0.3, 0.9, 0.4], [0.2, 0.8, 0.6]]
    first = stratified_bootstrap_iqm(scores, seed=3)
    assert stratified_bootstrap_iqm(scores, seed=3) == first
    assert stratified_bootstrap_iqm(scores, seed=4) != first


def test_the_percentile_interval_is_numpys_linear_percentiles() -> None:
    assert percentile_interval(np.arange(101), 0.9) == pytest.approx((5.0, 95.0))
    with pytest.raises(ValueError, match="confidence 1.5 must lie in"):
        percentile_interval([1.0], 1.5)


def test_the_normalised_aggregate_of_a_two_task_table_by_hand() -> None:
    """t1: min 0.6, max 1.0 -> A [0, 0.5], B [0.25, 1]; t2: min 0.1, max 0.5 -> A [0.5, 0.5], B [0, 1].
    A pools to [0, .5, .5, .5]: IQM 0.5; B to [0, .25, 1, 1]: IQM 0.625. The intervals' ends are the lowest
    and highest resamples, each drawn with chance 1/16 > 2.5 %: A [0.25, 0.5] (t1 drawn as [0, 0]; as
    [.5, .5]), B [0.125, 1] (t1 [.25, .25] and t2 [0, 0]; both [1, 1])."""
    scores = {"t1": {"A": [0.6, 0.8], "B": [0.7, 1.0]}, "t2": {"A": [0.3, 0.3], "B": [0.1, 0.5]}}
    normalised = min_max_normalise(scores)
    assert normalised["t1"]["A"] == pytest.approx([0.0, 0.5]) and normalised["t1"]["B"] == pytest.approx([0.25, 1.0])
    assert normalised["t2"]["A"] == pytest.approx([0.5, 0.5]) and normalised["t2"]["B"] == pytest.approx([0.0, 1.0])
    a = estimate([normalised["t1"]["A"], normalised["t2"]["A"]])
    b = estimate([normalised["t1"]["B"], normalised["t2"]["B"]])
    assert (a.n, a.mean, a.iqm, a.ci_low, a.ci_high) == pytest.approx((4, 0.375, 0.5, 0.25, 0.5))
    assert (b.n, b.mean, b.iqm, b.ci_low, b.ci_high) == pytest.approx((4, 0.5625, 0.625, 0.125, 1.0))


def test_a_task_where_every_score_is_equal_normalises_to_one_half() -> None:
    assert min_max_normalise({"t": {"A": [0.3], "B": [0.3, 0.3]}})["t"]["B"] == pytest.approx([0.5, 0.5])


def accuracy(counts: np.ndarray) -> float:
    correct, total = counts
    return float(correct / total)


def micro_f1(counts: np.ndarray) -> float:
    tp, fp, fn = counts
    return float(2 * tp / (2 * tp + fp + fn))


def test_the_metric_bootstrap_resamples_the_samples_and_scores_their_summed_counts() -> None:
    """Two samples, one right: a resample holds 0, 1 or 2 right ones (1/4, 1/2, 1/4): accuracy in [0, 1]."""
    assert bootstrap_metric(np.array([[1, 1], [0, 1]]), accuracy) == (0.0, 1.0)
    # three samples, two right: all wrong 1/27 = 3.7 % and all right 8/27 both lie beyond 2.5 %
    assert bootstrap_metric(np.array([[1, 1], [1, 1], [0, 1]]), accuracy) == (0.0, 1.0)
    # F1 from summed counts, not a mean of per-sample F1s: identical samples give one value
    assert bootstrap_metric(np.array([[1, 0, 1]] * 5), micro_f1) == pytest.approx((2 / 3, 2 / 3))
    assert bootstrap_metric(np.array([[3, 4]]), accuracy) == (0.75, 0.75)


def test_the_metric_bootstrap_is_seeded_and_narrows_with_more_samples() -> None:
    rng = np.random.default_rng(0)
    few = np.stack([rng.integers(0, 2, 20), np.ones(20)], axis=1)
    many = np.concatenate([few] * 25)
    assert bootstrap_metric(few, accuracy, seed=1) == bootstrap_metric(few, accuracy, seed=1)
    low, high = bootstrap_metric(few, accuracy)
    low_many, high_many = bootstrap_metric(many, accuracy)
    assert low < low_many <= accuracy(few.sum(axis=0)) <= high_many < high


def test_no_values_are_refused() -> None:
    with pytest.raises(ValueError, match="no values"):
        iqm([])
    with pytest.raises(ValueError, match="no samples"):
        bootstrap_metric(np.zeros((0, 2)), accuracy)
