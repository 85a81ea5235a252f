"""The downstream tasks: GEO-Bench's, by name, with their kind and class count (docs/method.md, GEO-Bench data).

Plain data with no heavy imports, so that configs are checked against it before anything else loads;
:mod:`mpmae.data.geobench` reads the task folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

#: What a task predicts: several labels per image, one class per image, or one class per pixel.
TaskKind = Literal["multilabel", "multiclass", "segmentation"]
TASK_KINDS: tuple[str, ...] = ("multilabel", "multiclass", "segmentation")


@dataclass(frozen=True)
class GeoBenchTask:
    """One GEO-Bench task as MMEarth evaluates it (docs/method.md, GEO-Bench data).

    ``substitutes`` maps a Sentinel-2 band the task lacks to the band read in its place; the stored
    mean/std are divided by ``stats_divisor`` (So2Sat's pixels are reflectances, its stats x10000).
    """

    name: str
    benchmark: str
    kind: TaskKind
    num_classes: int
    image_size: int  # native side in pixels, informational
    substitutes: tuple[tuple[str, str], ...] = ()
    stats_divisor: float = 1.0


# m-eurosat and m-brick-kiln: upstream geo-bench reports that their stored band names do not match the
# pixel channels (geo-bench issues #28, #29); like the reference, this reader trusts the stored names.
TASKS: dict[str, GeoBenchTask] = {
    t.name: t
    for t in (
        GeoBenchTask("m-bigearthnet", "classification_v1.0", "multilabel", 43, 120),
        GeoBenchTask("m-so2sat", "classification_v1.0", "multiclass", 17, 32,
                     substitutes=(("B1", "B2"), ("B9", "B8A")), stats_divisor=10000.0),
        GeoBenchTask("m-eurosat", "classification_v1.0", "multiclass", 10, 64),
        GeoBenchTask("m-brick-kiln", "classification_v1.0", "multiclass", 2, 64),
        GeoBenchTask("m-cashew-plant", "segmentation_v1.0", "segmentation", 7, 256),
        GeoBenchTask("m-SA-crop-type", "segmentation_v1.0", "segmentation", 10, 256),
    )
}
#: The paper and the reference's docs call m-cashew-plant "m-cashew-plantation" (docs/method.md, D18).
TASK_ALIASES = {"m-cashew-plantation": "m-cashew-plant"}
#: GEO-Bench's label partitions: its default split, and the train split cut to a share of its samples.
PARTITIONS: tuple[str, ...] = (
    "default", "0.01x_train", "0.02x_train", "0.05x_train", "0.10x_train", "0.20x_train", "0.50x_train",
    "1.00x_train",
)
#: The held-out task of an MMEarth folder (:mod:`mpmae.data.downstream`), to judge encoders without GEO-Bench;
#: it has the ``default`` partition only.
LAND_COVER = "land_cover"


def get_task(name: str) -> GeoBenchTask:
    """The registry entry for ``name`` (or an alias); raises ``ValueError`` listing the valid names."""
    task = TASKS.get(TASK_ALIASES.get(name, name))
    if task is None:
        raise ValueError(
            f"unknown GEO-Bench task {name!r}; valid tasks: {list(TASKS)} (aliases: {TASK_ALIASES})"
        )
    return task
