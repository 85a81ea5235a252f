"""Assemble and run a pretraining job on Ray Train (V2): data checks, run name, TorchTrainer.

Everything that can be checked without workers is checked here, in the driver, before any worker
starts: the config, that the data hold every pretext target, that one batch fits each worker.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import ray
import ray.train
from ray.train.torch import TorchTrainer

from mpmae.config import ConfigError, PretrainConfig, RunConfig, check_name, to_dict
from mpmae.data.loaders import ray_dataset
from mpmae.data.mmearth import MMEarthDataset
from mpmae.data.shards import find_shards, read_shard_metadata
from mpmae.modalities import PRESETS, resolve_selection
from mpmae.train.checkpoint import plan_resume
from mpmae.train.probe import load_probe_task
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


def default_run_name(config: PretrainConfig, data_name: str) -> str:
    """The original project's folder convention: ``pt-<INPUT>_<MODEL>_<DATA>_<LOSS>_<IMG>-<PATCH>``."""
    targets = config.model.targets
    preset = targets if isinstance(targets, str) and targets in PRESETS else "custom"
    return (f"pt-{preset}_{config.model.arch}_{data_name}_{config.model.loss}_"
            f"{config.data.crop_size}-{config.model.patch_size}")


def describe_data(config: PretrainConfig) -> DataSource:
    """Open the training data just enough to validate it against the config."""
    data = config.data
    path = Path(data.path)
    if data.format == "mmearth":
        try:
            dataset = MMEarthDataset(path, data.split, config.model.targets)
        except ValueError as err:
            raise ConfigError(f"data.path: {err}") from None
        band_stats = json.loads(dataset.files.band_stats.read_text())
        stem = dataset.files.h5.stem
        source = DataSource(len(dataset), dataset.image_size or 0, dataset.selection, band_stats,
                            _DATA_NAMES.get(stem, f"{stem.removeprefix('data_')}"))
    else:
        source = _describe_shards(config)
    _check_source(config, source)
    return source


def _describe_shards(config: PretrainConfig) -> DataSource:
    data = config.data
    try:
        paths = find_shards(data.path, data.split, data.format)
    except ValueError as err:
        raise ConfigError(f"data.path: {err}") from None
    if data.format == "parquet":
        meta = read_shard_metadata(paths[0])
        rows = sum(pq.read_metadata(p).num_rows for p in paths)
    else:
        meta = json.loads((Path(data.path) / f"{data.split}-ffcv.json").read_text())
        rows = int(meta["rows"])
    selection = {k: tuple(v) for k, v in meta["selection"].items()}
    return DataSource(rows, int(meta["image_size"] or 0), selection, meta["band_stats"], Path(data.path).name)


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


#: CPUs of a Ray Data pipeline beside the Train workers: its read tasks each ask for one.
DATA_PIPELINE_CPUS = 1.0
#: Seconds between looks at the cluster while the autoscaler adds nodes.
_RESOURCE_POLL_S = 5.0


def ensure_ray(**local_init: Any) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local instance of this process's own
    (``local_init``: more ``ray.init`` arguments for it)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    _start_local_instance(local_init)


