"""Assemble and run a pretraining job on Ray Train (V2): data checks, run name, TorchTrainer.

Everything that can be checked without workers is checked here, in the driver, before any worker
starts: the config, that the data hold every pretext target, that one batch fits each worker.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train.torch import TorchTrainer

import mpmae.storage as storage
from mpmae.checkpoint import plan_resume
from mpmae.config import ConfigError, PretrainConfig, RunConfig, check_name, check_store, to_dict
from mpmae.data.loaders import ray_dataset
from mpmae.data.mmearth import MMEarthDataset
from mpmae.data.normalize import Normalizer
from mpmae.data.shards import open_shard_set
from mpmae.evaluation.probe_task import load_probe_task
from mpmae.modalities import PRESETS, resolve_selection
from mpmae.runtime.instance import DATA_PIPELINE_CPUS, check_resources, ensure_ray
from mpmae.runtime.run import data_config, fit, train_run_config
from mpmae.tracking import Tracker, open_run
from mpmae.train.worker import train_loop_per_worker

log = logging.getLogger(__name__)

#: Names of the released MMEarth data folders in the original checkpoint naming convention.
_DATA_NAMES = {"data_1M_v001_64": "1M_64", "data_1M_v001": "1M_128", "data_100k_v001": "100k_128"}


@dataclass
class DataSource:
    """What the driver learns about the training data before starting workers."""

    rows: int
    image_size: int
    selection: dict[str, tuple[str, ...]]
    band_stats: dict[str, Any]
    name: str
    #: The feed's normalisation (:meth:`Normalizer.to_dict`), which the workers apply on their device.
    normalizer: dict[str, Any]


def default_run_name(config: PretrainConfig, data_name: str) -> str:
    """The original project's folder convention: ``pt-<INPUT>_<MODEL>_<DATA>_<LOSS>_<IMG>-<PATCH>``."""
    targets = config.model.targets
    preset = targets if isinstance(targets, str) and targets in PRESETS else "custom"
    return (f"pt-{preset}_{config.model.arch}_{data_name}_{config.model.loss}_"
            f"{config.data.crop_size}-{config.model.patch_size}")


def describe_data(config: PretrainConfig) -> DataSource:
    """Open the training data just enough to validate it against the config.

    ``data.path`` may be an object-store URI for Parquet shards only (Ray Data streams them from the store);
    an MMEarth h5 folder and FFCV shards must be local. A missing bucket, refused credentials or a store
    that does not answer are one ConfigError naming ``data.path``, before any worker starts.
    """
    data = config.data
    where = str(data.path)
    if storage.is_uri(where):
        if data.format == "mmearth":
            raise ConfigError(
                f"data.path: {where}: the MMEarth h5 folder must be local (its h5 is read in place); shard it "
                f"into the store with `mpmae shard FOLDER {where}` and set data.format: parquet"
            )
        if data.format == "ffcv":
            raise ConfigError(
                f"data.path: {where}: FFCV reads local shards only; copy them to node-local disk on every node "
                f"and point data.path there (or use Parquet shards, which stream from the store)"
            )
        try:
            storage.check_reachable(where, "data.path")
        except storage.StorageError as err:
            raise ConfigError(str(err)) from None
    path = Path(where)
    if data.format == "mmearth":
        try:
            dataset = MMEarthDataset(path, data.split, config.model.targets)
        except ValueError as err:
            raise ConfigError(f"data.path: {err}") from None
        band_stats = json.loads(dataset.files.band_stats.read_text())
        stem = dataset.files.h5.stem
        source = DataSource(len(dataset), dataset.image_size or 0, dataset.selection, band_stats,
                            _DATA_NAMES.get(stem, f"{stem.removeprefix('data_')}"), dataset.normalizer.to_dict())
    else:
        source = _describe_shards(config)
    _check_source(config, source)
    return source


