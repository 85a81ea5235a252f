"""Running a suite (``mpmae benchmark``): its inputs checked before anything runs, each unfinished cell a Ray
task, the summary written when every cell is done.

A cell asks ``cpus_per_cell`` CPUs and, with ``use_gpu``, one GPU, so Ray runs as many at once as the
cluster holds (GPU cells on GPU nodes), or at most ``max_concurrent_cells``. Each task writes its cell file
when it finishes; the driver reads the files first, so an interrupted suite resumes with the cells it lacks
and a finished one starts no task at all. A cell that fails leaves the others running; the suite then ends
with :class:`CellsFailedError`, and a rerun retries only the failed cells.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
import torch

import mpmae.storage as storage
from mpmae.benchmark.cell import SPLITS, run_cell
from mpmae.benchmark.plan import Cell, cell_spec, finished_rows, plan_cells, suite_folder, write_cell
from mpmae.benchmark.summary import write_summary
from mpmae.config import BenchmarkConfig, ConfigError, RunConfig, check_store
from mpmae.data.geobench import GeoBenchDataset
from mpmae.data.mmearth import MMEarthDataset
from mpmae.export import encoder_from
from mpmae.runtime.instance import check_resources, ensure_ray
from mpmae.tasks import LAND_COVER, get_task

log = logging.getLogger(__name__)


class CellsFailedError(RuntimeError):
    """Cells of the suite raised; the others finished and keep their files, so a rerun retries only these."""


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    """Run the cells of ``config`` that have no cell file yet, then write the summary files.

    Returns the summary rows (``summary``), ``markdown`` (summary.md's text), each file's path (``paths``),
    the suite ``folder``, the cells' rows (``results``), and how many cells ran now (``ran``) and were
    found finished (``reused``). Every input is checked first: errors are :class:`ConfigError` naming the key.
    """
    config = prepare(config)
    cells = plan_cells(config)
    done = finished_rows(config, cells)
    todo = [cell for cell in cells if cell not in done]
    log.info("benchmark %s: %d cells, %d finished before, %d to run", config.name, len(cells), len(done), len(todo))
    if todo:
        done.update(_run_cells(config, todo))
    results = [done[cell] for cell in cells]
    summary = write_summary(config, results)
    return {"folder": suite_folder(config), "results": results, "ran": len(todo), "reused": len(cells) - len(todo),
            **summary}


def prepare(config: BenchmarkConfig) -> BenchmarkConfig:
    """``config`` validated, its paths absolute (Ray runs cells in other working directories), its store
    reachable, its encoders, task folders, partitions and land-cover data checked."""
    config.validate()
    resolved = copy.deepcopy(config)
    resolved.storage_path = storage.absolute(config.storage_path)
    resolved.encoders = {name: None if source is None else storage.absolute(source)
                         for name, source in config.encoders.items()}
    resolved.data = None if config.data is None else storage.absolute(config.data)
    resolved.geobench_dir = _geobench_root(config)
    check_store(resolved.storage_path, "storage_path")
    check_inputs(resolved)
    return resolved


def _geobench_root(config: BenchmarkConfig) -> str | None:
    """The GEO-Bench root as an absolute path, from ``geobench_dir`` or ``$GEO_BENCH_DIR``; None when only
    ``land_cover`` runs."""
    if all(task == LAND_COVER for task in config.tasks):
        return None
    root = config.geobench_dir or os.environ.get("GEO_BENCH_DIR")
    if not root:
        raise ConfigError("geobench_dir: not set, nor is $GEO_BENCH_DIR; the GEO-Bench tasks are read from there")
    return str(Path(root).resolve())


def check_inputs(config: BenchmarkConfig) -> None:
    """Every encoder loads; every task's folder, partitions and splits read, with each encoder's bands; the
    land-cover data has its splits. Each error names the key (``encoders.<name>``, ``tasks[i]``,
    ``partitions[j]``, ``data``)."""
    bands = {name: encoder_bands(config, name) for name in config.encoders}
    for i, task in enumerate(config.tasks):
        if task == LAND_COVER:
            _check_land_cover_data(config, bands)
        else:
            _check_geobench_task(config, i, bands)


def encoder_bands(config: BenchmarkConfig, name: str) -> list[str]:
    """The input bands of encoder ``name``, loading it as a cell will."""
    key, source = f"encoders.{name}", config.encoders[name]
    if source is not None:
        check_store(source, key)
    try:
        _, card = encoder_from(source, 0.0, config.arch, config.patch_size)
    except (ValueError, OSError) as err:
        raise ConfigError(f"{key}: does not load as an encoder ({err})") from None
    return list(card["bands"])


def _check_geobench_task(config: BenchmarkConfig, index: int, bands: dict[str, list[str]]) -> None:
    key, task = f"tasks[{index}]", get_task(config.tasks[index])
    folder = Path(str(config.geobench_dir), task.benchmark, task.name)
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is missing (the GEO-Bench folder of {task.name}, under geobench_dir)")
    for j, partition in enumerate(config.partitions):
        if not (folder / f"{partition}_partition.json").is_file():
            present = sorted(p.name.removesuffix("_partition.json") for p in folder.glob("*_partition.json"))
            raise ConfigError(f"partitions[{j}]: {task.name} has no {partition!r} partition "
                              f"({folder / f'{partition}_partition.json'} is missing; it has {present})")
        for split in SPLITS:
            try:
                GeoBenchDataset(config.geobench_dir, task.name, split, partition=partition)
            except (ValueError, OSError) as err:
                raise ConfigError(f"{key}: {err}") from None
    for name, names in bands.items():
        try:
            GeoBenchDataset(config.geobench_dir, task.name, "test", partition=config.partitions[0], bands=names)
        except (ValueError, OSError) as err:
            raise ConfigError(f"encoders.{name}: its bands do not fit {key} {task.name} ({err})") from None


def _check_land_cover_data(config: BenchmarkConfig, bands: dict[str, list[str]]) -> None:
    """The MMEarth folder has two or more val tiles (halves to train and validate) and a test tile."""
    for split, least in (("val", 2), ("test", 1)):
        try:
            found = len(MMEarthDataset(str(config.data), split, {"sentinel2": None, "esa_worldcover": None}))
        except (ValueError, OSError) as err:
            raise ConfigError(f"data: {err}") from None
        if found < least:
            raise ConfigError(f"data: {config.data}: split {split!r} has {found} tile(s); {LAND_COVER} needs "
                              f"{least} or more")
    for name, names in bands.items():
        try:
            MMEarthDataset(str(config.data), "test", {"sentinel2": tuple(names), "esa_worldcover": None})
        except (ValueError, OSError) as err:
            raise ConfigError(f"encoders.{name}: its bands do not fit {LAND_COVER}'s data ({err})") from None


def _run_cells(config: BenchmarkConfig, todo: Sequence[Cell]) -> dict[Cell, dict[str, Any]]:
    """Run ``todo`` as Ray tasks, at most ``max_concurrent_cells`` at once; their rows by cell."""
    ensure_ray()
    _check_cell_fits(config)
    task = ray.remote(evaluate_cell).options(num_cpus=config.cpus_per_cell, num_gpus=1 if config.use_gpu else 0)
    limit = config.max_concurrent_cells or len(todo)
    queue = list(todo)
    pending: dict[ray.ObjectRef, Cell] = {}
    rows: dict[Cell, dict[str, Any]] = {}
    failed: list[tuple[Cell, str]] = []
    while queue or pending:
        while queue and len(pending) < limit:
            cell = queue.pop(0)
            pending[task.remote(config, cell)] = cell
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        cell = pending.pop(ready)
        try:
            rows[cell] = ray.get(ready)
        except ray.exceptions.RayError as err:
            failed.append((cell, _first_line(err)))
            log.error("cell %s failed: %s", cell, failed[-1][1])
            continue
        log.info("cell %s: test %s %.4f (%d of %d done)", cell, rows[cell]["metric"], rows[cell]["test_metric"],
                 len(rows), len(todo))
    if failed:
        raise CellsFailedError(f"{len(failed)} of {len(todo)} cells failed, the first: {failed[0][0]}: "
                               f"{failed[0][1]}; the others are kept, a rerun retries the failed ones")
    return rows


def evaluate_cell(config: BenchmarkConfig, cell: Cell) -> dict[str, Any]:
    """A cell's Ray task: the cell run with the threads of its CPUs, its file written; returns its row."""
    torch.set_num_threads(max(1, int(config.cpus_per_cell)))
    return write_cell(suite_folder(config), cell, cell_spec(config, cell), run_cell(config, cell))


def _check_cell_fits(config: BenchmarkConfig) -> None:
    """One cell fits a node of the cluster (waiting for the autoscaler where it can grow), else a
    ConfigError naming the keys."""
    run = RunConfig(num_workers=1, cpus_per_worker=config.cpus_per_cell, use_gpu=config.use_gpu)
    try:
        check_resources(run, {})
    except ConfigError as err:
        raise ConfigError(f"cpus_per_cell / use_gpu: a cell ({config.cpus_per_cell:g} CPUs"
                          f"{', 1 GPU' if config.use_gpu else ''}) cannot run on this cluster; as a "
                          f"one-worker run: {err}") from None


def _first_line(err: BaseException) -> str:
    """A cell's error in one line: the exception raised in the task, not Ray's wrapping of it."""
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None else err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"

