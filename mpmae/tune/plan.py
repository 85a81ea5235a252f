"""A validated sweep and the layout of its folder, shared by the sweep runner and its summary."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import mpmae.storage as storage
from mpmae.config import SweepConfig
from mpmae.evaluation.probe_task import SCORE
from mpmae.tune.space import SearchSpace

#: What Tune ranks trials by: the probe's continuous score (its interval and accuracy come beside it).
METRIC = SCORE


TIME_ATTR = "epochs_done"


SWEEP_FILE = "sweep.yaml"


TRIALS_DIR = "trials"


@dataclass
class Sweep:
    """A validated sweep: its config, the resolved base pretraining config dict and the search space."""

    config: SweepConfig
    base: dict[str, Any]
    space: SearchSpace

    @property
    def folder(self) -> str:
        """``<storage_path>/<name>``: an absolute path, or a URI (``s3://bucket/sweeps/name``)."""
        return storage.join(storage.absolute(self.config.storage_path), self.config.name)

    @property
    def epochs(self) -> int:
        return int(self.base["optim"]["epochs"])


def yaml_ready(value: Any) -> Any:
    """Tuples as lists, so that ``yaml.safe_dump`` writes them."""
    if isinstance(value, Mapping):
        return {k: yaml_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [yaml_ready(v) for v in value]
    return value
