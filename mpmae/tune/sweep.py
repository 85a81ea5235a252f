"""Ray Tune sweeps over pretraining runs, judged by a downstream probe score.

Each trial is a driver function that builds a :class:`~ray.train.torch.TorchTrainer` for its config; a
:class:`ProbeReportCallback` forwards the Train reports (every ``probe.every_epochs`` epochs, each with a
``probe_score``) to Tune, where Optuna suggests the next configs and ASHA stops poor trials early. A
sweep's folder ``<storage_path>/<name>`` holds Tune's state, ``sweep.yaml`` (the resolved sweep, so that
``--resume`` needs nothing else) and ``trials/<trial_id>``, each trial's Train run with its checkpoints.
A Train run resumes from its own latest checkpoint, so a restored or retried trial loses at most one
probe interval. ``storage_path`` may be a URI (``s3://bucket/sweeps``): Tune, Train and the summary
write there alike.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback

import mpmae.storage as storage
from mpmae.config import (
    ConfigError,
    PretrainConfig,
    SweepConfig,
    check_name,
    check_store,
    from_dict,
    read_config_file,
    to_dict,
)
from mpmae.runtime.instance import ensure_ray
from mpmae.tracking import Tracker, TrackingError, open_run
from mpmae.tune.plan import METRIC, SWEEP_FILE, TIME_ATTR, TRIALS_DIR, Sweep, yaml_ready
from mpmae.tune.space import apply_params, candidate_configs, parse_search_space
from mpmae.tune.summary import summarize

log = logging.getLogger(__name__)

#: CPUs of a trial's driver function: next to none (the Train workers hold the trial's resources), and Tune
#: refuses an empty request.
TRIAL_CPUS = 0.01


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _base_config(config: SweepConfig) -> dict[str, Any]:
    try:
        data = read_config_file(config.base)
    except ConfigError as err:
        raise ConfigError(f"base: {err}") from None
    base = from_dict(PretrainConfig, _merge(data, config.pretrain))
    base.validate()
    if base.probe.task is None:
        raise ConfigError("pretrain.probe.task: a sweep ranks trials by their probe score; name the probe task")
    # absolute paths (URIs as they are): Tune runs each trial in its own working directory
    base.data.path = storage.absolute(base.data.path)
    base.tracking = config.tracking  # the trials track as the sweep does
    for key in ("data", "geobench_dir"):
        if getattr(base.probe, key) is not None:
            setattr(base.probe, key, storage.absolute(getattr(base.probe, key)))
    return to_dict(base)


def prepare_sweep(config: SweepConfig, base: dict[str, Any] | None = None) -> Sweep:
    """Check everything a trial needs before any trial starts: config, search space, data, probe task."""
    from mpmae.train.trainer import check_probe, describe_data

    base = _base_config(config) if base is None else base
    space = parse_search_space(config.search, from_dict(PretrainConfig, base))
    candidates = candidate_configs(base, space)
    checked: list[Any] = []
    for candidate in candidates:
        if candidate.model.targets not in checked:  # the data must hold every candidate's targets
            describe_data(candidate)
            checked.append(candidate.model.targets)
    check_probe(candidates[0])
    sweep = Sweep(config, base, space)
    if config.scheduler.type == "asha" and config.scheduler.grace_period > sweep.epochs:
        raise ConfigError(f"scheduler.grace_period: {config.scheduler.grace_period} exceeds the trials' "
                          f"optim.epochs {sweep.epochs}")
    return sweep


def run_trial(params: dict[str, Any], base: dict[str, Any], trials_dir: str, tracking: dict[str, Any]) -> None:
    """The Tune driver function of one trial: a pretraining run of ``base`` with the trial's ``params``,
    tracked (when the sweep is) in a run nested under the sweep's."""
    from mpmae.train.trainer import build_trainer, describe_data, fit_tracked, open_tracking

    data = apply_params(base, params)
    data["run"].update(name=ray.tune.get_context().get_trial_id(), storage_path=trials_dir)
    config = from_dict(PretrainConfig, data)
    config.validate()
    assert config.run.name is not None  # the trial id, set above
    finished = _finished_run_metrics(storage.join(trials_dir, config.run.name), config.optim.epochs)
    if finished is not None:  # restored after its last checkpoint: Train would report nothing
        ray.tune.report(finished)
        return
    try:
        spec = open_tracking(config, config.run.name, parent=tracking)
    except TrackingError as err:  # the server went away mid-sweep: the trial trains on untracked
        log.warning("trial %s is not tracked in MLflow: %s", config.run.name, err)
        config.tracking.mlflow = False
        spec = open_tracking(config, config.run.name)
    trainer = build_trainer(config, describe_data(config), callbacks=[ProbeReportCallback()], tracking=spec)
    fit_tracked(trainer, config, config.run.name, spec)


