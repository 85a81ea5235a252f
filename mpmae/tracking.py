"""Experiment tracking: an MLflow run and TensorBoard event files for pretraining, evaluation and sweeps.

The driver opens the run before any worker starts (:func:`open_run`): it checks ``MLFLOW_TRACKING_URI``,
creates the MLflow run (or finds the one an interrupted run of the same folder left, so a resumed run logs
on), and logs the resolved config as dotted params. It hands a plain dict, the :class:`Tracker`'s spec,
to the workers, where rank 0 alone logs, at reports only: nothing talks to the network inside the step
loop. Every call to the server is guarded: one that fails (the server went away) costs a warning, never
the training run. TensorBoard events go to ``<run folder>/tensorboard``; for a run in a bucket they are
written locally and copied there at each report.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import mpmae.storage as storage
from mpmae.config import ConfigError, TrackingConfig

log = logging.getLogger(__name__)
T = TypeVar("T")

URI_VARIABLE = "MLFLOW_TRACKING_URI"
#: The tag that names a run's folder (a path or URI): how a resumed run finds its MLflow run again.
RUN_TAG = "mpmae.run"
PARENT_TAG = "mlflow.parentRunId"
TENSORBOARD_DIR = "tensorboard"
#: MLflow's request behaviour inside mpmae (a user's own setting wins): one try, a short timeout, so a
#: server that went away costs seconds per report, not MLflow's minutes of retries.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_PARAM_MAX_CHARS = 6000
_BATCH = 100
_HEALTH_TIMEOUT_S = 5.0


class TrackingError(ConfigError):
    """Tracking is asked for but cannot work (no URI, no server, no client); raised before any worker starts."""


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys (``model.mask_ratio``), values as text (None: ``null``)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = "null" if value is None else str(list(value) if isinstance(value, tuple) else value)
            out[name] = text[:_PARAM_MAX_CHARS]
    return out


def _client(uri: str) -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise TrackingError("tracking.mlflow: the MLflow client is not installed: pip install 'mpmae[tracking]'") \
            from None
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=uri)


def tracking_uri() -> str:
    """The MLflow server of this process's environment, checked to answer (HTTP servers: ``/health``)."""
    uri = os.environ.get(URI_VARIABLE, "").strip()
    if not uri:
        raise TrackingError(f"tracking.mlflow: {URI_VARIABLE} is unset; point it at your MLflow server "
                            "(e.g. http://mlflow.internal:5000)")
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=_HEALTH_TIMEOUT_S) as reply:
                reply.read(64)
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(f"tracking.mlflow: the MLflow server at {URI_VARIABLE}={uri} does not answer "
                                f"({reason})") from None
    return uri


