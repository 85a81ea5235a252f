"""The mpmae dashboards: one for pretraining runs, one for Ray Tune sweeps (a trial is a run)."""

from __future__ import annotations

from mpmae.dashboards.model import DATASOURCE_VARIABLE, Dashboard, Panel, Row, Target, Variable
from mpmae.dashboards.promql import (
    buckets,
    gauge,
    matchers,
    on_run_nodes,
    quantile,
    rate_of_sum,
    series,
)
from mpmae.telemetry import (
    CHECKPOINT_SECONDS,
    DATA_WAIT_SECONDS,
    LEARNING_RATE,
    LOSS,
    NODE_CPU_UTILIZATION,
    NODE_GPU_UTILIZATION,
    NODE_GRAM_AVAILABLE,
    NODE_GRAM_USED,
    NODE_IP_LABEL,
    PROBE_SCORE,
    RANK_TAG,
    RUN_TAG,
    SAMPLES_PER_SECOND,
    SESSION_LABEL,
    SKIPPED_STEPS,
    STEP_SECONDS,
    TASK_LOSS,
    TASK_TAG,
    TASK_WEIGHT,
)

SAMPLES_UNIT = "suffix: samples/s"
_GPU = f"{NODE_IP_LABEL}, GpuIndex, GpuDeviceName"
_MIB = 1024 * 1024


def _legend(*labels: str) -> str:
    """A legend of label values, e.g. ``{{run}} {{task}}``."""
    return " ".join("{{" + label + "}}" for label in labels)


_RUN, _RUN_TASK = _legend(RUN_TAG), _legend(RUN_TAG, TASK_TAG)
_RUN_RANK = f"{_RUN} rank {_legend(RANK_TAG)}"


def _variables(*, rank: bool) -> tuple[Variable, ...]:
    steps = STEP_SECONDS.series("count")
    variables = [
        Variable(DATASOURCE_VARIABLE, "Data source", "prometheus", kind="datasource",
                 description="The Prometheus that scrapes the Ray cluster"),
        Variable(SESSION_LABEL, "Ray session", f"label_values({steps}, {SESSION_LABEL})",
                 description="Ray session (one per cluster start)"),
        Variable(RUN_TAG, "Run", f'label_values({steps}{{{SESSION_LABEL}=~"${SESSION_LABEL}"}}, {RUN_TAG})',
                 description="Run name (a Tune trial's run name is unique per trial)"),
    ]
    if rank:
        variables.append(Variable(RANK_TAG, "Rank", f"label_values({steps}{matchers()}, {RANK_TAG})",
                                  description="Ray Train worker rank"))
    return tuple(variables)


def _skipped_steps() -> str:
    """Cumulative skipped steps per run, 0 for runs that never skipped one (Ray has no counter series yet)."""
    zero = f"sum by ({RUN_TAG}) ({series(STEP_SECONDS, 'count')}) * 0"
    return f"sum by ({RUN_TAG}) ({series(SKIPPED_STEPS)}) or {zero}"


def _gpu_panels() -> tuple[Panel, ...]:
    node = matchers(run=False)
    used = f"sum by ({_GPU}) ({NODE_GRAM_USED}{node})"
    total = f"({used} + sum by ({_GPU}) ({NODE_GRAM_AVAILABLE}{node}))"
    gpu_legend = "{{ip}} GPU {{GpuIndex}} {{GpuDeviceName}}"
    return (
        Panel("GPU utilisation", "Utilisation of each GPU on the nodes running the selected runs "
              "(Ray's node metric; shared when runs share a node)",
              (Target(on_run_nodes(f"sum by ({_GPU}) ({NODE_GPU_UTILIZATION}{node})"), gpu_legend),),
              unit="percent", width=8, gpu_only=True),
        Panel("GPU memory used", "GPU memory in use on the nodes running the selected runs, and each GPU's total",
              (Target(on_run_nodes(f"{used} * {_MIB}"), gpu_legend),
               Target(on_run_nodes(f"{total} * {_MIB}"), f"{gpu_legend} total")),
              unit="bytes", width=8, gpu_only=True),
        Panel("CPU utilisation", "CPU utilisation of the nodes running the selected runs: a busy CPU with idle "
              "GPUs points at data loading",
              (Target(on_run_nodes(f"max by ({NODE_IP_LABEL}) ({NODE_CPU_UTILIZATION}{node})"), "{{ip}}"),),
              unit="percent", width=8),
    )