def _start_local_instance(local_init: dict[str, Any]) -> None:
    """A Ray instance that other instances on the machine neither find nor disturb, and that finds only itself.

    ``address="local"`` always starts a new instance (auto-discovery could join a stale or unrelated one).
    Its own temporary folder keeps its sockets, logs and metrics files apart, and Ray's machine-wide
    "current cluster" record (``/tmp/ray/ray_current_cluster``) is left alone: another run's instance
    must not be sent here, nor this one's processes elsewhere. Those processes find their cluster through
    Ray's state API (Train's placement-group cleaner asks it whether the run's controller lives), which
    takes the dashboard address from ``RAY_API_SERVER_ADDRESS`` before any auto-discovery (which would
    pick the newest instance on the machine, warning about the others). The raylet, and so every worker
    it starts, inherits this process's environment: set it before ``ray.init``. (Ray is pinned to 2.60.*;
    see ``ray.dashboard.utils.get_address_for_submission_client``.)
    """
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    root = os.environ.get("RAY_TMPDIR") or ("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir())
    temp_dir = tempfile.mkdtemp(prefix="mpmae-ray-", dir=root)  # short: Ray's socket paths must stay < 108 bytes
    ray.init(address="local", num_cpus=local_cpus(), include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, _temp_dir=temp_dir, **local_init)
    log.info("local Ray instance: dashboard http://127.0.0.1:%d, logs and metrics files under %s", port, temp_dir)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_cpus() -> int:
    """The CPUs a local instance declares: the machine's, as Ray counts them (cgroup limits included), plus one.

    Ray schedules by declared CPUs, not by load. With only the cores declared, a run whose workers take all
    of them (2 workers x 1 CPU on 2 cores) leaves no slot for Ray Data's read tasks, which then never start,
    and the run waits forever. One more slot lets the data pipeline run beside the workers (it mostly waits
    on reads). Declaring more (``max(cores, 4)`` before) would let a run that does not fit the machine start
    and crawl; :func:`check_resources` refuses it instead, saying what is missing.
    """
    from ray._private.utils import get_num_cpus  # private: ray is pinned to 2.60.*

    return int(get_num_cpus()) + int(DATA_PIPELINE_CPUS)


def resource_shortfall(run: RunConfig, extra_cpus: Mapping[str, float], total: Mapping[str, float],
                       largest_node: Mapping[str, float]) -> str | None:
    """Why a cluster with ``total`` resources (``largest_node`` the biggest node's) cannot hold a run, else None.

    ``extra_cpus`` names the CPUs asked beside the workers' (the Ray Data pipeline, a Tune trial's driver).
    """
    cpus = run.num_workers * run.cpus_per_worker + sum(extra_cpus.values())
    have = total.get("CPU", 0.0)
    if cpus > have + 1e-9:
        extras = "".join(f", plus {n:g} for {what}" for what, n in extra_cpus.items() if n)
        return (f"run.num_workers: {run.num_workers} workers x {run.cpus_per_worker:g} CPU (run.cpus_per_worker)"
                f"{extras}, need {cpus:g} CPUs; the cluster has {have:g} ({cpus - have:g} missing)")
    if run.cpus_per_worker > largest_node.get("CPU", 0.0) + 1e-9:
        return (f"run.cpus_per_worker: a worker needs {run.cpus_per_worker:g} CPUs on one node; the largest node "
                f"has {largest_node.get('CPU', 0.0):g}")
    gpus = total.get("GPU", 0.0)
    if run.use_gpu and run.num_workers > gpus + 1e-9:
        return (f"run.use_gpu: {run.num_workers} workers x 1 GPU need {run.num_workers} GPUs; the cluster has "
                f"{gpus:g} ({run.num_workers - gpus:g} missing)")
    return None


def _current_shortfall(run: RunConfig, extra_cpus: Mapping[str, float]) -> str | None:
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest = max(nodes, key=lambda r: r.get("CPU", 0.0), default={})
    return resource_shortfall(run, extra_cpus, ray.cluster_resources(), largest)


def _autoscaler_ceiling() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may reach, or None when the cluster cannot grow.

    The autoscaler (v1 or v2, KubeRay's too) publishes its node types in GCS; Ray Data reads the same.
    """
    from ray._private.state import state  # private: ray is pinned to 2.60.*

    config = state.get_cluster_config()
    if config is None or not any(g.max_count == -1 or g.max_count > g.min_count
                                 for g in config.node_group_configs if g.resources and g.max_count != 0):
        return None
    return {k: float(v) for k, v in (state.get_max_resources_from_cluster_config() or {}).items()}


def check_resources(run: RunConfig, extra_cpus: Mapping[str, float]) -> None:
    """Refuse a run the cluster cannot hold, saying what is missing, before Train would wait for it forever.

    On a cluster that can add nodes, ask the autoscaler for them and wait up to ``run.resource_wait_s``.
    """
    problem = _current_shortfall(run, extra_cpus)
    if problem is None:
        return
    ceiling = _autoscaler_ceiling()
    if ceiling is not None and resource_shortfall(run, extra_cpus, ceiling, ceiling) is None:
        problem = _wait_for_nodes(run, extra_cpus)
        if problem is None:
            return
        problem += f", after waiting {run.resource_wait_s:g} s (run.resource_wait_s) for the autoscaler"
    elif ceiling is not None:
        problem += "; its autoscaler cannot add that many"
    raise ConfigError(problem)


def _wait_for_nodes(run: RunConfig, extra_cpus: Mapping[str, float]) -> str | None:
    """Ask the autoscaler for the run's bundles and wait for them; the shortfall left at the deadline."""
    from ray.autoscaler.sdk import request_resources

    worker = {"CPU": run.cpus_per_worker, **({"GPU": 1.0} if run.use_gpu else {})}
    bundles = [dict(worker) for _ in range(run.num_workers)]
    if sum(extra_cpus.values()):
        bundles.append({"CPU": sum(extra_cpus.values())})
    log.warning("waiting up to %g s for the autoscaler to add nodes: %s", run.resource_wait_s,
                _current_shortfall(run, extra_cpus))
    deadline = time.monotonic() + run.resource_wait_s
    request_resources(bundles=bundles)
    try:
        problem = _current_shortfall(run, extra_cpus)
        while problem is not None and time.monotonic() < deadline:
            time.sleep(min(_RESOURCE_POLL_S, max(0.0, deadline - time.monotonic())))
            problem = _current_shortfall(run, extra_cpus)
        return problem
    finally:
        request_resources(bundles=[])  # the request persists otherwise, and would keep the nodes forever


def lasting_error(error: BaseException) -> ValueError | None:
    """The ValueError inside a worker's or a run's error (bad data, config or checkpoint), else None.

    Such an error comes back on every retry. Ray wraps it: a Ray Data task's failure as a RayTaskError
    (``cause``), a failed run as a WorkerGroupError (``worker_failures``) or ControllerError.
    """
    from ray.exceptions import RayError

    pending: list[Any] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ValueError) and not isinstance(current, RayError):
            return current
        failures = getattr(current, "worker_failures", None) or {}
        pending += [getattr(current, "cause", None), getattr(current, "controller_failure", None),
                    getattr(current, "_base_exc", None), current.__cause__, *(failures[r] for r in sorted(failures))]
    return None


class FailFast(ray.train.UserCallback):
    """Ends a run at its first lasting worker error (:func:`lasting_error`) instead of retrying it.

    Train's failure policy retries every worker error ``max_failures`` times, from the latest checkpoint;
    a ControllerError whose cause is not one of Train's own startup errors it never retries.
    """

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        for rank in sorted(worker_exceptions):
            error = lasting_error(worker_exceptions[rank])
            if error is not None:
                raise ray.train.ControllerError(error)


def train_run_config(run: RunConfig, name: str, callbacks: Sequence[Any] = ()) -> ray.train.RunConfig:
    """Ray Train's RunConfig of a run: storage, checkpoints kept, retries (none for lasting errors), and
    Ray Train's own logs at WARNING (at INFO every rank logs each report's whole metrics dict)."""
    return ray.train.RunConfig(
        name=name,
        storage_path=run.storage,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=run.keep_checkpoints),
        failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
        callbacks=[FailFast(), *callbacks],
        logging_config=ray.train.LoggingConfig(log_level="WARNING"),
    )