class ProbeReportCallback(TuneReportCallback):
    """Tune's report callback for the reports that carry a probe score: a checkpoint inside an epoch (every
    ``run.checkpoint_every_steps``, or at a preemption notice) reports no score, and Tune's scheduler must
    not see a result without its metric."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and METRIC in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def _finished_run_metrics(run_folder: Path | str, epochs: int) -> dict[str, Any] | None:
    """The last report of a Train run (a folder or a URI) that already checkpointed its final epoch, else None."""
    from mpmae.checkpoint import newest_checkpoint

    if storage.is_uri(run_folder):
        payload = _stored_final_payload(str(run_folder), epochs)
    else:
        found = newest_checkpoint(run_folder) if Path(run_folder).is_dir() else None
        payload = None if found is None else found[1]
    if payload is None:  # none, or none complete: Train resumes (or refuses, naming the files) as it would
        return None
    history = payload.get("history") or []
    return dict(history[-1]) if history and payload["epoch"] >= epochs else None


def _stored_final_payload(run: str, epochs: int) -> dict[str, Any] | None:
    """The payload of a run URI's newest complete checkpoint when its marker says it ends the run (only
    then is ``state.pt`` downloaded), else None; one that does not load is left to Train to refuse."""
    from mpmae.checkpoint import COMPLETE_FILE, CheckpointError, find_checkpoint, newest_stored_checkpoint
    from mpmae.export import fetched

    folder = newest_stored_checkpoint(run)
    if folder is None:
        return None
    try:
        marker = json.loads(storage.read_bytes(storage.join(folder, COMPLETE_FILE), 64 * 1024))
    except (ValueError, FileNotFoundError):
        return None
    if isinstance(marker, dict) and isinstance(marker.get("epoch"), int) and marker["epoch"] < epochs:
        return None  # unfinished: Train resumes and reports the rest
    try:
        with fetched(folder) as local:
            return find_checkpoint(local)[1]
    except (CheckpointError, FileNotFoundError):
        return None


def _trainable(sweep: Sweep, tracking: dict[str, Any]) -> Any:
    """The driver function with its fixed arguments and its :data:`TRIAL_CPUS`."""
    fn = ray.tune.with_parameters(run_trial, base=sweep.base, trials_dir=storage.join(sweep.folder, TRIALS_DIR),
                                  tracking=tracking)
    return ray.tune.with_resources(fn, {"CPU": TRIAL_CPUS})


def _check_resources(sweep: Sweep) -> None:
    """Refuse a sweep whose trials cannot start on this cluster (one trial's request; more run when they fit)."""
    from mpmae.runtime.instance import check_resources
    from mpmae.train.trainer import data_cpus

    config = from_dict(PretrainConfig, sweep.base)
    check_resources(config.run, {**data_cpus(config), "the trial's driver": TRIAL_CPUS})


def _search_alg(sweep: Sweep) -> Any:
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    alg = sweep.config.search_alg
    sampler = (optuna.samplers.TPESampler(seed=alg.seed) if alg.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=alg.seed))
    searcher = OptunaSearch(space=sweep.space.sample, metric=METRIC, mode="max", sampler=sampler)
    return ConcurrencyLimiter(searcher, max_concurrent=sweep.config.max_concurrent_trials)


