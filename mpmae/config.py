"""Typed configuration: dataclasses loaded from YAML with ``key=value`` overrides, validated up front.

Every error names the key's full path (``optim.blr``) and what was expected, and is raised before any Ray
worker starts, so a typo never costs a cluster start-up.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml

from mpmae.architectures import VARIANTS, ConvNeXtSpec
from mpmae.modalities import resolve_selection, tasks_of
from mpmae.storage import StorageError, StoreUnavailableError, check_reachable, is_uri
from mpmae.tasks import LAND_COVER, PARTITIONS, get_task

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A configuration key, value or combination is invalid; the message starts with the key's path."""


# -- names, ranges and storage ------------------------------------------------------------------------------

MAX_NAME = 128
_SAFE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._=+-]{{0,{MAX_NAME - 1}}}")
_SAFE_NAME_PART = re.compile(r"[A-Za-z0-9._=+-]{0,64}")


def check_name(value: str, key: str) -> str:
    """``value`` if it is safe as one folder name under a storage path, else a ConfigError naming ``key``.

    Run, sweep and trial names are joined to a storage folder: ``../x`` or ``/etc/cron.d`` would write
    elsewhere, a leading dot would hide the folder. Ray Tune's trial ids (``1a2b3_00000``) pass.
    """
    if ".." in value or not _SAFE_NAME.fullmatch(value):
        raise ConfigError(f"{key}: {_shown(value)} is not a safe name: use letters, digits and ._=+- "
                          f"(a letter or digit first, no '..'), at most {MAX_NAME} characters")
    return value


def _check_default_name_part(part: str, key: str) -> None:
    """Default run names embed the name of a folder the user chose (data, encoder): it must keep them safe."""
    if ".." in part or not _SAFE_NAME_PART.fullmatch(part):
        raise ConfigError(f"{key}: the folder name {_shown(part)} goes into the default run name and would make "
                          "it unsafe (letters, digits and ._=+- only, no '..', at most 64 characters); set run.name")


