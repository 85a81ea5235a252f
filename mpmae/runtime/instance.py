"""The Ray instance a job runs on: a cluster's (``RAY_ADDRESS``) or a local one of its own, and whether it
has the resources a run asks for (waiting for the autoscaler where the cluster can grow)."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import ray

from mpmae.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


#: CPUs of a Ray Data pipeline beside the Train workers: its read tasks each ask for one.
DATA_PIPELINE_CPUS = 1.0


#: Seconds between looks at the cluster while the autoscaler adds nodes.
_RESOURCE_POLL_S = 5.0


def ensure_ray(**local_init: Any) -> None:
    """Connect to ``RAY_ADDRESS`` when set, else start a local instance of this process's own
    (``local_init``: more ``ray.init`` arguments for it)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        return
    _start_local_instance(local_init)


def _start_local_instance(local_init: dict[str, Any]) -> None:
    """A Ray instance that other instances on the machine neither find nor disturb, and that finds only itself.

    ``address="local"`` always starts a new instance (auto-discovery could join a stale or unrelated one).
    Its own temporary folder keeps its sockets, logs and metrics files apart, and Ray's machine-wide
    "current cluster" record (``/tmp/ray/ray_current_cluster``) is left alone: another run's instance
    must not be sent here, nor this one's processes elsewhere. Those processes find their cluster through
    Ray's state API (Train's placement-group cleaner asks it whether the run's controller lives), which
    takes the dashboard address from ``RAY_API_SERVER_ADDRESS`` before any auto-discovery (which would
    pick the newest instance on the machine, warning about the others). The raylet, and so every worker
    it starts, inherits this process's environment: set it before ``ray.init``. (Ray is pinned to 2.60.*;
    see ``ray.dashboard.utils.get_address_for_submission_client``.)
    """
    port = _free_port()
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    root = os.environ.get("RAY_TMPDIR") or ("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir())
    temp_dir = tempfile.mkdtemp(prefix="mpmae-ray-", dir=root)  # short: Ray's socket paths must stay < 108 bytes
    ray.init(address="local", num_cpus=local_cpus(), include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=port, _temp_dir=temp_dir, **local_init)
    log.info("local Ray instance: dashboard http://127.0.0.1:%d, logs and metrics files under %s", port, temp_dir)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_cpus() -> int:
    """The CPUs a local instance declares: the machine's, as Ray counts them (cgroup limits included), plus one.

    Ray schedules by declared CPUs, not by load. With only the cores declared, a run whose workers take all
    of them (2 workers x 1 CPU on 2 cores) leaves no slot for Ray Data's read tasks, which then never start,
    and the run waits forever. One more slot lets the data pipeline run beside the workers (it mostly waits
    on reads). Declaring more (``max(cores, 4)`` before) would let a run that does not fit the machine start
    and crawl; :func:`check_resources` refuses it instead, saying what is missing.
    """
    from ray._private.utils import get_num_cpus  # private: ray is pinned to 2.60.*

    return int(get_num_cpus()) + int(DATA_PIPELINE_CPUS)


def resource_shortfall(run: RunConfig, extra_cpus: Mapping[str, float], total: Mapping[str, float],
                       largest_node: Mapping[str, float]) -> str | None:
    """Why a cluster with ``total`` resources (``largest_node`` the biggest node's) cannot hold a run, else None.

    ``extra_cpus`` names the CPUs asked beside the workers' (the Ray Data pipeline, a Tune trial's driver).
    """
    workers = run.min_workers or run.num_workers  # an elastic run starts with its fewest
    what = f"{workers} workers" if run.min_workers is None else f"at least {workers} workers"
    count = f"run.num_workers: {what}" if run.min_workers is None else f"run.min_workers: {what}"
    cpus = workers * run.cpus_per_worker + sum(extra_cpus.values())
    have = total.get("CPU", 0.0)
    if cpus > have + 1e-9:
        extras = "".join(f", plus {n:g} for {what}" for what, n in extra_cpus.items() if n)
        return (f"{count} x {run.cpus_per_worker:g} CPU (run.cpus_per_worker)"
                f"{extras}, need {cpus:g} CPUs; the cluster has {have:g} ({cpus - have:g} missing)")
    if run.cpus_per_worker > largest_node.get("CPU", 0.0) + 1e-9:
        return (f"run.cpus_per_worker: a worker needs {run.cpus_per_worker:g} CPUs on one node; the largest node "
                f"has {largest_node.get('CPU', 0.0):g}")
    gpus = total.get("GPU", 0.0)
    if run.use_gpu and workers > gpus + 1e-9:
        return (f"run.use_gpu: {what} x 1 GPU need {workers} GPUs; the cluster has {gpus:g} "
                f"({workers - gpus:g} missing)")
    for resource, amount in run.worker_resources.items():
        if workers * amount > total.get(resource, 0.0) + 1e-9:
            return (f"run.worker_resources.{resource}: {count} x {amount:g} need {workers * amount:g}; the "
                    f"cluster has {total.get(resource, 0.0):g}")
    return None


def _current_shortfall(run: RunConfig, extra_cpus: Mapping[str, float]) -> str | None:
    nodes: list[dict[str, float]] = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    largest = max(nodes, key=lambda r: r.get("CPU", 0.0), default={})
    return resource_shortfall(run, extra_cpus, ray.cluster_resources(), largest)


def _autoscaler_ceiling() -> dict[str, float] | None:
    """The most of each resource the cluster's autoscaler may reach, or None when the cluster cannot grow.

    The autoscaler (v1 or v2, KubeRay's too) publishes its node types in GCS; Ray Data reads the same.
    """
    from ray._private.state import state  # private: ray is pinned to 2.60.*

    config = state.get_cluster_config()
    if config is None or not any(g.max_count == -1 or g.max_count > g.min_count
                                 for g in config.node_group_configs if g.resources and g.max_count != 0):
        return None
    return {k: float(v) for k, v in (state.get_max_resources_from_cluster_config() or {}).items()}


def check_resources(run: RunConfig, extra_cpus: Mapping[str, float]) -> None:
    """Refuse a run the cluster cannot hold, saying what is missing, before Train would wait for it forever.

    On a cluster that can add nodes, ask the autoscaler for them and wait up to ``run.resource_wait_s``.
    """
    problem = _current_shortfall(run, extra_cpus)
    if problem is None:
        return
    ceiling = _autoscaler_ceiling()
    if ceiling is not None and resource_shortfall(run, extra_cpus, ceiling, ceiling) is None:
        problem = _wait_for_nodes(run, extra_cpus)
        if problem is None:
            return
        problem += f", after waiting {run.resource_wait_s:g} s (run.resource_wait_s) for the autoscaler"
    elif ceiling is not None:
        problem += "; its autoscaler cannot add that many"
    raise ConfigError(problem)


def _wait_for_nodes(run: RunConfig, extra_cpus: Mapping[str, float]) -> str | None:
    """Ask the autoscaler for the run's bundles and wait for them; the shortfall left at the deadline."""
    from ray.autoscaler.sdk import request_resources

    worker = {"CPU": run.cpus_per_worker, **({"GPU": 1.0} if run.use_gpu else {}), **run.worker_resources}
    bundles = [dict(worker) for _ in range(run.num_workers)]
    if sum(extra_cpus.values()):
        bundles.append({"CPU": sum(extra_cpus.values())})
    log.warning("waiting up to %g s for the autoscaler to add nodes: %s", run.resource_wait_s,
                _current_shortfall(run, extra_cpus))
    deadline = time.monotonic() + run.resource_wait_s
    request_resources(bundles=bundles)
    try:
        problem = _current_shortfall(run, extra_cpus)
        while problem is not None and time.monotonic() < deadline:
            time.sleep(min(_RESOURCE_POLL_S, max(0.0, deadline - time.monotonic())))
            problem = _current_shortfall(run, extra_cpus)
        return problem
    finally:
        request_resources(bundles=[])  # the request persists otherwise, and would keep the nodes forever