def _describe_shards(config: PretrainConfig) -> DataSource:
    data = config.data
    assert data.format != "mmearth"
    where = str(data.path)
    try:
        shards = open_shard_set(where, data.split, data.format)  # checked against its manifest
    except ValueError as err:  # ShardError, StorageError
        raise ConfigError(f"data.path: {err}") from None
    except OSError as err:  # a store that does not answer; local OSErrors pass as they are
        if not storage.is_uri(where):
            raise
        raise ConfigError(f"data.path: {err}") from None
    normalizer = Normalizer.from_dict(shards.manifest["normalization"])
    wanted = [name for name in resolve_selection(config.model.targets) if name in normalizer.selection]
    return DataSource(shards.rows, shards.image_size or 0, dict(shards.selection), shards.manifest["band_stats"],
                      storage.name_of(where) if storage.is_uri(where) else Path(where).name,
                      normalizer.subset(wanted).to_dict())


def _check_source(config: PretrainConfig, source: DataSource) -> None:
    wanted = resolve_selection(config.model.targets)
    for name, bands in wanted.items():
        if source.selection.get(name) != bands:
            raise ConfigError(
                f"model.targets: the data at {config.data.path} hold {name!r} with bands "
                f"{source.selection.get(name, 'none')}, the config needs {list(bands)}"
            )
    if config.data.crop_size > source.image_size:
        raise ConfigError(f"data.crop_size: {config.data.crop_size} exceeds the data's tiles of {source.image_size} px")
    per_worker = config.optim.batch_size // config.run.num_workers
    if source.rows // config.run.num_workers < per_worker:
        raise ConfigError(
            f"optim.batch_size: {source.rows} tiles in split {config.data.split!r} give each of "
            f"{config.run.num_workers} workers less than one batch of {per_worker}"
        )


def norm_stats(source: DataSource) -> dict[str, Any]:
    """The Sentinel-2 statistics of the input bands, per processing level, for the model card."""
    from mpmae.modalities import SENTINEL2_BANDS

    bands = source.selection["sentinel2"]
    index = [SENTINEL2_BANDS.index(b) for b in bands]
    out: dict[str, Any] = {"bands": list(bands)}
    for key in ("sentinel2_l1c", "sentinel2_l2a"):
        if key in source.band_stats:
            out[key] = {f: [source.band_stats[key][f][i] for i in index] for f in ("mean", "std")}
    return out


def build_trainer(config: PretrainConfig, source: DataSource, callbacks: Sequence[Any] = (),
                  tracking: Mapping[str, Any] | None = None) -> TorchTrainer:
    """The TorchTrainer of a validated config; ``callbacks`` are Ray Train callbacks (Tune's reporter),
    ``tracking`` the spec of :func:`open_tracking` (rank 0 logs to it)."""
    run = config.run
    datasets: dict[str, ray.data.Dataset | Callable[[], ray.data.Dataset]] = {}
    ray.data.DataContext.get_current().enable_progress_bars = False  # rank 0 logs one line per epoch
    if config.data.format != "ffcv":
        train = ray_dataset(config.data.path, config.data.split, config.model.targets,
                            shuffle=True, seed=run.seed, include_id=False)
        train.context.print_on_execution_start = False  # two lines per epoch otherwise
        datasets["train"] = train
    name = run_name(config, source)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(config), "rows": source.rows, "norm_stats": norm_stats(source),
                           "normalizer": source.normalizer, "tracking": dict(tracking or {}),
                           "run_name": name, "resume": plan_resume(run.storage, name)},
        scaling_config=scaling_config(run),
        run_config=train_run_config(run, name, callbacks),
        datasets=datasets,
        dataset_config=data_config(),
    )


