"""Shared test fixtures: the external realdata folder and small generated datasets."""

from __future__ import annotations

import os
from collections.abc import Iterator
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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray instance for the whole session; yields its address.

    ``num_cpus=4`` is declared whatever the machine has: on a 2-core box, Train workers plus a Ray Data
    pipeline need more CPU slots than cores, or scheduling waits forever. Token auth is disabled
    (unless set explicitly) so that subprocesses pointed at the address need no token.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    context = ray.init(
        address="local",
        num_cpus=4,
        object_store_memory=200 * 1024**2,
        include_dashboard=True,
        log_to_driver=False,
        configure_logging=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield context.address_info["address"]
    ray.shutdown()