def _shown(value: str, limit: int = 60) -> str:
    """A bounded repr for error messages."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


@dataclasses.dataclass(frozen=True)
class Interval:
    """The valid values of a numeric key; non-finite values are never inside."""

    low: float = -math.inf
    high: float = math.inf
    open_low: bool = False
    open_high: bool = False

    def __contains__(self, value: float) -> bool:
        above = self.low < value if self.open_low else self.low <= value
        below = value < self.high if self.open_high else value <= self.high
        return math.isfinite(value) and above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"must be {'>' if self.open_low else '>='} {self.low:g}"
        return (f"must lie in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.open_high else ']'}")


POSITIVE = Interval(0.0, open_low=True)
NON_NEGATIVE = Interval(0.0)
AT_LEAST_1 = Interval(1.0)
FRACTION = Interval(0.0, 1.0, open_high=True)  # [0, 1)


def _check_ranges(section: Any, prefix: str, ranges: Mapping[str, Interval]) -> None:
    """Every key of ``ranges`` in ``section`` (None: unset, skipped) lies in its interval."""
    for key, interval in ranges.items():
        value = getattr(section, key)
        if value is not None and value not in interval:
            raise ConfigError(f"{prefix}{key}: {value!r} {interval}")


def check_storage(path: str, key: str) -> None:
    """A local storage path is a folder, or can become one, that this process may write; a URI has the
    form ``scheme://bucket/...`` (whether the store answers is :func:`check_store`'s, before Ray starts).

    Checked before Ray starts: Ray would otherwise fail in its workers with a long ``NotADirectoryError``.
    """
    if is_uri(path):
        parts = urlsplit(path)
        if not (parts.scheme and parts.netloc):
            raise ConfigError(f"{key}: {path} is not a URI of the form scheme://bucket/path")
        return
    folder = Path(path).resolve()
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"lies under {existing}, which is a file"
        raise ConfigError(f"{key}: {path} {where}; expected a folder (or a path where one can be made)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path}: {existing} is not writable by this user")


def check_store(path: str, key: str) -> None:
    """For a URI, that the bucket exists and the environment's credentials may list it (one line naming ``key``
    and the URI otherwise); run where a command starts, before any worker. Local paths pass."""
    try:
        check_reachable(path, key)
    except (StorageError, StoreUnavailableError) as err:
        raise ConfigError(str(err) if isinstance(err, StorageError) else f"{key}: {err}") from None


def from_dict(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, checking every key and type."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    renamed = RENAMED_KEYS.get(cls, {})
    for key in data:
        if key in renamed and key not in names:
            raise ConfigError(f"{path}{key}: renamed to {path}{renamed[key]}")
        if key not in names:
            raise ConfigError(f"{path}{key}: unknown key; valid keys here: {names}")
    values = {name: _coerce(data[name], hints[name], f"{path}{name}") for name in names if name in data}
    return cls(**values)


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
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
    """Apply ``a.b=value`` overrides (values parsed as plain YAML: no tags) to a nested dict, in place."""
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"{_shown(override)}: overrides look like section.key=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            if node.get(part) is None:  # a section left empty in the YAML file reads as null
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"{key}: the override's value {_shown(raw)} is not plain YAML "
                              f"({_yaml_problem(err)})") from None
    return data


def read_config_file(path: Path | str) -> dict[str, Any]:
    """The mapping in a YAML config file (empty for an empty file), with an error naming the file."""
    try:
        content = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: cannot read the config ({_yaml_problem(err)})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(content).__name__}")
    return content


def _yaml_problem(err: yaml.YAMLError) -> str:
    """A YAML error on one line: what went wrong and where (PyYAML's own text spans several lines)."""
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem is None:
        return " ".join(str(err).split())
    return problem if mark is None else f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


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
    #: Ray Data feed: rows mixed across blocks in a local shuffle buffer of this many per-worker batches (0: off).
    shuffle_buffer_batches: int = 4
    #: Ray Data feed: batches decoded (and copied to the GPU) ahead of the step in background threads.
    prefetch_batches: int = 2


@dataclasses.dataclass
class ModelConfig:
    """The MP-MAE: encoder variant, patching, pretext tasks, decoder and loss aggregation (docs/method.md)."""

    #: A variant name; a `ConvNeXtSpec` only in hand-built configs (validation accepts names).
    arch: str | ConvNeXtSpec = "atto"
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
    #: "reference": the upstream code's conventions (padding, masking, GRN eps), for its golden outputs.
    architecture: Literal["default", "reference"] = "default"
    #: Stochastic depth of the pretraining encoder, rising linearly over its blocks to this rate.
    drop_path: float = 0.0


@dataclasses.dataclass
class OptimConfig:
    """The pretraining recipe (docs/method.md): AdamW, lr = blr x effective batch / 256, warmup then cosine."""

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
    #: Compile the model with torch.compile in every worker: a minute or more of start-up for faster steps.
    compile: bool = False
    seed: int = 0
    keep_checkpoints: int = 3
    max_failures: int = 2
    max_nonfinite_steps: int = 10
    log_every_steps: int = 20
    #: On a cluster that can add nodes, how long the driver waits for the resources a run asks for.
    resource_wait_s: float = 600.0
    #: Elastic training: the fewest workers the run goes on with (``num_workers`` is the most); None: fixed.
    min_workers: int | None = None
    #: Also checkpoint every this many optimizer steps inside an epoch (None: at epoch ends only).
    checkpoint_every_steps: int | None = None
    #: Upload checkpoints in the background (Ray Train's ASYNC mode), so that the step loop does not wait.
    async_upload: bool = True
    #: Preemptions (spot reclaims, drained nodes) the run resumes from, counted apart from ``max_failures``.
    max_preemptions: int = 10
    #: How often (optimizer steps) the workers ask Ray for a preemption notice (a barrier of all ranks).
    preemption_check_steps: int = 5
    #: How Ray places the workers' bundles on nodes: PACK, SPREAD or STRICT_SPREAD (one per node).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_SPREAD"] = "PACK"
    #: Custom Ray resources each worker asks for beside its CPUs/GPU (e.g. a node type's label).
    worker_resources: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def storage(self) -> str:
        """Where Ray Train writes runs: a URI (``s3://``, ``gs://``) as is, a local path made absolute."""
        return self.storage_path if is_uri(self.storage_path) else str(Path(self.storage_path).resolve())

    @property
    def worker_counts(self) -> range:
        """Every worker count the run may have: ``num_workers`` alone, or the elastic range."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)


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
class TrackingConfig:
    """Experiment tracking (:mod:`mpmae.tracking`): an MLflow run on the server in ``MLFLOW_TRACKING_URI``,
    TensorBoard event files under the run folder (or its bucket prefix), or both."""

    mlflow: bool = False
    tensorboard: bool = False
    #: The MLflow experiment; unset: ``MLFLOW_EXPERIMENT_NAME``, else ``mpmae``.
    experiment: str | None = None


@dataclasses.dataclass
class PretrainConfig:
    """A whole pretraining run (``configs/*.yaml``)."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    probe: ProbeConfig = dataclasses.field(default_factory=ProbeConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def validate(self) -> None:
        """Cross-field checks that need no data; :func:`mpmae.train.trainer.check_data` does the rest.

        Ranges come first, so that no later check divides by a zero or compares a NaN.
        """
        model, optim, run, data = self.model, self.optim, self.run, self.data
        _check_ranges(data, "data.", {"crop_size": AT_LEAST_1, "loader_workers": NON_NEGATIVE})
        _check_ranges(self.probe, "probe.", {"every_epochs": AT_LEAST_1, "epochs": AT_LEAST_1})
        _check_optim(optim)
        _check_run(run, Path(data.path).name, "data.path")
        _check_model(model, data)
        uneven = [n for n in run.worker_counts if optim.batch_size % n]
        if uneven:
            counts = (f"run.num_workers {run.num_workers}" if run.min_workers is None else
                      f"{uneven[0]} workers (any count in run.min_workers..run.num_workers keeps the global batch)")
            raise ConfigError(f"optim.batch_size: {optim.batch_size} is not divisible by {counts}")
        _check_probe(self.probe, data)
        check_storage(run.storage_path, "run.storage_path")


_OPTIM_RANGES = {"batch_size": AT_LEAST_1, "accum_steps": AT_LEAST_1, "epochs": AT_LEAST_1, "blr": POSITIVE,
                 "min_lr": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "clip_grad": POSITIVE}
_RUN_RANGES = {"num_workers": AT_LEAST_1, "cpus_per_worker": POSITIVE, "seed": NON_NEGATIVE,
               "keep_checkpoints": AT_LEAST_1, "max_failures": NON_NEGATIVE, "max_nonfinite_steps": NON_NEGATIVE,
               "log_every_steps": AT_LEAST_1, "resource_wait_s": NON_NEGATIVE, "min_workers": AT_LEAST_1,
               "checkpoint_every_steps": AT_LEAST_1, "max_preemptions": NON_NEGATIVE,
               "preemption_check_steps": AT_LEAST_1}


def _check_optim(optim: OptimConfig) -> None:
    _check_ranges(optim, "optim.", _OPTIM_RANGES)
    if len(optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two values (AdamW's beta1, beta2), got {len(optim.betas)}")
    for i, beta in enumerate(optim.betas):
        if beta not in FRACTION:
            raise ConfigError(f"optim.betas[{i}]: {beta!r} {FRACTION}")
    if not 0 <= optim.warmup_epochs <= optim.epochs:
        raise ConfigError(f"optim.warmup_epochs: {optim.warmup_epochs} must lie in [0, optim.epochs]")
    _check_min_lr(optim.min_lr, optim.lr, "optim.")


def _check_min_lr(min_lr: float, lr: float, prefix: str) -> None:
    if min_lr > lr:
        raise ConfigError(f"{prefix}min_lr: {min_lr:g} exceeds the peak learning rate {lr:g} (from {prefix}blr): "
                          "the cosine schedule would rise")


def _check_run(run: RunConfig, default_part: str, default_key: str) -> None:
    """Ranges and the run name; ``default_part`` is the user's folder name a default run name would embed."""
    _check_ranges(run, "run.", _RUN_RANGES)
    if run.min_workers is not None and run.min_workers > run.num_workers:
        raise ConfigError(f"run.min_workers: {run.min_workers} exceeds run.num_workers {run.num_workers} (the most)")
    for resource, amount in run.worker_resources.items():
        if not (isinstance(amount, int | float) and amount > 0):
            raise ConfigError(f"run.worker_resources.{resource}: {amount!r} is not a positive number")
    if run.name is not None:
        check_name(run.name, "run.name")
    else:
        _check_default_name_part(default_part, default_key)


def _check_model(model: ModelConfig, data: DataConfig) -> None:
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
    # depth 0: the heads read the projected encoder features directly
    _check_ranges(model, "model.", {"decoder_dim": AT_LEAST_1, "decoder_depth": NON_NEGATIVE, "drop_path": FRACTION})
    try:
        selection = resolve_selection(model.targets)
    except ValueError as err:
        raise ConfigError(f"model.targets: {err}") from None
    if "sentinel2" not in selection:
        raise ConfigError("model.targets: must include sentinel2, the encoder input")
    check_task_weights(model.loss, model.task_weights, tasks_of(selection))


def _check_probe(probe: ProbeConfig, data: DataConfig) -> None:
    if probe.task is None:
        return
    if probe.task == "land_cover":
        if probe.data is None and data.format != "mmearth":
            raise ConfigError("probe.data: the land_cover probe needs an MMEarth folder when data.format is "
                              f"{data.format!r}")
        return
    try:
        kind = get_task(probe.task).kind
    except ValueError as err:
        raise ConfigError(f"probe.task: {err} (or land_cover)") from None
    if kind == "segmentation":
        raise ConfigError(f"probe.task: {probe.task!r} is a segmentation task; a linear probe needs classification")


def check_task_weights(
    loss: str, task_weights: Mapping[str, float] | None, tasks: Sequence[str], required: bool = False
) -> None:
    """The one check of ``model.task_weights`` against ``model.loss`` and the pretext ``tasks``.

    Config validation and the loss aggregator (hand-built configs skip validation) both call it;
    ``required``: the aggregator needs the mapping itself, validation lets ``weighted`` leave it unset.
    """
    if loss != "weighted":
        if task_weights is not None:
            raise ConfigError(f"model.task_weights: only used with model.loss 'weighted', not {loss!r}")
        return
    if task_weights is None and required:
        raise ConfigError("model.task_weights: loss aggregation 'weighted' needs task_weights")
    weights = task_weights or {}
    unknown = sorted(set(weights) - set(tasks))
    if unknown:
        raise ConfigError(f"model.task_weights: {unknown} are not pretext tasks of model.targets {tasks}")
    negative = sorted(t for t, w in weights.items() if w not in NON_NEGATIVE)
    if negative:
        raise ConfigError(f"model.task_weights: weights of {negative} are negative or not finite")


# -- evaluation ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneConfig:
    """A GEO-Bench evaluation run (docs/method.md): linear probe or fine-tune, U-Net for segmentation tasks.

    ``encoder`` is an `mpmae export` folder, a pretraining checkpoint or run folder, a checkpoint file of the
    original MMEarth project (each a path or a URI), or null for a randomly initialised ``arch`` /
    ``patch_size`` encoder; ``run.storage_path`` may be a URI.
    lr = blr x batch_size / 256. The same object drives :class:`mpmae.finetune.finetune.Finetuner`, which
    takes the task's kind and classes beside it.
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
    #: Checkpoint every this many epochs (and at the end); the epochs between report their metrics only.
    checkpoint_every: int = 1
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(num_workers=1))
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    @property
    def lr(self) -> float:
        return self.blr * self.batch_size / 256

    @property
    def frozen_epochs(self) -> int:
        """Epochs with the encoder frozen: all of them for a linear probe, else ``freeze_epochs``."""
        return self.epochs if self.mode == "linear_probe" else self.freeze_epochs

    def validate(self) -> None:
        """Every key checked before Ray starts; the GEO-Bench files are checked by :func:`finetune`."""
        _check_ranges(self, "", _FINETUNE_RANGES)
        for key in ("warmup_epochs", "freeze_epochs"):
            if getattr(self, key) > self.epochs:
                raise ConfigError(f"{key}: {getattr(self, key)} must lie in [0, epochs {self.epochs}]")
        _check_min_lr(self.min_lr, self.lr, "")
        _check_run(self.run, "random" if self.encoder is None else Path(self.encoder).name, "encoder")
        try:
            get_task(self.task)
        except ValueError as err:
            raise ConfigError(f"task: {err}") from None
        if self.arch not in VARIANTS:
            raise ConfigError(f"arch: {self.arch!r} is not one of {sorted(VARIANTS)}")
        if self.patch_size not in (8, 16, 32):
            raise ConfigError(f"patch_size: {self.patch_size} is not one of [8, 16, 32]")
        if self.batch_size % self.run.num_workers:
            raise ConfigError(
                f"batch_size: {self.batch_size} is not divisible by run.num_workers {self.run.num_workers}"
            )
        check_storage(self.run.storage_path, "run.storage_path")


#: Keys that were renamed (old -> new), per config class: an old key's error names the new one.
RENAMED_KEYS: dict[type, dict[str, str]] = {
    # the model's library-level config had its own names before ModelConfig became the only one
    ModelConfig: {"selection": "targets", "loss_aggregation": "loss"},
    # the in-process fine-tuning recipe took an absolute lr; the one config takes blr (lr = blr x batch / 256)
    FinetuneConfig: {"lr": "blr", "drop_path_rate": "drop_path"},
}

_FINETUNE_RANGES = {"epochs": AT_LEAST_1, "batch_size": AT_LEAST_1, "blr": POSITIVE, "min_lr": NON_NEGATIVE,
                    "warmup_epochs": NON_NEGATIVE, "weight_decay": NON_NEGATIVE,
                    "layer_decay": Interval(0.0, 1.0, open_low=True), "drop_path": FRACTION, "smoothing": FRACTION,
                    "freeze_epochs": NON_NEGATIVE, "checkpoint_every": AT_LEAST_1}


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
    can start, so each suggestion learns from every finished trial. ``storage_path`` is a folder or a URI
    (``s3://bucket/sweeps``): the sweep's folder, its trials and its summary all go there."""

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
    #: The sweep's run and, nested under it, one per trial (the trials track as the sweep does).
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)

    def validate(self) -> None:
        check_name(self.name, "name")
        _check_ranges(self, "", {"num_samples": AT_LEAST_1, "max_concurrent_trials": AT_LEAST_1,
                                 "max_failures": NON_NEGATIVE})
        _check_ranges(self.search_alg, "search_alg.", {"seed": NON_NEGATIVE})
        _check_ranges(self.scheduler, "scheduler.", {"grace_period": AT_LEAST_1,
                                                     "reduction_factor": Interval(1.0, open_low=True)})
        if not self.search:
            raise ConfigError("search: the search space is empty")
        check_storage(self.storage_path, "storage_path")  # a folder, or a URI (its store: tune's check_store)


# -- benchmark suites ---------------------------------------------------------------------------------------

#: How a suite evaluates an encoder (see :class:`FinetuneConfig`'s ``mode``).
EvalMode = Literal["linear_probe", "finetune"]


@dataclasses.dataclass
class ProbeRecipe:
    """A classification task's linear probe: a head trained on the frozen encoder's cached features, the
    reference's atto recipe (docs/method.md). lr = blr x batch_size / 256."""

    batch_size: int = 1024
    blr: float = 2e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.3
    smoothing: float = 0.2

    @property
    def lr(self) -> float:
        return self.blr * self.batch_size / 256


@dataclasses.dataclass
class FinetuneRecipe(ProbeRecipe):
    """A classification task's fine-tuning: the probe's optimiser settings, and every parameter trains, with
    warmup, layer decay and drop path (docs/method.md)."""

    warmup_epochs: int = 0
    layer_decay: float = 0.9
    drop_path: float = 0.1


@dataclasses.dataclass
class SegmentationRecipe(FinetuneRecipe):
    """A segmentation task's U-Net in either mode, with epochs of its own (the paper's 200): ``linear_probe``
    trains decoder and head on the frozen encoder throughout, ``finetune`` unfreezes the encoder after
    ``freeze_epochs`` (the paper's lp&ft)."""

    epochs: int = 200
    batch_size: int = 32
    blr: float = 1e-2
    smoothing: float = 0.0
    freeze_epochs: int = 50


@dataclasses.dataclass
class BootstrapConfig:
    """Percentile bootstrap intervals: of each cell's test metric over its test samples, and of the IQM over
    seeds (stratified by task); seeded, so a rerun gives the same intervals."""

    resamples: int = 1000
    confidence: float = 0.95
    seed: int = 0


@dataclasses.dataclass
class BenchmarkConfig:
    """A benchmark suite (``configs/geobench_suite.yaml``): every encoder on every task, partition, seed and
    mode, one cell each, in ``<storage_path>/<name>``.

    ``encoders`` maps a name to an export folder, a pretraining run or checkpoint, a checkpoint file of the
    original MMEarth project (each a path or a URI), or null for a random ``arch`` / ``patch_size``
    encoder. ``tasks`` are GEO-Bench tasks (read from ``geobench_dir``, default ``$GEO_BENCH_DIR``) or
    ``land_cover``, the held-out task of the MMEarth folder ``data`` (``default`` partition only).
    Classification cells train ``epochs`` epochs with the ``linear_probe`` or ``finetune`` recipe,
    segmentation cells the ``segmentation`` recipe's. Each cell is a Ray task asking ``cpus_per_cell`` CPUs
    and, with ``use_gpu``, a GPU; ``max_concurrent_cells`` (null: as many as the cluster holds) leaves
    room on a shared cluster.
    """

    name: str = "geobench"
    storage_path: str = "runs"
    geobench_dir: str | None = None
    data: str | None = None
    encoders: dict[str, str | None] = dataclasses.field(default_factory=dict)
    tasks: list[str] = dataclasses.field(default_factory=lambda: ["m-bigearthnet"])
    partitions: list[str] = dataclasses.field(default_factory=lambda: ["default"])
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    modes: list[EvalMode] = dataclasses.field(default_factory=lambda: ["linear_probe"])
    epochs: int = 100
    arch: str = "atto"
    patch_size: int = 8
    crop_size: int = 56
    linear_probe: ProbeRecipe = dataclasses.field(default_factory=ProbeRecipe)
    finetune: FinetuneRecipe = dataclasses.field(default_factory=FinetuneRecipe)
    segmentation: SegmentationRecipe = dataclasses.field(default_factory=SegmentationRecipe)
    cpus_per_cell: float = 1.0
    use_gpu: bool = False
    max_concurrent_cells: int | None = None
    bootstrap: BootstrapConfig = dataclasses.field(default_factory=BootstrapConfig)

    def validate(self) -> None:
        """Every key checked before any file is read; the suite checks encoders, task folders and data."""
        check_name(self.name, "name")
        _check_ranges(self, "", {"epochs": AT_LEAST_1, "crop_size": AT_LEAST_1, "cpus_per_cell": POSITIVE,
                                 "max_concurrent_cells": AT_LEAST_1})
        _check_ranges(self.bootstrap, "bootstrap.", {"resamples": AT_LEAST_1, "confidence": Interval(
            0.0, 1.0, open_low=True, open_high=True), "seed": NON_NEGATIVE})
        _check_recipe(self.linear_probe, "linear_probe.", self.epochs)
        _check_recipe(self.finetune, "finetune.", self.epochs)
        _check_recipe(self.segmentation, "segmentation.", self.segmentation.epochs)
        if not self.encoders:
            raise ConfigError("encoders: none given; map a name to an export, a checkpoint or null (random init)")
        for name in self.encoders:
            check_name(name, f"encoders.{name}")
        _check_members("tasks", [_task_name(t, f"tasks[{i}]") for i, t in enumerate(self.tasks)])
        _check_members("partitions", self.partitions)
        for i, partition in enumerate(self.partitions):
            if partition not in PARTITIONS:
                raise ConfigError(f"partitions[{i}]: {partition!r} is not one of {list(PARTITIONS)}")
        _check_members("seeds", self.seeds)
        for i, seed in enumerate(self.seeds):
            if seed not in NON_NEGATIVE:
                raise ConfigError(f"seeds[{i}]: {seed} {NON_NEGATIVE}")
        _check_members("modes", self.modes)
        if LAND_COVER in self.tasks:
            _check_land_cover(self)
        if self.arch not in VARIANTS:
            raise ConfigError(f"arch: {self.arch!r} is not one of {sorted(VARIANTS)}")
        if self.patch_size not in (8, 16, 32):
            raise ConfigError(f"patch_size: {self.patch_size} is not one of [8, 16, 32]")
        check_storage(self.storage_path, "storage_path")


def _check_recipe(recipe: ProbeRecipe, prefix: str, epochs: int) -> None:
    """A mode's recipe: ranges, epochs of warmup and freezing within its ``epochs``, a cosine that falls."""
    _check_ranges(recipe, prefix, {k: v for k, v in _FINETUNE_RANGES.items() if hasattr(recipe, k)})
    for key in ("warmup_epochs", "freeze_epochs"):
        if getattr(recipe, key, 0) > epochs:
            raise ConfigError(f"{prefix}{key}: {getattr(recipe, key)} must lie in [0, epochs {epochs}]")
    _check_min_lr(recipe.min_lr, recipe.lr, prefix)


def _task_name(name: str, key: str) -> str:
    """A task's registry name (an alias resolved), or ``land_cover``; else a ConfigError naming ``key``."""
    if name == LAND_COVER:
        return name
    try:
        return get_task(name).name
    except ValueError as err:
        raise ConfigError(f"{key}: {err}, or {LAND_COVER!r} (the held-out task of an MMEarth folder)") from None


def _check_members(key: str, values: Sequence[Any]) -> None:
    """A list key holds something, each entry once: a repeat would be a second cell of the same name."""
    if not values:
        raise ConfigError(f"{key}: the list is empty")
    seen: set[Any] = set()
    for i, value in enumerate(values):
        if value in seen:
            raise ConfigError(f"{key}[{i}]: {value!r} is listed twice")
        seen.add(value)


def _check_land_cover(config: BenchmarkConfig) -> None:
    key = f"tasks[{config.tasks.index(LAND_COVER)}]"
    if config.data is None:
        raise ConfigError(f"{key}: {LAND_COVER} is read from an MMEarth folder; set data")
    if config.partitions != ["default"]:
        raise ConfigError(f"partitions: {LAND_COVER} ({key}) has only the 'default' partition, not "
                          f"{[p for p in config.partitions if p != 'default']}")
