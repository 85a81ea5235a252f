"""Interval estimates of benchmark scores, GEO-Bench's way (after rliable): the interquartile mean (IQM) over
runs with a stratified-bootstrap percentile interval, a min-max normalised aggregate over tasks, and the
bootstrap of a split metric over the split's samples.

With a handful of seeds a mean moves with one diverged run and says nothing of its spread: the IQM drops the
best and worst quarter, and the percentile bootstrap gives an interval without assuming a distribution.
Seeds only vary the training, so a cell's own interval over its test samples adds the test set's sampling
error. Pure numpy; every draw comes from a generator seeded by the caller, so a rerun gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

#: The share of sorted values the IQM cuts from each end.
TRIM = 0.25


@dataclass(frozen=True)
class Estimate:
    """Scores of ``n`` runs: their mean, their IQM and its percentile interval."""

    n: int
    mean: float
    iqm: float
    ci_low: float
    ci_high: float


def iqm(values: ArrayLike) -> float:
    """The mean of the middle half: scipy's ``trim_mean(values, 0.25)``, ``int(0.25 n)`` values cut from each
    end of the sorted values (all of them kept below 4)."""
    return float(_trimmed_means(_flat(values, "iqm")[np.newaxis])[0])


def _flat(values: ArrayLike, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if not array.size:
        raise ValueError(f"{what}: no values")
    return array


def _trimmed_means(samples: np.ndarray) -> np.ndarray:
    """The IQM of each row of ``samples``."""
    width = samples.shape[1]
    cut = int(TRIM * width)
    return np.sort(samples, axis=1)[:, cut:width - cut].mean(axis=1)


def percentile_interval(estimates: ArrayLike, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` share of bootstrap ``estimates`` (numpy's linear percentiles)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence {confidence} must lie in (0, 1)")
    tail = 50 * (1 - confidence)
    low, high = np.percentile(_flat(estimates, "percentile_interval"), [tail, 100 - tail])
    return float(low), float(high)


def stratified_bootstrap_iqm(
    strata: Sequence[ArrayLike], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the IQM of all strata's values pooled, each stratum (a task's seeds) resampled
    with replacement on its own, so that every resample keeps each task's number of runs."""
    arrays = [_flat(values, f"stratum {i}") for i, values in enumerate(strata)]
    if not arrays:
        raise ValueError("stratified_bootstrap_iqm: no strata")
    rng = np.random.default_rng(seed)
    pooled = np.concatenate([a[rng.integers(0, len(a), size=(resamples, len(a)))] for a in arrays], axis=1)
    return percentile_interval(_trimmed_means(pooled), confidence)


def estimate(
    strata: Sequence[ArrayLike], *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Estimate:
    """Mean, IQM and stratified-bootstrap interval of the pooled runs of ``strata`` (one stratum: plain
    bootstrap over its runs)."""
    pooled = np.concatenate([_flat(values, f"stratum {i}") for i, values in enumerate(strata)])
    low, high = stratified_bootstrap_iqm(strata, resamples=resamples, confidence=confidence, seed=seed)
    return Estimate(len(pooled), float(pooled.mean()), iqm(pooled), low, high)


def min_max_normalise(scores: Mapping[str, Mapping[str, ArrayLike]]) -> dict[str, dict[str, np.ndarray]]:
    """``scores[task][encoder]`` (values over seeds) as ``(x - min) / (max - min)``, min and max taken over every
    encoder and seed of the task, so that tasks of different metrics and difficulty weigh alike; a task where
    all scores are equal gives 0.5 to each (no encoder is better or worse there)."""
    normalised = {}
    for task, by_encoder in scores.items():
        arrays = {encoder: _flat(values, f"{task}/{encoder}") for encoder, values in by_encoder.items()}
        every = np.concatenate(list(arrays.values()))
        low, span = every.min(), every.max() - every.min()
        normalised[task] = {encoder: (a - low) / span if span > 0 else np.full_like(a, 0.5)
                            for encoder, a in arrays.items()}
    return normalised


def bootstrap_metric(
    counts: ArrayLike, metric: Callable[[np.ndarray], float], *, resamples: int = 1000, confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of a split metric over the split's samples.

    ``counts`` holds each sample's sufficient statistics, shape (N, ...) (true and false positives, correct
    predictions, per-class intersections and unions), and ``metric`` turns a sum of them into the metric, so
    a resample is scored exactly as a whole split is. Drawing N samples with replacement is drawing how often
    each sample is taken, multinomially.
    """
    stats = np.asarray(counts, dtype=np.float64)
    if stats.ndim == 0 or not len(stats):
        raise ValueError("bootstrap_metric: no samples")
    n = len(stats)
    taken = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples)
    sums = np.tensordot(taken.astype(np.float64), stats, axes=1)
    return percentile_interval([metric(s) for s in sums], confidence)