def _scheduler(sweep: Sweep) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    scheduler = sweep.config.scheduler
    if scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=sweep.epochs, grace_period=scheduler.grace_period,
                         reduction_factor=scheduler.reduction_factor)


def build_tuner(sweep: Sweep, tracking: dict[str, Any]) -> ray.tune.Tuner:
    """The Tuner of a fresh sweep; ``tracking``: the sweep's tracking spec, which its trials nest under."""
    config = sweep.config
    return ray.tune.Tuner(
        _trainable(sweep, tracking),
        tune_config=ray.tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=_search_alg(sweep), scheduler=_scheduler(sweep),
            num_samples=config.num_samples,  # concurrency: the search algorithm's limiter
        ),
        run_config=ray.tune.RunConfig(
            name=config.name, storage_path=storage.parent_of(sweep.folder),
            failure_config=ray.tune.FailureConfig(max_failures=config.max_failures), verbose=1,
        ),
    )


def _write_sweep_file(sweep: Sweep) -> None:
    if not storage.is_uri(sweep.folder):
        Path(sweep.folder).mkdir(parents=True)  # refuses a folder made meanwhile
    content = {"sweep": to_dict(sweep.config), "base": sweep.base}
    text = yaml.safe_dump(yaml_ready(content), sort_keys=False)
    storage.write_bytes(storage.join(sweep.folder, SWEEP_FILE), text.encode())  # never overwritten


def load_sweep(folder: Path | str) -> Sweep:
    """The sweep saved in ``folder`` (a path or a URI; its ``sweep.yaml``), validated again."""
    folder = storage.absolute(folder)
    path = storage.join(folder, SWEEP_FILE)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path} not found: {folder} is not a sweep folder")
    content = yaml.safe_load(storage.read_bytes(path))
    config = from_dict(SweepConfig, content["sweep"])
    # The sweep is the folder it was found in, whatever name a (possibly planted) file gives.
    config.storage_path, config.name = storage.parent_of(folder), storage.name_of(folder)
    return prepare_sweep(config, content["base"])


def tune(config: SweepConfig) -> dict[str, Any]:
    """Run a new sweep to completion and write its summary (see :mod:`mpmae.tune.summary`)."""
    check_store(config.storage_path, "storage_path")  # a missing bucket: one line, before any trial
    sweep = prepare_sweep(config)
    if storage.exists(sweep.folder):
        raise FileExistsError(f"{sweep.folder} already exists; resume it with `mpmae tune --resume "
                              f"{config.name}` or choose another name")
    spec = _open_tracking(sweep)
    ensure_ray()
    _check_resources(sweep)
    _write_sweep_file(sweep)
    return _fit_tracked(sweep, build_tuner(sweep, spec), spec)


def resume(name: str, storage_path: str | Path = "runs") -> dict[str, Any]:
    """Continue an interrupted sweep in ``storage_path`` (a path or a URI): finished trials stay,
    unfinished and errored ones resume."""
    check_store(str(storage_path), "--storage-path")
    sweep = load_sweep(storage.join(storage.absolute(storage_path), check_name(name, "--resume")))
    spec = _open_tracking(sweep)
    ensure_ray()
    _check_resources(sweep)
    tuner = ray.tune.Tuner.restore(sweep.folder, trainable=_trainable(sweep, spec), resume_errored=True)
    return _fit_tracked(sweep, tuner, spec)


def _open_tracking(sweep: Sweep) -> dict[str, Any]:
    """The sweep's own tracked run (found again on resume), with the sweep config as params."""
    config = sweep.config
    return open_run(config.tracking, sweep.folder, config.name, to_dict(config), tags={"mpmae.kind": "sweep"})


def _fit_tracked(sweep: Sweep, tuner: ray.tune.Tuner, spec: dict[str, Any]) -> dict[str, Any]:
    """Run the sweep and summarise it; its tracked run ends as the sweep does."""
    tracker = Tracker(spec, tensorboard=False)
    try:
        results = tuner.fit()
    except BaseException as err:
        tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    return summarize(sweep, results, tracker)
