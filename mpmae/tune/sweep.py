"""Ray Tune sweeps over pretraining runs, judged by a downstream probe score.

Each trial is a driver function that builds a :class:`~ray.train.torch.TorchTrainer` for its config; a
:class:`TuneReportCallback` forwards the Train reports (every ``probe.every_epochs`` epochs, each with a
``probe_score``) to Tune, where Optuna suggests the next configs and ASHA stops poor trials early. A
sweep's folder ``<storage_path>/<name>`` holds Tune's state, ``sweep.yaml`` (the resolved sweep, so that
``--resume`` needs nothing else) and ``trials/<trial_id>``, each trial's Train run with its checkpoints.
A Train run resumes from its own latest checkpoint, so a restored or retried trial loses at most one
probe interval.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray
import ray.tune
import yaml
from ray.tune.integration.ray_train import TuneReportCallback

from mpmae.atomic import atomic_write_text
from mpmae.config import ConfigError, PretrainConfig, SweepConfig, check_name, from_dict, read_config_file, to_dict
from mpmae.runtime.instance import ensure_ray
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
    # absolute paths: Tune runs each trial in its own working directory
    base.data.path = str(Path(base.data.path).resolve())
    for key in ("data", "geobench_dir"):
        if getattr(base.probe, key) is not None:
            setattr(base.probe, key, str(Path(getattr(base.probe, key)).resolve()))
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


def run_trial(params: dict[str, Any], base: dict[str, Any], trials_dir: str) -> None:
    """The Tune driver function of one trial: a pretraining run of ``base`` with the trial's ``params``."""
    from mpmae.runtime.run import fit
    from mpmae.train.trainer import build_trainer, describe_data

    data = apply_params(base, params)
    data["run"].update(name=ray.tune.get_context().get_trial_id(), storage_path=trials_dir)
    config = from_dict(PretrainConfig, data)
    config.validate()
    assert config.run.name is not None  # the trial id, set above
    finished = _finished_run_metrics(Path(trials_dir) / config.run.name, config.optim.epochs)
    if finished is not None:  # restored after its last checkpoint: Train would report nothing
        ray.tune.report(finished)
        return
    fit(build_trainer(config, describe_data(config), callbacks=[TuneReportCallback()]))


def _finished_run_metrics(run_folder: Path, epochs: int) -> dict[str, Any] | None:
    """The last report of a Train run that already checkpointed its final epoch, else None."""
    from mpmae.checkpoint import newest_checkpoint

    found = newest_checkpoint(run_folder) if run_folder.is_dir() else None
    if found is None:  # none, or none complete: Train resumes (or refuses, naming the files) as it would
        return None
    history = found[1].get("history") or []
    return dict(history[-1]) if history and found[1]["epoch"] >= epochs else None


def _trainable(sweep: Sweep) -> Any:
    """The driver function with its fixed arguments and its :data:`TRIAL_CPUS`."""
    fn = ray.tune.with_parameters(run_trial, base=sweep.base, trials_dir=str(sweep.folder / TRIALS_DIR))
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


def build_tuner(sweep: Sweep) -> ray.tune.Tuner:
    """The Tuner of a fresh sweep."""
    config = sweep.config
    return ray.tune.Tuner(
        _trainable(sweep),
        tune_config=ray.tune.TuneConfig(
            metric=METRIC, mode="max", search_alg=_search_alg(sweep), scheduler=_scheduler(sweep),
            num_samples=config.num_samples,  # concurrency: the search algorithm's limiter
        ),
        run_config=ray.tune.RunConfig(
            name=config.name, storage_path=str(sweep.folder.parent),
            failure_config=ray.tune.FailureConfig(max_failures=config.max_failures), verbose=1,
        ),
    )


def _write_sweep_file(sweep: Sweep) -> None:
    sweep.folder.mkdir(parents=True)
    content = {"sweep": to_dict(sweep.config), "base": sweep.base}
    atomic_write_text(sweep.folder / SWEEP_FILE, yaml.safe_dump(yaml_ready(content), sort_keys=False))


def load_sweep(folder: Path) -> Sweep:
    """The sweep saved in ``folder`` (its ``sweep.yaml``), validated again."""
    path = folder / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a sweep folder")
    content = yaml.safe_load(path.read_text())
    config = from_dict(SweepConfig, content["sweep"])
    # The sweep is the folder it was found in, whatever name a (possibly planted) file gives.
    config.storage_path, config.name = str(folder.parent), folder.name
    return prepare_sweep(config, content["base"])


def tune(config: SweepConfig) -> dict[str, Any]:
    """Run a new sweep to completion and write its summary (see :mod:`mpmae.tune.summary`)."""
    sweep = prepare_sweep(config)
    if sweep.folder.exists():
        raise FileExistsError(f"{sweep.folder} already exists; resume it with `mpmae tune --resume "
                              f"{config.name}` or choose another name")
    ensure_ray()
    _check_resources(sweep)
    _write_sweep_file(sweep)
    return summarize(sweep, build_tuner(sweep).fit())


def resume(name: str, storage_path: str | Path = "runs") -> dict[str, Any]:
    """Continue an interrupted sweep: finished trials stay, unfinished and errored ones resume."""
    sweep = load_sweep(Path(storage_path).resolve() / check_name(name, "--resume"))
    ensure_ray()
    _check_resources(sweep)
    tuner = ray.tune.Tuner.restore(str(sweep.folder), trainable=_trainable(sweep), resume_errored=True)
    return summarize(sweep, tuner.fit())
