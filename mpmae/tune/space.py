"""The search space of a sweep: parsed from config, checked against the data, sampled by Optuna.

A config's ``search`` maps a searchable key (nested like the pretraining config, or dotted) to a
distribution (``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{choice: [...]}``) or a fixed value.
``model.task_weights`` is conditional: it is sampled only in trials whose ``model.loss`` is ``weighted``,
one weight per pretext task of the trial's targets; it is either one distribution for every task or a
``{task: distribution}`` mapping (with an optional ``default`` for the tasks not named). Trials see flat
parameters (``model.mask_ratio``, ``model.task_weights.biome``) that :func:`apply_params` puts into a
pretraining config dict.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mpmae.config import ConfigError, PretrainConfig, from_dict
from mpmae.modalities import resolve_selection, tasks_of

TASK_WEIGHTS = "model.task_weights"
#: What a sweep may search, and the values a choice may take (None: any value the config accepts).
SEARCHABLE: dict[str, tuple[str, ...] | None] = {
    "model.mask_ratio": None,
    "model.loss": ("uncertainty", "unweighted", "weighted"),
    TASK_WEIGHTS: None,
    "optim.blr": None,
    "model.decoder": ("shared", "per_task"),
    "model.targets": None,
}
_KINDS = ("uniform", "loguniform", "choice")


@dataclass(frozen=True)
class Distribution:
    """One searched value: ``uniform`` / ``loguniform`` over [low, high], ``choice`` over values, or fixed."""

    kind: str
    low: float = 0.0
    high: float = 0.0
    values: tuple[Any, ...] = ()

    @property
    def candidates(self) -> tuple[Any, ...]:
        """Values that stand for the whole range in up-front checks: the choices, or both bounds."""
        return self.values if self.kind in ("choice", "fixed") else (self.low, self.high)

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw from an Optuna trial; choices are drawn by label, since Optuna stores only scalars."""
        if self.kind == "fixed":
            return self.values[0]
        if self.kind == "choice":
            labels = [_label(v) for v in self.values]
            return self.values[labels.index(trial.suggest_categorical(name, labels))]
        return trial.suggest_float(name, self.low, self.high, log=self.kind == "loguniform")


def _label(value: Any) -> Any:
    """A scalar that names a choice: lists (of target modalities) are joined with '+'."""
    return "+".join(map(str, value)) if isinstance(value, list | tuple) else value