def _experiment_id(client: Any, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment is not None else client.create_experiment(name)


def open_run(config: TrackingConfig, run_path: str, name: str, params: Mapping[str, Any],
             parent: Mapping[str, Any] | None = None, tags: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Open the tracking of the run whose folder is ``run_path``: the spec a :class:`Tracker` is built from.

    With MLflow on, the run tagged with ``run_path`` is reused when there is one (a resumed run; params it
    has are left as they are), else created, nested under ``parent``'s run when given, with the flattened
    ``params``. ``parent`` is a spec too: a sweep's trials inherit its server, experiment and credentials.
    Errors (no URI, no server) are raised here, in the driver.
    """
    spec: dict[str, Any] = {"run_path": run_path}
    if config.tensorboard:
        spec["tensorboard"] = storage.join(run_path, TENSORBOARD_DIR)
    if not config.mlflow:
        return spec
    if parent is not None and "mlflow" in parent:
        env, experiment = dict(parent["mlflow"]["env"]), parent["mlflow"]["experiment"]
        os.environ.update(env)
    else:
        env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
        experiment = config.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "mpmae"
    uri = tracking_uri()
    client = _client(uri)
    try:
        experiment_id = _experiment_id(client, experiment)
        run_id = _find_run(client, experiment_id, run_path)
        if run_id is None:
            all_tags = {RUN_TAG: run_path, **(tags or {})}
            if parent is not None and "mlflow" in parent:
                all_tags[PARENT_TAG] = parent["mlflow"]["run_id"]
            run_id = client.create_run(experiment_id, tags=all_tags, run_name=name).info.run_id
        else:
            client.update_run(run_id, status="RUNNING")
        _log_new_params(client, run_id, flatten(params))
    except Exception as err:  # noqa: BLE001 - any server-side refusal is the same to the user
        raise TrackingError(f"tracking.mlflow: the MLflow server at {uri} refused the run ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:200] if str(err) else ''})") from None
    spec["mlflow"] = {"uri": uri, "run_id": run_id, "experiment": experiment, "env": env}
    return spec


def _find_run(client: Any, experiment_id: str, run_path: str) -> str | None:
    quoted = run_path.replace("'", "\\'")
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{quoted}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _log_new_params(client: Any, run_id: str, params: Mapping[str, str]) -> None:
    """Log the params the run does not have; a resumed run's changed values (e.g. more epochs) are warned of."""
    from mlflow.entities import Param

    known = client.get_run(run_id).data.params
    changed = sorted(k for k, v in params.items() if k in known and known[k] != v)
    if changed:
        log.warning("MLflow run %s keeps its first values of %s (params cannot change)", run_id, changed)
    new = [Param(k, v) for k, v in params.items() if k not in known]
    for start in range(0, len(new), _BATCH):
        client.log_batch(run_id, params=new[start:start + _BATCH])


class Tracker:
    """Logs metrics and artifacts to the run of a spec (from :func:`open_run`); built on rank 0 only.

    Every method swallows a failure with one warning: tracking never ends a run. An empty spec tracks nothing.
    The driver's tracker leaves the event files to rank 0 (``tensorboard=False``).
    """

    def __init__(self, spec: Mapping[str, Any] | None, tensorboard: bool = True) -> None:
        spec = spec or {}
        self._mlflow: dict[str, Any] | None = spec.get("mlflow")
        self._tensorboard_target: str | None = spec.get("tensorboard") if tensorboard else None
        self._client: Any = None
        self._writer: Any = None
        self._local_events: Path | None = None
        if self._mlflow is not None:
            os.environ.update(self._mlflow["env"])
            uri = self._mlflow["uri"]
            self._client = self.guarded("connect to", lambda: _client(uri))

    @property
    def run_id(self) -> str | None:
        return None if self._mlflow is None else self._mlflow["run_id"]

    def find_run(self, run_path: str) -> str | None:
        """The id of the MLflow run of ``run_path`` in this run's experiment (a sweep's trial, by its folder)."""
        if self._client is None or self._mlflow is None:
            return None
        client, experiment = self._client, self._mlflow["experiment"]
        return self.guarded(f"look up the run of {run_path}",
                            lambda: _find_run(client, _experiment_id(client, experiment), run_path))

    def for_run(self, run_id: str) -> Tracker:
        """A tracker of another MLflow run on the same server (no event files)."""
        return Tracker({"mlflow": {**self._mlflow, "run_id": run_id}} if self._mlflow else {})

    def guarded(self, doing: str, call: Callable[[], T]) -> T | None:
        """``call()``, or None with a warning when it fails: what tracking does must never end the run."""
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - tracking must never end the run
            log.warning("experiment tracking could not %s (%s: %s); training goes on", doing,
                        type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
            return None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | float) -> None:
        """The finite numbers of ``metrics`` at ``step`` (the global optimizer step), to MLflow and TensorBoard."""
        step = int(step)
        values = {k: float(v) for k, v in metrics.items()
                  if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))}
        if not values:
            return
        if self._client is not None:
            self.guarded("log metrics to MLflow", lambda: self._log_batch(values, step))
        if self._tensorboard_target is not None:
            self.guarded("write TensorBoard events", lambda: self._write_events(values, step))

    def _log_batch(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for start in range(0, len(metrics), _BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[start:start + _BATCH])

    def _write_events(self, values: Mapping[str, float], step: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            target = self._tensorboard_target
            assert target is not None
            if storage.is_uri(target):
                self._local_events = Path(tempfile.mkdtemp(prefix="mpmae-tensorboard-"))
            self._writer = SummaryWriter(str(self._local_events or target))
        for key, value in values.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()
        self._copy_events()

    def _copy_events(self) -> None:
        """For a bucket: this writer's event files copied whole (they grow; a copy replaces the last one)."""
        if self._local_events is None or self._tensorboard_target is None:
            return
        for file in sorted(self._local_events.iterdir()):
            storage.write_bytes(storage.join(self._tensorboard_target, file.name), file.read_bytes(), overwrite=True)

    def log_artifacts(self, files: Iterable[Path], folder: str | None = None) -> None:
        """Attach local ``files`` to the MLflow run (under ``folder``)."""
        if self._client is None:
            return
        client, run_id = self._client, self.run_id
        for file in files:
            self.guarded(f"attach {Path(file).name}",
                         functools.partial(client.log_artifact, run_id, str(file), folder))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self._client is None:
            return
        for key, value in tags.items():
            self.guarded(f"tag the run {key}", functools.partial(self._client.set_tag, self.run_id, key, value))

    def close(self) -> None:
        """Close the event files (and copy them into their bucket a last time)."""
        if self._writer is not None:
            self.guarded("close the TensorBoard events", self._writer.close)
            self.guarded("copy the TensorBoard events", self._copy_events)
            self._writer = None

    def finish(self, status: str = "FINISHED") -> None:
        """End the run: ``FINISHED``, ``FAILED`` or ``KILLED``."""
        self.close()
        if self._client is not None:
            self.guarded("end the MLflow run", lambda: self._client.set_terminated(self.run_id, status))

