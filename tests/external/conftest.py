"""Fixtures for the tests of external material: the shared realdata folder (``MPMAE_REALDATA``).

These tests exist to check the project against real data and the upstream reference's golden outputs, so a
missing folder is an error, never a skip: CI without the material fails here, naming the folder to provide.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


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
