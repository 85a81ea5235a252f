"""`mpmae inspect` on torchgeo's MMEarth64 fixture (tg64): its degenerate no-data shares and older layout.
The unit versions run on synthetic folders (tests/data/test_inspect.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpmae.cli import main
from mpmae.data.inspect import inspect_folder


def test_summary_of_the_torchgeo_fixture(tg64: Path) -> None:
    summary = inspect_folder(tg64)
    assert summary.num_tiles == 10 and summary.image_size == 64
    assert summary.tiles_per_split == {"train": 10, "val": 0, "test": 0}
    assert summary.s2_levels == {"l1c": 2, "l2a": 8}
    assert summary.modalities["sentinel2"] == ((10, 13, 64, 64), "uint16")
    assert summary.modalities["month"] == ((10, 2), "int32")
    # fixture DW holds code 0 (no data) and ESA code 255 in about one pixel in ten / twelve
    assert 0.05 < summary.no_data_share["dynamic_world"] < 0.15
    assert 0.05 < summary.no_data_share["esa_worldcover"] < 0.15
    assert summary.no_data_share["sentinel1"] == 0.0
    assert summary.no_data_share["biome"] == 1.0  # fixture one-hot vectors are all-0 or all-1


def test_cli_prints_summary(tg64: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tg64)]) == 0
    out = capsys.readouterr().out
    assert "tiles: 10 (64 px)" in out and "l1c 2, l2a 8" in out
    assert "esa_worldcover" in out and "uint8" in out
