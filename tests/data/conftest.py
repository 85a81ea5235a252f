"""Small generated datasets shared by the data tests (no external material needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpmae.data.synth import write_synthetic_mmearth
from tests.data.geobench_tiny.data import write_geobench_tiny


def _read_only(folder: Path) -> None:
    """Session-wide folders are shared by many tests: a test that writes to one fails loudly."""
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o444)


@pytest.fixture(scope="session")
def mmearth10(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 synthetic 64 px MMEarth tiles (8 train, 1 val, 1 test): every modality, L1C and L2A tiles."""
    folder = write_synthetic_mmearth(tmp_path_factory.mktemp("mmearth10") / "folder", 10, size=64, seed=0)
    _read_only(folder)
    return folder


@pytest.fixture(scope="session")
def geobench_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GEO-Bench root holding a tiny m-bigearthnet task (train 4, valid 1, test 1; see geobench_tiny/data.py)."""
    root = write_geobench_tiny(tmp_path_factory.mktemp("geobench_tiny"))
    _read_only(root)
    return root
