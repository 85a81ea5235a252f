"""PromQL for the dashboards, built from the metric specs of :mod:`mpmae.telemetry`.

Every query is filtered by the dashboard variables ``$SessionName`` and ``$run`` (and ``$rank`` for per-rank
timings); rates use Grafana's ``$__rate_interval``.
"""

from __future__ import annotations

from mpmae.telemetry import (
    NODE_ADDRESS_LABEL,
    NODE_IP_LABEL,
    RANK_TAG,
    RUN_TAG,
    SESSION_LABEL,
    STEP_SECONDS,
    MetricSpec,
    SeriesPart,
)

RATE_INTERVAL = "$__rate_interval"


def matchers(*, run: bool = True, rank: bool = False) -> str:
    """Label matchers of the dashboard variables, e.g. ``{SessionName=~"$SessionName", run=~"$run"}``."""
    labels = [SESSION_LABEL] + [RUN_TAG] * run + [RANK_TAG] * rank
    return "{" + ", ".join(f'{label}=~"${label}"' for label in labels) + "}"


def series(spec: MetricSpec, part: SeriesPart = "", *, rank: bool = False) -> str:
    """A metric's series, filtered by the dashboard variables."""
    return spec.series(part) + matchers(rank=rank)


def gauge(spec: MetricSpec, *by: str) -> str:
    """A run-wide gauge, one series per run (and per ``by`` label), whatever worker recorded it."""
    return f"max by ({', '.join((RUN_TAG, *by))}) ({series(spec)})"


def quantile(q: float, spec: MetricSpec, *by: str, rank: bool = True) -> str:
    """The ``q`` quantile of a histogram over ``$__rate_interval``, per run and per ``by`` label."""
    labels = ", ".join(("le", RUN_TAG, *by))
    return f"histogram_quantile({q}, sum by ({labels}) (rate({series(spec, 'bucket', rank=rank)}[{RATE_INTERVAL}])))"


def buckets(spec: MetricSpec) -> str:
    """Observations per histogram bucket over ``$__rate_interval``, for a heatmap."""
    return f"sum by (le) (increase({series(spec, 'bucket', rank=True)}[{RATE_INTERVAL}]))"


def rate_of_sum(spec: MetricSpec) -> str:
    """Seconds per second a histogram of durations accumulates, per run and rank."""
    return f"sum by ({RUN_TAG}, {RANK_TAG}) (rate({series(spec, 'sum', rank=True)}[{RATE_INTERVAL}]))"


def on_run_nodes(expr: str) -> str:
    """``expr`` (a node metric aggregated by ``ip``) kept for the nodes where the selected runs' workers ran.

    Ray labels node metrics with ``ip`` and application metrics with ``NodeAddress``: the step-time
    histogram of the runs gives their nodes.
    """
    nodes = f"group by ({NODE_ADDRESS_LABEL}) ({series(STEP_SECONDS, 'count')})"
    as_ip = f'label_replace({nodes}, "{NODE_IP_LABEL}", "$1", "{NODE_ADDRESS_LABEL}", "(.*)")'
    return f"{expr} and on ({NODE_IP_LABEL}) {as_ip}"
