"""MMEarthDataset on torchgeo's MMEarth64 fixture (tg64): the upstream reference loader's golden outputs,
the fixture's label codes and its older metadata layout. The unit versions run on synthetic folders
(tests/data/test_mmearth.py)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mpmae.data import MMEarthDataset
from mpmae.modalities import PRESETS
from tests.crafted.mmearth import copy_mmearth_folder, tile_id_only

STEM = "data_1M_v001_64"
REAL_METADATA = np.dtype([("tile_id", "S100"), ("S2_type", "S10")])


@pytest.fixture(scope="module")
def golden(realdata: Path) -> dict[str, np.ndarray]:
    with np.load(realdata / "golden" / "golden_mmearth_tg64.npz") as npz:
        return dict(npz)


def test_reproduces_reference_loader_except_esa_tree_cover(tg64: Path, golden: dict[str, np.ndarray]) -> None:
    dataset = MMEarthDataset(tg64)
    raw_esa = h5py.File(tg64 / f"{STEM}.h5")["esa_worldcover"][()]
    assert len(dataset) == 10
    for i in range(10):
        item = dataset[i]
        assert item["id"] == str(i)
        assert set(item) - {"id"} == set(PRESETS["all_mod"])
        np.testing.assert_array_equal(item["sentinel2"], golden[f"inp_{i}_sentinel2"])
        for name in PRESETS["all_mod"]:
            ours, ref = item[name], golden[f"out_{i}_{name}"]
            assert ours.dtype == ref.dtype and ours.shape == ref.shape, name
            if name == "esa_worldcover":
                tree = raw_esa[i] == 10
                assert tree.any()
                assert (ours[tree] == 0).all() and (ref[tree] == -1).all()  # the reference erases tree cover
                np.testing.assert_array_equal(ours[~tree], ref[~tree])
            else:
                np.testing.assert_array_equal(ours, ref, err_msg=f"tile {i} {name}")


def test_the_workers_torch_normalisation_equals_the_golden_held_one(tg64: Path) -> None:
    """Training workers normalise raw batches with torch on their device: bit for bit what read_batch gives."""
    dataset = MMEarthDataset(tg64)
    raw = dataset.read_raw(np.arange(10))
    assert raw["sentinel2"].dtype == np.uint16 and raw["esa_worldcover"].dtype == np.uint8
    tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in raw.items()}
    got = dataset.normalizer(tensors)
    expected = dataset.read_batch(np.arange(10))
    assert list(got) == list(expected)
    for name in PRESETS["all_mod"]:
        assert got[name].numpy().dtype == expected[name].dtype, name
        np.testing.assert_array_equal(got[name].numpy(), expected[name], err_msg=name)


def test_label_remaps_and_ignore_values(tg64: Path) -> None:
    dataset = MMEarthDataset(tg64, modalities=["dynamic_world", "esa_worldcover"])
    raw = h5py.File(tg64 / f"{STEM}.h5")
    batch = dataset.read_batch(range(10))
    dw, raw_dw = batch["dynamic_world"], raw["dynamic_world"][()]
    np.testing.assert_array_equal(dw[raw_dw == 0], -1)
    np.testing.assert_array_equal(dw[raw_dw > 0], raw_dw[raw_dw > 0].astype(np.int64) - 1)
    esa, raw_esa = batch["esa_worldcover"], raw["esa_worldcover"][()]
    assert esa.min() == -1 and esa.max() == 10
    np.testing.assert_array_equal(esa[raw_esa == 255], -1)
    np.testing.assert_array_equal(esa[raw_esa == 95], 9)
    np.testing.assert_array_equal(esa[raw_esa == 100], 10)


def test_accepts_real_layouts_gzip_and_dtype_variants(tg64: Path, tmp_path: Path) -> None:
    """Real metadata layout, tile_id-only metadata, gzip chunks, float month and uint8 SCL all read alike."""

    def to_real_layout(name: str, array: np.ndarray) -> np.ndarray:
        if name == "metadata":
            return np.array([(t, s) for t, s in array], dtype=REAL_METADATA)
        if name == "month":
            return array.astype(np.float32)
        if name == "sentinel2_scl":
            return array.astype(np.uint8)
        return array

    expected = MMEarthDataset(tg64, modalities=[*PRESETS["all_mod"], "sentinel2_scl"]).read_batch(range(10))
    for folder in (copy_mmearth_folder(tg64, tmp_path / "real", to_real_layout, compression="gzip"),
                   copy_mmearth_folder(tg64, tmp_path / "merged", tile_id_only)):
        batch = MMEarthDataset(folder, modalities=[*PRESETS["all_mod"], "sentinel2_scl"]).read_batch(range(10))
        assert batch["id"] == expected["id"]
        for name in expected:
            if name != "id":
                np.testing.assert_array_equal(batch[name], expected[name], err_msg=f"{folder.name} {name}")
