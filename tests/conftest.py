"""Shared test fixtures: the external realdata folder and small generated datasets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def realdata_dir() -> Path:
    """The external test material; its absence is a failure, never a skip."""
    path = Path(os.environ.get("MPMAE_REALDATA", REPO_ROOT.parent / "shared" / "realdata")).resolve()
    if not (path / "README.md").is_file():
        raise FileNotFoundError(
            f"realdata not found at {path}: set MPMAE_REALDATA to the shared/realdata folder"
        )
    return path


@pytest.fixture(scope="session")
def realdata() -> Path:
    return realdata_dir()


@pytest.fixture(scope="session")
def tg64(realdata: Path) -> Path:
    """torchgeo's MMEarth64 fixture (10 tiles, degenerate values, older metadata layout)."""
    return realdata / "torchgeo_mmearth" / "data_1M_v001_64"


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
    gcs_port, dashboard_port = _free_port(), _free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    subprocess.run(
        [ray_cli, "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         "--num-cpus=4", f"--object-store-memory={300 * 1024**2}", "--disable-usage-stats"],
        check=True, timeout=180, capture_output=True,
    )
    address = f"127.0.0.1:{gcs_port}"
    try:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield RayHead(address, f"http://127.0.0.1:{dashboard_port}")
    finally:
        ray.shutdown()
        subprocess.run([ray_cli, "stop", "--force"], timeout=120, capture_output=True)
