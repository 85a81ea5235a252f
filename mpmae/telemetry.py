"""Ray application metrics of a pretraining run, and the one list of their names.

The trainer records them with :class:`RunMetrics`; the Grafana dashboards (``mpmae.dashboards``) build their
queries from the :class:`MetricSpec` objects here, so a renamed metric cannot leave a dashboard behind.

How Ray 2.60 exports them to Prometheus (read off a node's metrics export port): the name gains a ``ray_``
prefix, counters a ``_total`` suffix, histograms come as ``_bucket`` (label ``le``), ``_sum`` and ``_count``;
tags become labels of the same name, next to Ray's ``SessionName``, ``NodeAddress``, ``WorkerId``,
``Component`` and ``Version``. Histogram sums are recorded at bucket midpoints, so means taken from them are
approximate. A gauge is exported only after it is set and dropped two report intervals
(``metrics_report_interval_ms``, 10 s by default) later.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import ray
from ray.util.metrics import Counter, Gauge, Histogram

MetricKind = Literal["gauge", "counter", "histogram"]
#: The parts of a histogram in Prometheus (the empty part is the series of a gauge or counter).
SeriesPart = Literal["", "bucket", "sum", "count"]

#: Tag keys of the application metrics, which Prometheus shows as labels of the same names.
RUN_TAG, RANK_TAG, TASK_TAG = "run", "rank", "task"
#: Labels Ray adds to every application metric: the Ray session and the address of the recording node.
SESSION_LABEL, NODE_ADDRESS_LABEL = "SessionName", "NodeAddress"
#: The label that names the node on Ray's built-in node metrics.
NODE_IP_LABEL = "ip"


@dataclass(frozen=True)
class MetricSpec:
    """One application metric: what the trainer registers with Ray and how Prometheus names it."""

    name: str
    kind: MetricKind
    description: str
    unit: str
    tags: tuple[str, ...] = (RUN_TAG, RANK_TAG)
    boundaries: tuple[float, ...] = ()

    def series(self, part: SeriesPart = "") -> str:
        """The Prometheus series name: ``ray_`` prefix, ``_total`` on counters, ``_<part>`` on histograms."""
        name = f"ray_{self.name}"
        if self.kind == "counter":
            return f"{name}_total"
        if self.kind == "histogram":
            if not part:
                raise ValueError(f"{self.name} is a histogram: ask for its bucket, sum or count series")
            return f"{name}_{part}"
        return name


# 1-2-5 steps: fine enough that bucket midpoints (Ray's histogram sums) stay within a factor of 1.5.
SAMPLES_PER_SECOND = MetricSpec(
    "mpmae_samples_per_second", "gauge",
    "Training samples per second of the whole run (all ranks) over the last epoch", "samples/s")
STEP_SECONDS = MetricSpec(
    "mpmae_step_seconds", "histogram",
    "Wall time of one training iteration on this rank, data wait included (seconds)", "s",
    boundaries=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0))
DATA_WAIT_SECONDS = MetricSpec(
    "mpmae_data_wait_seconds", "histogram",
    "Time one training iteration waited for its batch: read, crop, copy to the device (seconds)", "s",
    boundaries=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0))
LOSS = MetricSpec(
    "mpmae_loss", "gauge", "Total training loss (uncertainty-weighted sum over tasks), mean of the last epoch", "1")
TASK_LOSS = MetricSpec(
    "mpmae_task_loss", "gauge", "Training loss of one pretext task, mean of the last epoch", "1",
    tags=(RUN_TAG, RANK_TAG, TASK_TAG))
TASK_WEIGHT = MetricSpec(
    "mpmae_task_weight", "gauge", "Learned uncertainty weight exp(-log_var) of one pretext task", "1",
    tags=(RUN_TAG, RANK_TAG, TASK_TAG))
LEARNING_RATE = MetricSpec("mpmae_learning_rate", "gauge", "Learning rate at the end of the last epoch", "1")
SKIPPED_STEPS = MetricSpec(
    "mpmae_skipped_steps", "counter", "Optimizer steps skipped because the gradients were not finite", "steps")
CHECKPOINT_SECONDS = MetricSpec(
    "mpmae_checkpoint_seconds", "histogram",
    "Time the training loop spent reporting a checkpoint: rank 0 writes it, the others wait (seconds)", "s",
    boundaries=(0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0, 300.0, 600.0))
PROBE_SCORE = MetricSpec(
    "mpmae_probe_score", "gauge",
    "Linear-probe score of the encoder (mean true-class probability or soft micro F1); Ray Tune ranks on it",
    "1", tags=(RUN_TAG,))

METRICS = (SAMPLES_PER_SECOND, STEP_SECONDS, DATA_WAIT_SECONDS, LOSS, TASK_LOSS, TASK_WEIGHT, LEARNING_RATE,
           SKIPPED_STEPS, CHECKPOINT_SECONDS, PROBE_SCORE)

#: Ray's built-in node metrics the dashboards show next to the run's (``ray_node_gram_*`` are in MiB).
NODE_CPU_UTILIZATION = "ray_node_cpu_utilization"
NODE_GPU_UTILIZATION = "ray_node_gpus_utilization"
NODE_GRAM_USED = "ray_node_gram_used"
NODE_GRAM_AVAILABLE = "ray_node_gram_available"

# Keys of the worker's per-epoch metrics dict and the gauges that carry them.
_RUN_GAUGES = {"samples_per_s": SAMPLES_PER_SECOND, "loss": LOSS, "lr": LEARNING_RATE}
_TASK_GAUGES = {"loss": TASK_LOSS, "weight": TASK_WEIGHT}


def _register(spec: MetricSpec, tags: Mapping[str, str]) -> Gauge | Counter | Histogram:
    defaults = {k: v for k, v in tags.items() if k in spec.tags}
    metric: Gauge | Counter | Histogram
    if spec.kind == "histogram":
        metric = Histogram(spec.name, spec.description, list(spec.boundaries), spec.tags)
    elif spec.kind == "counter":
        metric = Counter(spec.name, spec.description, spec.tags)
    else:
        metric = Gauge(spec.name, spec.description, spec.tags)
    return metric.set_default_tags(defaults)


class RunMetrics:
    """The metrics one training worker records, tagged with the run name and its rank.

    Timings are per rank and recorded on every rank. Epoch values are all-reduced (the same on every rank),
    so rank 0 alone records them and a run has one series of each. Ray drops a gauge two report intervals
    after it was last set, so while training goes on :meth:`step` sets the last epoch's values again.
    """

    def __init__(self, run_name: str, rank: int, skipped_steps: int = 0) -> None:
        tags = {RUN_TAG: run_name, RANK_TAG: str(rank)}
        self._lead = rank == 0
        # By name, a Gauge, Counter or Histogram as the spec's kind says: each method calls its kind's own.
        self._metrics: dict[str, Any] = {spec.name: _register(spec, tags) for spec in METRICS}
        self._values: dict[tuple[str, str | None], float] = {}
        self._skipped = skipped_steps
        self._refresh_every = ray._config.metrics_report_interval_ms() / 2000  # half Ray's report interval
        self._refreshed = time.monotonic()

    def step(self, seconds: float, data_wait_seconds: float) -> None:
        """One training iteration: its wall time and the part spent waiting for data."""
        self._metrics[STEP_SECONDS.name].observe(seconds)
        self._metrics[DATA_WAIT_SECONDS.name].observe(data_wait_seconds)
        if self._values and time.monotonic() - self._refreshed >= self._refresh_every:
            for (name, task), value in list(self._values.items()):
                self._gauge(name, value, task)

    def epoch(self, metrics: Mapping[str, float]) -> None:
        """The worker's per-epoch report: throughput, losses, task weights, lr, skipped steps."""
        if not self._lead:
            return
        for key, spec in _RUN_GAUGES.items():
            if key in metrics:
                self._gauge(spec.name, metrics[key])
        for key, value in metrics.items():
            prefix, _, task = key.partition("/")
            if task and prefix in _TASK_GAUGES:
                self._gauge(_TASK_GAUGES[prefix].name, value, task)
        skipped = int(metrics.get("skipped_steps", self._skipped))
        if skipped > self._skipped:
            self._metrics[SKIPPED_STEPS.name].inc(skipped - self._skipped)
        self._skipped = skipped

    def probe(self, score: float) -> None:
        """The probe score of the encoder after this epoch."""
        if self._lead:
            self._gauge(PROBE_SCORE.name, score)

    def checkpoint(self, seconds: float) -> None:
        """Time spent reporting one checkpoint."""
        self._metrics[CHECKPOINT_SECONDS.name].observe(seconds)

    def _gauge(self, name: str, value: float, task: str | None = None) -> None:
        self._metrics[name].set(float(value), tags={TASK_TAG: task} if task else None)
        self._values[name, task] = value
        self._refreshed = time.monotonic()
