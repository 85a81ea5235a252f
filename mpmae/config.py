"""Typed configuration: dataclasses loaded from YAML with ``key=value`` overrides, validated up front.

Every error names the key's full path (``optim.blr``) and what was expected, and is raised before any Ray
worker starts, so a typo never costs a cluster start-up.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration key, value or combination is invalid; the message starts with the key's path."""


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, checking every key and type."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(f"{path}{key}: unknown key; valid keys here: {names}")
    values = {name: _coerce(data[name], hints[name], f"{path}{name}") for name in names if name in data}
    return cls(**values)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, f"{path}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {list(args)}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], path)
        errors = []
        for option in options:
            try:
                return _coerce(value, option, path)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{path}: {value!r} matches none of the allowed types ({'; '.join(errors)})")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return origin(_coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        key_type, value_type = args or (Any, Any)
        return {_coerce(k, key_type, path): _coerce(v, value_type, f"{path}.{k}") for k, v in value.items()}
    return _coerce_scalar(value, tp, path)


def _coerce_scalar(value: Any, tp: Any, path: str) -> Any:
    if tp is Any:
        return value
    if tp is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads "1e-4" without a dot as a string
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (str, bool) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict, in place."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"{override!r}: overrides look like section.key=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def read_config_file(path: Path | str) -> dict[str, Any]:
    """The mapping in a YAML config file (empty for an empty file), with an error naming the file."""
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the config ({err})") from None


