"""The probe score of a pretraining run: a linear probe of the current encoder on a validation task.

Ray Tune ranks trials by this score, since the pretraining loss cannot be compared across mask ratios or
loss weights. The test tiles stay untouched: the held-out ``land_cover`` task is cross-fitted on the
``val`` tiles (each of ``LAND_COVER_FOLDS`` folds scored by a head trained on the others, so every tile is
scored once); a GEO-Bench task is trained on ``train`` and scored on ``val``. Data are read once per run
and the encoder's features are recomputed at each probe (a few hundred tiles: seconds on one core).

Accuracy over a hundred tiles moves in steps of 0.01 and ties trials that differ, so the score Tune ranks
by is continuous: the mean probability the head gives each scored tile's true class (micro F1 of the
sigmoid probabilities on multi-label tasks). A seeded bootstrap over the scored tiles gives its 95 %
interval, which says whether two trials' scores differ by more than the choice of tiles could.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mpmae.config import PretrainConfig
from mpmae.evaluation.linear_probe import extract_features, train_head
from mpmae.evaluation.split_metrics import make_metric
from mpmae.evaluation.statistics import bootstrap_metric
from mpmae.modalities import resolve_selection
from mpmae.models.convnextv2 import ConvNeXtV2
from mpmae.tasks import TaskKind

Pair = tuple[Tensor, Tensor]

#: The report keys of a probe: the continuous score Tune ranks by, its 95 % interval, the task metric.
SCORE, SCORE_LOW, SCORE_HIGH, ACCURACY = "probe_score", "probe_score_low", "probe_score_high", "probe_accuracy"

#: Folds of the land-cover cross-fit: each head trains on 4/5 of the val tiles and scores the other 1/5
#: (fewer folds on a split of under ten tiles).
LAND_COVER_FOLDS = 5

#: The coverage of the score's interval.
CONFIDENCE = 0.95


@dataclass(frozen=True)
class ProbeResult:
    """A probe's continuous score with its bootstrap interval, and the task metric (accuracy or micro F1)."""

    score: float
    low: float
    high: float
    accuracy: float

    def metrics(self) -> dict[str, float]:
        return {SCORE: self.score, SCORE_LOW: self.low, SCORE_HIGH: self.high, ACCURACY: self.accuracy}


@dataclass
class ProbeTask:
    """A classification task as tensor parts, the (train parts, scored part) rounds of its heads, and how
    to score it."""

    name: str
    parts: tuple[Pair, ...]
    rounds: tuple[tuple[tuple[int, ...], int], ...]
    kind: TaskKind
    num_classes: int
    epochs: int
    seed: int

    def __call__(self, encoder: ConvNeXtV2, device: str | torch.device = "cpu") -> ProbeResult:
        """The score of linear heads on the frozen encoder over every scored tile; features once per part."""
        features = [extract_features(encoder, part, device=device) for part in self.parts]
        metric = make_metric(self.kind, self.num_classes)
        stats = []
        for trained, scored in self.rounds:
            head = train_head(torch.cat([features[i][0] for i in trained]),
                              torch.cat([features[i][1] for i in trained]), kind=self.kind,
                              num_classes=self.num_classes, epochs=self.epochs, seed=self.seed)
            x, y = features[scored]
            with torch.no_grad():
                logits = head(x)
            metric.update(logits, y)
            stats.append(tile_scores(logits, y, self.kind))
        scores = torch.cat(stats)
        low, high = score_interval(scores, seed=self.seed)
        return ProbeResult(pooled_score(scores), low, high, metric.compute())


def tile_scores(logits: Tensor, labels: Tensor, kind: TaskKind) -> Tensor:
    """Each tile's (numerator, denominator) of the continuous score, which is sum(num) / sum(den): the
    true class's probability over 1, or the multi-label soft F1 terms 2 sum(p y) over sum(p) + sum(y)."""
    logits = logits.detach().double()
    if kind == "multiclass":
        true = logits.softmax(dim=1).gather(1, labels.long()[:, None])[:, 0]
        return torch.stack([true, torch.ones_like(true)], dim=1)
    if kind == "multilabel":
        p, y = logits.sigmoid(), labels.double()
        return torch.stack([2 * (p * y).sum(dim=1), p.sum(dim=1) + y.sum(dim=1)], dim=1)
    raise ValueError(f"the probe scores classification tasks, not {kind}")


def pooled_score(stats: Tensor) -> float:
    """The score of per-tile (numerator, denominator) rows."""
    return _ratio(stats.sum(dim=0))


def score_interval(stats: Tensor, *, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap interval of :func:`pooled_score` over the tiles (seeded, so that a probe's
    interval is reproducible and trials with as many tiles draw the same resamples)."""
    return bootstrap_metric(stats.double().cpu().numpy(), _ratio, confidence=CONFIDENCE, seed=seed)


def _ratio(total: Tensor | np.ndarray) -> float:
    """Summed numerators over summed denominators (a tensor or an array of the two)."""
    return float(total[0] / total[1])


def load_probe_task(config: PretrainConfig) -> ProbeTask:
    """The probe of ``config.probe`` on the model's input bands; raises ValueError on unusable data."""
    probe = config.probe
    if probe.task is None:
        raise ValueError("probe.task is not set")
    bands = resolve_selection(config.model.targets)["sentinel2"]
    if probe.task == "land_cover":
        return _land_cover(config, bands)
    from mpmae.data.geobench import GeoBenchDataset
    from mpmae.tasks import get_task

    spec = get_task(probe.task)
    pairs = tuple(GeoBenchDataset(probe.geobench_dir, probe.task, split, bands=list(bands)).tensors()
                  for split in ("train", "val"))
    return ProbeTask(probe.task, pairs, (((0,), 1),), spec.kind, spec.num_classes, probe.epochs,
                     config.run.seed)


def _land_cover(config: PretrainConfig, bands: tuple[str, ...]) -> ProbeTask:
    from mpmae.data.downstream import NUM_CLASSES, land_cover_task

    folder = config.probe.data or config.data.path
    x, y = land_cover_task(folder, "val", config.data.crop_size, bands)
    if len(y) < 4:
        raise ValueError(f"{folder}: the val split has {len(y)} labelled tiles; the land_cover probe needs 4")
    count = min(LAND_COVER_FOLDS, len(y) // 2)  # at least two tiles a fold
    folds = tuple(zip(x.tensor_split(count), y.tensor_split(count), strict=True))
    rounds = tuple((tuple(i for i in range(count) if i != k), k) for k in range(count))
    return ProbeTask("land_cover", folds, rounds, "multiclass", NUM_CLASSES, config.probe.epochs, config.run.seed)