def training_dashboard() -> Dashboard:
    """Throughput, step and data-wait times, losses, task weights, lr, probe, checkpoints, nodes."""
    step_p50, step_p95 = quantile(0.5, STEP_SECONDS, RANK_TAG), quantile(0.95, STEP_SECONDS, RANK_TAG)
    wait_p50, wait_p95 = quantile(0.5, DATA_WAIT_SECONDS, RANK_TAG), quantile(0.95, DATA_WAIT_SECONDS, RANK_TAG)
    checkpoint_sum = f"sum by ({RUN_TAG}, {RANK_TAG}) ({series(CHECKPOINT_SECONDS, 'sum', rank=True)})"
    checkpoint_count = f"sum by ({RUN_TAG}, {RANK_TAG}) ({series(CHECKPOINT_SECONDS, 'count', rank=True)})"
    overview = Row("Overview", (
        Panel("Throughput", "Training samples per second of each run (all workers), last epoch",
              (Target(gauge(SAMPLES_PER_SECOND), _RUN),), unit=SAMPLES_UNIT, kind="stat", width=6, height=4),
        Panel("Probe score", "Latest linear-probe score of each run's encoder",
              (Target(gauge(PROBE_SCORE), _RUN),), unit="percentunit", kind="stat", width=6, height=4),
        Panel("Total loss", "Latest epoch's mean total loss of each run",
              (Target(gauge(LOSS), _RUN),), kind="stat", width=6, height=4),
        Panel("Skipped steps", "Optimizer steps skipped for non-finite gradients, per run",
              (Target(_skipped_steps(), _RUN),), kind="stat", width=6, height=4),
    ))
    speed = Row("Speed", (
        Panel("Samples per second", "Training samples per second of each run (all workers), per epoch",
              (Target(gauge(SAMPLES_PER_SECOND), _RUN),), unit=SAMPLES_UNIT),
        Panel("Step time", "Median and 95th percentile wall time of one training iteration, per worker",
              (Target(step_p50, f"{_RUN_RANK} p50"), Target(step_p95, f"{_RUN_RANK} p95")), unit="s"),
        Panel("Step time distribution", "Training iterations per step-time bucket, all selected workers",
              (Target(buckets(STEP_SECONDS), heatmap=True),), unit="s", kind="heatmap"),
        Panel("Data wait share", "Share of each worker's iteration time spent waiting for its batch "
              "(from histogram sums, which Ray records at bucket midpoints: approximate)",
              (Target(f"{rate_of_sum(DATA_WAIT_SECONDS)} / {rate_of_sum(STEP_SECONDS)}", _RUN_RANK),),
              unit="percentunit"),
        Panel("Data wait per step", "Median and 95th percentile time one iteration waited for its batch",
              (Target(wait_p50, f"{_RUN_RANK} p50"), Target(wait_p95, f"{_RUN_RANK} p95")), unit="s"),
        Panel("Data wait distribution", "Training iterations per data-wait bucket, all selected workers",
              (Target(buckets(DATA_WAIT_SECONDS), heatmap=True),), unit="s", kind="heatmap"),
    ))
    optimisation = Row("Optimisation", (
        Panel("Total loss", "Mean total loss of each epoch (uncertainty-weighted sum over tasks)",
              (Target(gauge(LOSS), _RUN),)),
        Panel("Loss per task", "Mean loss of each pretext task per epoch",
              (Target(gauge(TASK_LOSS, TASK_TAG), _RUN_TASK),)),
        Panel("Uncertainty weight per task", "Learned weight exp(-log_var) of each pretext task",
              (Target(gauge(TASK_WEIGHT, TASK_TAG), _RUN_TASK),)),
        Panel("Learning rate", "Learning rate at the end of each epoch", (Target(gauge(LEARNING_RATE), _RUN),),
              unit="sci"),
        Panel("Probe score", "Linear-probe score of the encoder after each probed epoch",
              (Target(gauge(PROBE_SCORE), _RUN),), unit="percentunit"),
        Panel("Skipped steps", "Cumulative optimizer steps skipped for non-finite gradients",
              (Target(_skipped_steps(), _RUN),)),
    ))
    checkpoints = Row("Checkpoints", (
        Panel("Checkpoint time", "Mean time a worker spent per checkpoint report (rank 0 writes, others wait)",
              (Target(f"{checkpoint_sum} / {checkpoint_count}", _RUN_RANK),), unit="s"),
        Panel("Time in checkpoints", "Total time each worker has spent in checkpoint reports",
              (Target(checkpoint_sum, _RUN_RANK),), unit="s"),
    ))
    return Dashboard(
        "mpmae-training", "mpmae pretraining",
        "MP-MAE pretraining on Ray Train: mpmae application metrics and Ray node metrics",
        _variables(rank=True), (overview, speed, optimisation, checkpoints, Row("Nodes", _gpu_panels())),
    )


def tune_dashboard() -> Dashboard:
    """Trials of a Ray Tune sweep side by side: probe score (what Tune ranks), loss, speed, nodes."""
    runs = f"group by ({RUN_TAG}) ({series(STEP_SECONDS, 'count')})"
    trials = Row("Trials", (
        Panel("Best probe score", "Best probe score of any selected trial over the time range",
              (Target(f"max(max_over_time({series(PROBE_SCORE)}[$__range]))", "best"),),
              unit="percentunit", kind="stat", width=8, height=4),
        Panel("Trials", "Trials that ran in the time range", (Target(f"count({runs})", "trials"),),
              kind="stat", width=8, height=4),
        Panel("Sweep throughput", "Training samples per second of all selected trials together",
              (Target(f"sum({gauge(SAMPLES_PER_SECOND)})", "samples/s"),), unit=SAMPLES_UNIT, kind="stat",
              width=8, height=4),
        Panel("Probe score per trial", "Linear-probe score of each trial's encoder after each probed epoch",
              (Target(gauge(PROBE_SCORE), _RUN),), unit="percentunit"),
        Panel("Total loss per trial", "Mean total loss of each epoch (not comparable across loss settings)",
              (Target(gauge(LOSS), _RUN),)),
        Panel("Samples per second per trial", "Training samples per second of each trial",
              (Target(gauge(SAMPLES_PER_SECOND), _RUN),), unit=SAMPLES_UNIT),
        Panel("Step time per trial", "Median training iteration time of each trial",
              (Target(quantile(0.5, STEP_SECONDS, rank=False), _RUN),), unit="s"),
    ))
    return Dashboard(
        "mpmae-tune", "mpmae Tune sweep",
        "Ray Tune sweep of MP-MAE pretraining: trials ranked by probe score, with loss, speed and nodes",
        _variables(rank=False), (trials, Row("Nodes", _gpu_panels())),
    )


#: File name -> dashboard, the files under ``dashboards/``.
DASHBOARDS = {"mpmae_training.json": training_dashboard(), "mpmae_tune.json": tune_dashboard()}
