"""Shared test fixtures: the session's Ray head, a tiny encoder. (External material: tests/external/conftest.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpmae.models.convnextv2 import ConvNeXtV2
from tests.crafted.tiny import tiny_encoder


@dataclass(frozen=True)
class RayHead:
    """The session's Ray head node: its GCS address and its dashboard (job server) URL."""

    address: str
    dashboard_url: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayHead]:
    """One Ray head for the whole session, started with `ray start` on loopback so that job submission
    can be tested against it too; this process joins it as a driver.

    ``num_cpus=4`` is declared whatever the machine has: on a 2-core box, Train workers plus a Ray Data
    pipeline need more CPU slots than cores, or scheduling waits forever. Token auth is disabled (unless
    set explicitly), the same for the head, this driver and every subprocess, which inherit the variable.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Application metrics every second (default 10 s), so that Prometheus sees a short test run.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    gcs_port, dashboard_port = _free_port(), _free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # `--block` in its own process group: teardown stops this head only, never another session's Ray.
    head = subprocess.Popen(
        [ray_cli, "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         "--num-cpus=4", f"--object-store-memory={300 * 1024**2}", "--disable-usage-stats", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # Every Ray process inherits the address: Ray's own State API clients (Train's placement-group
        # cleaner) would otherwise auto-discover the newest Ray instance on the machine, maybe another one.
        env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"},
    )
    try:
        _wait_for_port(dashboard_port, head, timeout=180)
        ray.init(address=f"127.0.0.1:{gcs_port}", log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield RayHead(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}")
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    """Wait until the head's dashboard (started last) accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the Ray head's dashboard did not open port {port} within {timeout} s")


@pytest.fixture
def encoder() -> ConvNeXtV2:
    """A features-only encoder of one block per stage on 3 bands (see :mod:`tests.crafted.tiny`)."""
    return tiny_encoder()
