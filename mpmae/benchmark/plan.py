"""A suite's cells and its folder: what runs, what each cell's result depends on, and the cell files that
record the finished ones.

``<storage_path>/<name>/cells/<encoder>__<task>__<mode>__<partition>__seed-<seed>.json`` holds a finished
cell's row and the settings it ran with (its spec). The cell's Ray task writes it whole, as its last act, and
nothing overwrites it, so a killed suite resumes where it stopped and a finished one reruns nothing. A cell
file whose spec differs from what the config now asks is refused, naming the settings: one table never
mixes recipes or encoders.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from typing import Any

import mpmae.storage as storage
from mpmae.config import BenchmarkConfig, ConfigError, EvalMode, FinetuneConfig, to_dict
from mpmae.data.downstream import NUM_CLASSES as LAND_COVER_CLASSES
from mpmae.tasks import LAND_COVER, TaskKind, get_task

CELLS_DIR = "cells"
CELL_FORMAT = "mpmae-benchmark-cell/1"
#: What each task kind's metric is called in the tables.
METRIC_NAMES: dict[str, str] = {"multilabel": "micro F1", "multiclass": "accuracy", "segmentation": "mIoU"}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One evaluation of the suite: an encoder (by its name in the config) on a task, partition, mode, seed."""

    encoder: str
    task: str
    mode: EvalMode
    partition: str
    seed: int

    @property
    def file_name(self) -> str:
        return f"{self.encoder}__{self.task}__{self.mode}__{self.partition}__seed-{self.seed}.json"

    def __str__(self) -> str:
        return f"{self.encoder} on {self.task} ({self.mode}, {self.partition}, seed {self.seed})"


def plan_cells(config: BenchmarkConfig) -> list[Cell]:
    """Every cell, seeds innermost: an interrupted suite has whole groups of seeds done first."""
    return [Cell(encoder, task_name(task), mode, partition, seed)
            for task in config.tasks for partition in config.partitions for mode in config.modes
            for encoder in config.encoders for seed in config.seeds]


def task_name(task: str) -> str:
    """The registry's name of a task (aliases resolved), or ``land_cover``."""
    return task if task == LAND_COVER else get_task(task).name


def task_kind(task: str) -> tuple[TaskKind, int]:
    """What a task predicts and over how many classes (``land_cover``: one land-cover class per tile)."""
    if task == LAND_COVER:
        return "multiclass", LAND_COVER_CLASSES
    spec = get_task(task)
    return spec.kind, spec.num_classes


def recipe(config: BenchmarkConfig, cell: Cell) -> dict[str, Any]:
    """The training settings of a cell, epochs included: the segmentation recipe for a segmentation task,
    else its mode's (``freeze_epochs`` only where the encoder is unfrozen later)."""
    kind, _ = task_kind(cell.task)
    if kind == "segmentation":
        settings = to_dict(config.segmentation)
        if cell.mode == "linear_probe":
            del settings["freeze_epochs"]  # frozen throughout
        return settings
    section = config.linear_probe if cell.mode == "linear_probe" else config.finetune
    return {"epochs": config.epochs, **to_dict(section)}


def cell_spec(config: BenchmarkConfig, cell: Cell) -> dict[str, Any]:
    """Everything a cell's result depends on besides its name: the encoder's source (a random one's
    architecture), the recipe, the land-cover crop, the bootstrap. A finished cell is reused only when its
    recorded spec is the same."""
    source = config.encoders[cell.encoder]
    spec: dict[str, Any] = {"source": source, "recipe": recipe(config, cell), "bootstrap": to_dict(config.bootstrap)}
    if source is None:
        spec.update(arch=config.arch, patch_size=config.patch_size)
    if cell.task == LAND_COVER:
        spec["crop_size"] = config.crop_size
    return spec


def finetune_config(config: BenchmarkConfig, cell: Cell) -> FinetuneConfig:
    """The evaluation-run config of a cell trained through the fine-tuner (fine-tuning, or a U-Net)."""
    settings = recipe(config, cell)
    return FinetuneConfig(
        task=cell.task, geobench_dir=config.geobench_dir, partition=cell.partition,
        encoder=config.encoders[cell.encoder], arch=config.arch, patch_size=config.patch_size, mode=cell.mode,
        epochs=settings["epochs"], batch_size=settings["batch_size"], blr=settings["blr"],
        min_lr=settings["min_lr"], warmup_epochs=settings["warmup_epochs"],
        weight_decay=settings["weight_decay"], layer_decay=settings["layer_decay"],
        drop_path=settings["drop_path"], smoothing=settings["smoothing"],
        freeze_epochs=settings.get("freeze_epochs", 0), select="last",
    )


def suite_folder(config: BenchmarkConfig) -> str:
    """``<storage_path>/<name>``: an absolute path, or a URI."""
    return storage.join(storage.absolute(config.storage_path), config.name)


def cell_path(folder: str, cell: Cell) -> str:
    return storage.join(folder, CELLS_DIR, cell.file_name)


def write_cell(folder: str, cell: Cell, spec: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """Record a finished cell; returns its row. A file that another driver of the suite wrote meanwhile is
    kept (its row returned): cell files are never overwritten."""
    path = cell_path(folder, cell)
    content = {"format": CELL_FORMAT, "cell": dataclasses.asdict(cell), "spec": spec, "row": row}
    try:
        storage.write_bytes(path, json.dumps(content, indent=2, default=float).encode())
    except FileExistsError:
        return read_cell(path, cell, spec)
    return row


def read_cell(path: str, cell: Cell, spec: dict[str, Any]) -> dict[str, Any]:
    """The row of a cell file, refused (naming the file and the settings) when it ran with another spec."""
    try:
        content = json.loads(storage.read_bytes(path))
        recorded, row = content["spec"], content["row"]
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{path}: not a cell file of this suite ({err}); move it away to rerun the cell") from None
    if recorded != spec:
        changed = sorted(_differences(recorded, spec))
        raise ConfigError(f"{path}: {cell} ran with other settings than the config asks ({', '.join(changed)}); "
                          "give the suite another name, or restore them")
    return dict(row)


def _differences(recorded: dict[str, Any], wanted: dict[str, Any], prefix: str = "") -> Iterable[str]:
    """The dotted keys whose values differ between two specs."""
    for key in recorded.keys() | wanted.keys():
        old, new = recorded.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            yield from _differences(old, new, f"{prefix}{key}.")
        elif old != new:
            yield f"{prefix}{key} {old!r} -> {new!r}"


def finished_rows(config: BenchmarkConfig, cells: Iterable[Cell]) -> dict[Cell, dict[str, Any]]:
    """The rows of the cells that have a file: what a rerun does not run again."""
    folder = suite_folder(config)
    present = storage.file_sizes(storage.join(folder, CELLS_DIR))
    return {cell: read_cell(cell_path(folder, cell), cell, cell_spec(config, cell))
            for cell in cells if cell.file_name in present}