def scaling_config(run: RunConfig) -> ray.train.ScalingConfig:
    """Fixed ``num_workers``, or elastic from ``min_workers`` to ``num_workers`` (Ray Train V2 resizes the
    worker group as nodes come and go; the global batch stays the config's)."""
    workers = run.num_workers if run.min_workers is None else (run.min_workers, run.num_workers)
    return ray.train.ScalingConfig(
        num_workers=workers, use_gpu=run.use_gpu,  # type: ignore[arg-type]
        resources_per_worker={"CPU": run.cpus_per_worker, **run.worker_resources},
        placement_strategy=run.placement_strategy,
    )


def run_name(config: PretrainConfig, source: DataSource) -> str:
    """``run.name``, or the default built from the data's name, which is a user's file name: checked as a path part."""
    if config.run.name:
        return config.run.name
    return check_name(default_run_name(config, source.name), "run.name (unset, so the default from the data's name)")


def data_cpus(config: PretrainConfig) -> dict[str, float]:
    """The CPUs a pretraining run asks beside its workers': a Ray Data pipeline (FFCV loads in the workers)."""
    return {"the Ray Data pipeline": DATA_PIPELINE_CPUS if config.data.format != "ffcv" else 0.0}


def check_probe(config: PretrainConfig) -> None:
    """Load the probe task once in the driver, so that bad probe data fail before any worker starts."""
    if config.probe.task is None:
        return
    try:
        load_probe_task(config)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(f"probe: {err}") from None


def open_tracking(config: PretrainConfig, name: str, parent: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The tracking spec of run ``name`` (its MLflow run opened, params logged), nested under ``parent``'s."""
    return open_run(config.tracking, storage.join(config.run.storage, name), name, to_dict(config), parent,
                    tags={"mpmae.kind": "pretrain"})


def fit_tracked(trainer: TorchTrainer, config: PretrainConfig, name: str, spec: Mapping[str, Any]) -> ray.train.Result:
    """``fit(trainer)``, then the run's artifacts attached and its MLflow run ended with how the run ended."""
    tracker = Tracker(spec, tensorboard=False)
    try:
        result = fit(trainer)
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    if tracker.run_id is not None:
        tracker.guarded("attach the run's artifacts", lambda: _attach_artifacts(tracker, config, name))
    tracker.finish()
    return result


def _attach_artifacts(tracker: Tracker, config: PretrainConfig, name: str) -> None:
    """The model card and loss curves of the newest checkpoint, and reconstructions when MMEarth data are local."""
    from mpmae.atomic import atomic_write_json
    from mpmae.checkpoint import find_checkpoint
    from mpmae.export import CARD_FILE, fetched, model_card
    from mpmae.viz import LOSS_CURVES_FILE, plot_loss_curves, write_reconstructions

    run_folder = storage.join(config.run.storage, name)
    with tempfile.TemporaryDirectory(prefix="mpmae-artifacts-") as tmp, \
            fetched(run_folder, "run.storage_path") as local:
        out = Path(tmp)
        file, payload = find_checkpoint(local)
        files = [atomic_write_json(out / CARD_FILE, model_card(payload, file)),
                 plot_loss_curves(payload.get("history", []), out / LOSS_CURVES_FILE)]
        tracker.log_artifacts(files)
        data = config.data.path if config.data.format == "mmearth" else config.probe.data
        if data is not None and not storage.is_uri(data):
            pictures = tracker.guarded("draw reconstructions", lambda: write_reconstructions(
                local, data, out / "reconstructions", split="val"))
            tracker.log_artifacts([Path(p) for p in pictures or []], "reconstructions")


def pretrain(config: PretrainConfig) -> ray.train.Result:
    """Validate, open the tracking, start (or join) Ray, and run the pretraining to completion."""
    check_store(config.run.storage_path, "run.storage_path")
    source = describe_data(config)
    name = run_name(config, source)
    check_probe(config)
    spec = open_tracking(config, name)
    ensure_ray()
    check_resources(config.run, data_cpus(config))
    return fit_tracked(build_trainer(config, source, tracking=spec), config, name, spec)