def fit(trainer: TorchTrainer) -> ray.train.Result:
    """``trainer.fit()``; a run ended by a lasting error raises that error itself (one line in the CLI)."""
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as err:
        error = lasting_error(err)
        if error is None:
            raise
        raise _own_message(error) from None


def _own_message(error: ValueError) -> ValueError:
    """``error`` with its own message only: Ray Data appends lines of retry advice to a failed read's error."""
    message = str(error).split("\n", 1)[0]
    try:
        return type(error)(message)
    except Exception:  # a constructor that wants more than a message
        return ValueError(message)


def _data_config() -> ray.train.DataConfig:
    """Train's default ingest options without ``exclude_resources``, whose mere mention Ray Data deprecates."""
    options = ray.data.DataContext.get_current().execution_options
    return ray.train.DataConfig(execution_options=ray.data.ExecutionOptions(
        resource_limits=options.resource_limits, preserve_order=options.preserve_order,
        verbose_progress=options.verbose_progress,
    ))


def build_trainer(config: PretrainConfig, source: DataSource, callbacks: Sequence[Any] = ()) -> TorchTrainer:
    """The TorchTrainer of a validated config; ``callbacks`` are Ray Train callbacks (Tune's reporter)."""
    run = config.run
    datasets = {}
    ray.data.DataContext.get_current().enable_progress_bars = False  # rank 0 logs one line per epoch
    if config.data.format != "ffcv":
        datasets["train"] = ray_dataset(config.data.path, config.data.split, config.model.targets,
                                        shuffle=True, seed=run.seed, include_id=False)
        datasets["train"].context.print_on_execution_start = False  # two lines per epoch otherwise
    name = run_name(config, source)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(config), "rows": source.rows, "norm_stats": norm_stats(source),
                           "run_name": name, "resume": plan_resume(run.storage, name)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=run.num_workers, use_gpu=run.use_gpu, resources_per_worker={"CPU": run.cpus_per_worker}
        ),
        run_config=train_run_config(run, name, callbacks),
        datasets=datasets,
        dataset_config=_data_config(),
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


def pretrain(config: PretrainConfig) -> ray.train.Result:
    """Validate, start (or join) Ray, and run the pretraining to completion."""
    source = describe_data(config)
    run_name(config, source)
    check_probe(config)
    ensure_ray()
    check_resources(config.run, data_cpus(config))
    return fit(build_trainer(config, source))
