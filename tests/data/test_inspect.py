"""`mpmae inspect`: whole-folder validation and its summary, on synthetic folders (torchgeo's fixture:
tests/external/test_inspect_torchgeo.py)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpmae.cli import main
from mpmae.data.inspect import inspect_folder
from mpmae.modalities import MODALITIES
from tests.crafted.mmearth import copy_mmearth_folder

STEM = "data_synth_v001_64"


def _levels(folder: Path) -> Counter[str]:
    return Counter(entry["S2_type"] for entry in json.loads((folder / f"{STEM}_tile_info.json").read_text()).values())


@pytest.fixture(scope="module")
def quarter_missing(mmearth10: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 10-tile folder with the label no-data code on the top quarter of every DW and ESA map."""

    def top_quarter(name: str, array: np.ndarray) -> np.ndarray:
        if name in ("dynamic_world", "esa_worldcover"):
            assert (array != MODALITIES[name].no_data).all()  # so the share below is exactly the planted one
            array = array.copy()
            array[:, :, :16] = MODALITIES[name].no_data
        return array

    return copy_mmearth_folder(mmearth10, tmp_path_factory.mktemp("inspect") / "f", top_quarter)


def test_summary_of_a_synthetic_folder(quarter_missing: Path) -> None:
    summary = inspect_folder(quarter_missing)
    assert summary.num_tiles == 10 and summary.image_size == 64
    assert summary.tiles_per_split == {"train": 8, "val": 1, "test": 1}
    levels = _levels(quarter_missing)
    assert summary.s2_levels == {"l1c": levels["l1c"], "l2a": levels["l2a"]} and len(levels) == 2
    assert summary.modalities["sentinel2"] == ((10, 13, 64, 64), "uint16")
    assert summary.modalities["month"] == ((10, 2), "float32")
    assert summary.sampled_tiles == 8  # all of train
    assert summary.no_data_share["dynamic_world"] == 0.25 and summary.no_data_share["esa_worldcover"] == 0.25
    rows = json.loads((quarter_missing / f"{STEM}_splits.json").read_text())["train"]
    with h5py.File(quarter_missing / f"{STEM}.h5") as h5:
        s1_missing = float(np.isinf(h5["sentinel1"][()][rows]).mean())
    assert 0.0 < s1_missing < 1.0 and summary.no_data_share["sentinel1"] == pytest.approx(s1_missing)
    assert summary.no_data_share["biome"] == 0.0  # one-hot vectors with exactly one 1


def test_cli_prints_summary(quarter_missing: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(quarter_missing)]) == 0
    out = capsys.readouterr().out
    levels = _levels(quarter_missing)
    assert "tiles: 10 (64 px)" in out and f"l1c {levels['l1c']}, l2a {levels['l2a']}" in out
    assert "esa_worldcover" in out and "uint8" in out and "25.0%" in out


def test_cli_exits_nonzero_naming_the_problem(mmearth10: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    for path in mmearth10.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    info_path = folder / f"{STEM}_tile_info.json"
    info = json.loads(info_path.read_text())
    tile_id = sorted(info)[7]
    del info[tile_id]
    info_path.write_text(json.dumps(info))
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "tile_info.json: no entry for 1 tile id(s)" in err and f"'{tile_id}'" in err