def parse_distribution(spec: Any, key: str) -> Distribution:
    """A :class:`Distribution` from its config form; errors name ``key``."""
    if not isinstance(spec, Mapping):
        return Distribution("fixed", values=(spec,))
    if len(spec) != 1 or next(iter(spec)) not in _KINDS:
        raise ConfigError(f"search.{key}: expected one of {[f'{{{k}: ...}}' for k in _KINDS]} or a value, got {spec}")
    kind, args = next(iter(spec.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"search.{key}: choice needs a non-empty list of values")
        return Distribution("choice", values=tuple(args))
    if not (isinstance(args, list) and len(args) == 2 and all(_is_number(a) for a in args)):
        raise ConfigError(f"search.{key}: {kind} needs [low, high], got {args!r}")
    low, high = (float(a) for a in args)
    if not low < high:
        raise ConfigError(f"search.{key}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"search.{key}: loguniform needs low > 0, got {low}")
    return Distribution(kind, low, high)


def _is_number(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads 1e-4 as a string
        except ValueError:
            return False
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SearchSpace:
    """The parsed ``search`` section: plain keys, and the conditional per-task weights."""

    params: dict[str, Distribution]
    task_weights: dict[str, Distribution]

    @property
    def searched(self) -> list[str]:
        """Keys whose value varies between trials (the columns of the results table)."""
        return [k for k, d in self.params.items() if d.kind != "fixed"]

    def sample(self, trial: Any) -> None:
        """Optuna define-by-run: the plain keys, then a weight per task when the loss is ``weighted``."""
        values = {key: dist.suggest(trial, key) for key, dist in self.params.items()}
        if values.get("model.loss") == "weighted":
            for task in tasks_of(resolve_selection(values["model.targets"])):
                dist = self.task_weights.get(task, self.task_weights.get("default"))
                if dist is not None:
                    dist.suggest(trial, f"{TASK_WEIGHTS}.{task}")


def flatten_search(search: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections (``model: {mask_ratio: ...}``) as dotted keys; distributions and the per-task
    weights mapping are leaves. Both spellings may be mixed; nesting is what ``key=value`` overrides write."""
    flat: dict[str, Any] = {}
    for key, value in search.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and path not in SEARCHABLE and not set(value) & set(_KINDS):
            flat.update(flatten_search(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def parse_search_space(search: Mapping[str, Any], base: PretrainConfig) -> SearchSpace:
    """Parse and check ``search`` against the base config; every error is raised before any trial.

    The base config's loss and targets join the space as fixed values when not searched, so that the
    conditional weights always know both.
    """
    search = flatten_search(search)
    unknown = sorted(set(search) - set(SEARCHABLE))
    if unknown:
        raise ConfigError(f"search: unknown key(s) {unknown}; searchable keys are {list(SEARCHABLE)}")
    params = {k: parse_distribution(v, k) for k, v in search.items() if k != TASK_WEIGHTS}
    params.setdefault("model.loss", Distribution("fixed", values=(base.model.loss,)))
    params.setdefault("model.targets", Distribution("fixed", values=(base.model.targets,)))
    for key, dist in params.items():
        allowed = SEARCHABLE[key]
        if allowed is None:
            continue
        bad = [v for v in dist.candidates if v not in allowed]
        if bad:
            raise ConfigError(f"search.{key}: {bad} are not among {list(allowed)}")
    weights = _parse_task_weights(search.get(TASK_WEIGHTS), params)
    return SearchSpace(params, weights)


def _parse_task_weights(spec: Any, params: Mapping[str, Distribution]) -> dict[str, Distribution]:
    if spec is None:
        return {}
    if "weighted" not in params["model.loss"].candidates:
        raise ConfigError(f"search.{TASK_WEIGHTS}: only used when model.loss is 'weighted', which neither the "
                          "base config nor search.model.loss allows")
    named = spec if isinstance(spec, Mapping) and not (set(spec) & set(_KINDS)) else {"default": spec}
    tasks = set()
    for targets in params["model.targets"].candidates:
        try:
            tasks |= set(tasks_of(resolve_selection(targets)))
        except ValueError as err:
            raise ConfigError(f"search.model.targets: {err}") from None
    outside = sorted(set(named) - tasks - {"default"})
    if outside:
        raise ConfigError(f"search.{TASK_WEIGHTS}: {outside} are not pretext tasks of the target set(s); "
                          f"tasks: {sorted(tasks)}")
    out = {task: parse_distribution(dist, f"{TASK_WEIGHTS}.{task}") for task, dist in named.items()}
    negative = [t for t, d in out.items() if min(d.candidates) < 0]
    if negative:
        raise ConfigError(f"search.{TASK_WEIGHTS}: weights of {negative} can be negative")
    return out


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of pretraining config dict ``base`` with a trial's flat parameters set.

    Sampled task weights replace the base config's (tasks without one keep weight 1); a trial whose loss
    is not ``weighted`` has none.
    """
    out = copy.deepcopy(dict(base))
    if any(key.startswith(f"{TASK_WEIGHTS}.") for key in params):
        out["model"]["task_weights"] = {}
    for key, value in sorted(params.items()):
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    if out["model"].get("loss") != "weighted":
        out["model"]["task_weights"] = None
    return out


def candidate_configs(base: Mapping[str, Any], space: SearchSpace) -> list[PretrainConfig]:
    """Configs at every combination of choices and range bounds, validated: a bad corner fails up front."""
    keys = list(space.params)
    configs = []
    for values in itertools.product(*(space.params[k].candidates for k in keys)):
        params = dict(zip(keys, values, strict=True))
        if params.get("model.loss") == "weighted" and space.task_weights:
            for task in tasks_of(resolve_selection(params["model.targets"])):
                dist = space.task_weights.get(task, space.task_weights.get("default"))
                if dist is not None:
                    params[f"{TASK_WEIGHTS}.{task}"] = dist.candidates[0]
        config = from_dict(PretrainConfig, apply_params(base, params))
        try:
            config.validate()
        except ConfigError as err:
            raise ConfigError(f"search: the trial {params} is invalid: {err}") from None
        configs.append(config)
    return configs
