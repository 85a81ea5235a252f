"""Linear probes of several encoders on one task, in this process: the demo's and `mpmae probe`'s table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpmae.data.geobench import GeoBenchDataset
from mpmae.evaluation.linear_probe import linear_probe
from mpmae.export import encoder_from
from mpmae.tasks import TaskKind, get_task


def probe_table(
    encoders: Sequence[str | None], task: str, *, data: str | Path | None = None, geobench_dir: str | None = None,
    crop_size: int = 56, epochs: int = 100, seed: int = 0,
) -> list[dict[str, Any]]:
    """In-process linear probes of several encoders (None = random init) on one task, as table rows.

    ``task="land_cover"`` is the held-out synthetic task of an MMEarth folder ``data`` (probe trained on its
    val split, scored on test); any GEO-Bench task trains on train and is scored on test.
    """
    from mpmae.data.downstream import NUM_CLASSES, land_cover_task

    rows = []
    for source in encoders:
        encoder, card = encoder_from(source)
        bands = tuple(card["bands"])
        kind: TaskKind
        if task == "land_cover":
            if data is None:
                raise ValueError("the land_cover task needs --data, an MMEarth folder")
            train, test = (land_cover_task(data, s, crop_size, bands) for s in ("val", "test"))
            kind, classes = "multiclass", NUM_CLASSES
        else:
            spec = get_task(task)
            train, test = (GeoBenchDataset(geobench_dir, task, s, bands=list(bands)).tensors()
                           for s in ("train", "test"))
            kind, classes = spec.kind, spec.num_classes
        score = linear_probe(encoder, train, test, kind=kind, num_classes=classes, epochs=epochs, seed=seed)
        rows.append({"encoder": str(source) if source else "random init", "task": task,
                     "train_samples": len(train[1]), "test_samples": len(test[1]), "score": score})
    return rows