def load_config(cls: type[T], path: Path | str | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from an optional YAML file plus overrides, then run its ``validate()`` if any."""
    data = read_config_file(path) if path is not None else {}
    config = from_dict(cls, apply_overrides(data, overrides))
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict of a config, ready for YAML or JSON."""
    return dataclasses.asdict(config)


# -- pretraining --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataConfig:
    """Where pretraining data come from and how samples are cut."""

    path: str = "runs/demo/data"
    format: Literal["mmearth", "parquet", "ffcv"] = "mmearth"
    split: str = "train"
    crop_size: int = 56
    loader_workers: int = 1


@dataclasses.dataclass
class ModelConfig:
    """The MP-MAE: encoder variant, patching, pretext tasks, decoder and loss aggregation (spec 2, 3)."""

    arch: str = "atto"
    patch_size: int = 8
    stem: Literal["modified", "original"] = "modified"
    targets: str | list[str] | dict[str, list[str]] = "all_mod"
    decoder: Literal["shared", "per_task"] = "shared"
    decoder_dim: int = 512
    decoder_depth: int = 1
    mask_ratio: float = 0.6
    norm_pix_loss: bool = True
    loss: Literal["uncertainty", "unweighted", "weighted"] = "uncertainty"
    task_weights: dict[str, float] | None = None


@dataclasses.dataclass
class OptimConfig:
    """The recipe of spec 4: AdamW, lr = blr x effective batch / 256, warmup then cosine."""

    batch_size: int = 256
    accum_steps: int = 1
    blr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: int = 200
    warmup_epochs: int = 40
    clip_grad: float | None = None

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accum_steps

    @property
    def lr(self) -> float:
        return self.blr * self.effective_batch / 256


@dataclasses.dataclass
class RunConfig:
    """Where and how a run executes: Ray resources, storage, checkpoints, failures, logging."""

    name: str | None = None
    storage_path: str = "runs"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    bf16: bool = True
    seed: int = 0
    keep_checkpoints: int = 3
    max_failures: int = 2
    max_nonfinite_steps: int = 10
    log_every_steps: int = 20

    @property
    def storage(self) -> str:
        """Where Ray Train writes runs: a URI (``s3://``, ``gs://``) as is, a local path made absolute."""
        return self.storage_path if is_uri(self.storage_path) else str(Path(self.storage_path).resolve())


def is_uri(path: str) -> bool:
    """Whether ``path`` names cloud storage (``s3://bucket/prefix``) rather than a filesystem path."""
    return "://" in path


@dataclasses.dataclass
class ProbeConfig:
    """A linear probe of the encoder every ``every_epochs`` epochs, reported as ``probe_score``.

    Ray Tune optimises this score: the pretraining loss is not comparable across mask ratios or loss
    weights. ``task`` is ``land_cover`` (held out of the MMEarth folder ``data``, default ``data.path``)
    or a GEO-Bench task under ``geobench_dir``; null turns probing off.
    """

    task: str | None = None
    every_epochs: int = 1
    data: str | None = None
    geobench_dir: str | None = None
    epochs: int = 100

    def due(self, epochs_done: int, total_epochs: int) -> bool:
        """Whether a probe runs after ``epochs_done`` epochs (always after the last one)."""
        return self.task is not None and (epochs_done % self.every_epochs == 0 or epochs_done == total_epochs)


@dataclasses.dataclass
class PretrainConfig:
    """A whole pretraining run (``configs/*.yaml``)."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)

    def validate(self) -> None:
        """Cross-field checks that need no data; :func:`mpmae.train.trainer.check_data` does the rest."""
        from mpmae.modalities import resolve_selection, tasks_of
        from mpmae.models.convnextv2 import VARIANTS

        model, optim, run, data = self.model, self.optim, self.run, self.data
        if model.arch not in VARIANTS:
            raise ConfigError(f"model.arch: {model.arch!r} is not one of {sorted(VARIANTS)}")
        if model.patch_size not in (8, 16, 32):
            raise ConfigError(f"model.patch_size: {model.patch_size} is not one of [8, 16, 32]")
        if data.crop_size % model.patch_size:
            raise ConfigError(
                f"data.crop_size: {data.crop_size} is not divisible by model.patch_size {model.patch_size}"
            )
        if not 0.0 < model.mask_ratio < 1.0:
            raise ConfigError(f"model.mask_ratio: {model.mask_ratio} must lie strictly between 0 and 1")
        try:
            selection = resolve_selection(model.targets)
        except ValueError as err:
            raise ConfigError(f"model.targets: {err}") from None
        if "sentinel2" not in selection:
            raise ConfigError("model.targets: must include sentinel2, the encoder input")
        _check_task_weights(model, tasks_of(selection))
        if optim.batch_size % run.num_workers:
            raise ConfigError(
                f"optim.batch_size: {optim.batch_size} is not divisible by run.num_workers {run.num_workers}"
            )
        for key in ("batch_size", "accum_steps", "epochs"):
            if getattr(optim, key) < 1:
                raise ConfigError(f"optim.{key}: must be at least 1")
        if not 0 <= optim.warmup_epochs <= optim.epochs:
            raise ConfigError(f"optim.warmup_epochs: {optim.warmup_epochs} must lie in [0, optim.epochs]")
        if run.num_workers < 1 or run.cpus_per_worker <= 0:
            raise ConfigError("run.num_workers and run.cpus_per_worker must be positive")
        _check_probe(self.probe, data)


def _check_probe(probe: ProbeConfig, data: DataConfig) -> None:
    if probe.task is None:
        return
    if probe.every_epochs < 1 or probe.epochs < 1:
        raise ConfigError("probe.every_epochs and probe.epochs must be at least 1")
    if probe.task == "land_cover":
        if probe.data is None and data.format != "mmearth":
            raise ConfigError("probe.data: the land_cover probe needs an MMEarth folder when data.format is "
                              f"{data.format!r}")
        return
    from mpmae.data.geobench import get_task

    try:
        kind = get_task(probe.task).kind
    except ValueError as err:
        raise ConfigError(f"probe.task: {err} (or land_cover)") from None
    if kind == "segmentation":
        raise ConfigError(f"probe.task: {probe.task!r} is a segmentation task; a linear probe needs classification")


def _check_task_weights(model: ModelConfig, tasks: list[str]) -> None:
    if model.loss != "weighted":
        if model.task_weights is not None:
            raise ConfigError(f"model.task_weights: only used with model.loss 'weighted', not {model.loss!r}")
        return
    weights = model.task_weights or {}
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise ConfigError(f"model.task_weights: {unknown} are not pretext tasks of model.targets {tasks}")
    negative = sorted(t for t, w in weights.items() if w < 0)
    if negative:
        raise ConfigError(f"model.task_weights: weights of {negative} are negative")


# -- evaluation ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneRunConfig:
    """A GEO-Bench evaluation run (spec 5): linear probe or fine-tune, U-Net for segmentation tasks.

    ``encoder`` is an `mpmae export` folder, a pretraining checkpoint or run folder, or null for a
    randomly initialised ``arch`` / ``patch_size`` encoder. lr = blr x batch_size / 256.
    """

    task: str = "m-bigearthnet"
    geobench_dir: str | None = None
    partition: str = "default"
    encoder: str | None = None
    arch: str = "atto"
    patch_size: int = 8
    mode: Literal["finetune", "linear_probe"] = "finetune"
    epochs: int = 100
    batch_size: int = 64
    blr: float = 2e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 0
    weight_decay: float = 0.3
    layer_decay: float = 0.9
    drop_path: float = 0.1
    smoothing: float = 0.2
    freeze_epochs: int = 0
    select: Literal["last", "best_val"] = "last"
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(num_workers=1))

    @property
    def lr(self) -> float:
        return self.blr * self.batch_size / 256

    def validate(self) -> None:
        from mpmae.data.geobench import get_task

        try:
            get_task(self.task)
        except ValueError as err:
            raise ConfigError(f"task: {err}") from None
        if self.batch_size % self.run.num_workers:
            raise ConfigError(
                f"batch_size: {self.batch_size} is not divisible by run.num_workers {self.run.num_workers}"
            )
        if self.epochs < 1 or not 0 <= self.freeze_epochs <= self.epochs:
            raise ConfigError("epochs: must be >= 1, and freeze_epochs must lie in [0, epochs]")
        if not 0.0 <= self.smoothing < 1.0:
            raise ConfigError(f"smoothing: {self.smoothing} must lie in [0, 1)")


# -- Ray Tune sweeps ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchAlgConfig:
    """Optuna's sampler: TPE, or random for a baseline."""

    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0


@dataclasses.dataclass
class SchedulerConfig:
    """ASHA early stopping on the probe score (rungs in epochs up to the base config's ``optim.epochs``),
    or ``fifo`` to run every trial to the end."""

    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclasses.dataclass
class SweepConfig:
    """A Ray Tune sweep (``configs/tune_*.yaml``): trials are pretraining runs of ``base`` with ``pretrain``
    merged over it and the searched values of ``search`` on top, judged by their probe score.

    ``max_concurrent_trials`` is also Optuna's concurrency limit: it suggests a config only when a trial
    can start, so each suggestion learns from every finished trial."""

    name: str = "tune"
    storage_path: str = "runs"
    base: str = "configs/demo.yaml"
    pretrain: dict[str, Any] = dataclasses.field(default_factory=dict)
    search: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_samples: int = 8
    max_concurrent_trials: int = 2
    max_failures: int = 1
    search_alg: SearchAlgConfig = dataclasses.field(default_factory=SearchAlgConfig)
    scheduler: SchedulerConfig = dataclasses.field(default_factory=SchedulerConfig)

    def validate(self) -> None:
        for key in ("num_samples", "max_concurrent_trials"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be at least 1")
        if self.scheduler.grace_period < 1 or self.scheduler.reduction_factor <= 1:
            raise ConfigError("scheduler: grace_period must be >= 1 and reduction_factor > 1")
        if self.max_failures < 0:
            raise ConfigError("max_failures: must be >= 0")
        if not self.search:
            raise ConfigError("search: the search space is empty")
        if is_uri(self.storage_path):
            raise ConfigError(f"storage_path: {self.storage_path} is a URI; a sweep writes its tables and exports "
                              "to a filesystem path (on a cluster: a shared mount such as EFS or Filestore)")
