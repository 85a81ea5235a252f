"""The probe score of a pretraining run: a linear probe of the current encoder on a validation task.

Ray Tune ranks trials by this score, since the pretraining loss cannot be compared across mask ratios or
loss weights. The test tiles stay untouched: on the held-out ``land_cover`` task the head is trained on
the first half of the ``val`` tiles and scored on the second half; on a GEO-Bench task it is trained on
``train`` and scored on ``val``. Data are read once per run and the encoder's features are recomputed at
each probe (a few hundred tiles: seconds on one core).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mpmae.config import PretrainConfig
from mpmae.evaluation.linear_probe import linear_probe
from mpmae.modalities import resolve_selection
from mpmae.models.convnextv2 import ConvNeXtV2
from mpmae.tasks import TaskKind

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ProbeTask:
    """Train and score splits of a classification task, as tensors, and how to score it."""

    name: str
    train: Pair
    score: Pair
    kind: TaskKind
    num_classes: int
    epochs: int
    seed: int

    def __call__(self, encoder: ConvNeXtV2, device: str | torch.device = "cpu") -> float:
        """The score split's metric (accuracy or micro F1) of a linear head on the frozen encoder."""
        return linear_probe(encoder, self.train, self.score, kind=self.kind, num_classes=self.num_classes,
                            epochs=self.epochs, seed=self.seed, device=device)


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
    pairs = []
    for split in ("train", "val"):
        dataset = GeoBenchDataset(probe.geobench_dir, probe.task, split, bands=list(bands))
        pairs.append(dataset.tensors())
    return ProbeTask(probe.task, pairs[0], pairs[1], spec.kind, spec.num_classes, probe.epochs, config.run.seed)


def _land_cover(config: PretrainConfig, bands: tuple[str, ...]) -> ProbeTask:
    from mpmae.data.downstream import NUM_CLASSES, land_cover_task

    folder = config.probe.data or config.data.path
    x, y = land_cover_task(folder, "val", config.data.crop_size, bands)
    if len(y) < 4:
        raise ValueError(f"{folder}: the val split has {len(y)} labelled tiles; the land_cover probe needs 4")
    half = len(y) // 2
    return ProbeTask("land_cover", (x[:half], y[:half]), (x[half:], y[half:]), "multiclass", NUM_CLASSES,
                     config.probe.epochs, config.run.seed)

