"""MMEarthDataset on small synthetic folders: label remaps, band selection, layout and dtype variants, and
its validation errors. The reference loader's golden outputs on torchgeo's fixture are checked in
tests/external/test_mmearth_golden.py."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpmae.data import MMEarthDataset, MMEarthFormatError
from mpmae.modalities import ESA_WORLDCOVER_CODES, MODALITIES, PRESETS, SENTINEL2_INPUT_BANDS
from tests.crafted.mmearth import copy_mmearth_folder as copy_folder
from tests.crafted.mmearth import edit_mmearth_json as edit_json
from tests.crafted.mmearth import tile_id_only

STEM = "data_synth_v001_64"
#: torchgeo's fixture layout: ``meta_id`` names the id field (S10 there, for ids "0".."9"; wider here).
TORCHGEO_METADATA = np.dtype([("meta_id", "S20"), ("S2_type", "S3")])


def train_tile_ids(folder: Path) -> list[str]:
    """Tile ids of the train split, in split order, read straight from the files."""
    rows = json.loads((folder / f"{STEM}_splits.json").read_text())["train"]
    with h5py.File(folder / f"{STEM}.h5") as h5:
        ids = [t.decode() for t in h5["metadata"]["tile_id"]]
    return [ids[r] for r in rows]


def test_label_remaps_and_ignore_values(mmearth10: Path, tmp_path: Path) -> None:
    """Each class code maps to its index in the product's code list, the no-data code (DW 0, ESA 255) to -1."""

    def with_no_data(name: str, array: np.ndarray) -> np.ndarray:
        if name in ("dynamic_world", "esa_worldcover"):
            array = array.copy()
            array[::2, :, :8, :16] = MODALITIES[name].no_data
        return array

    folder = copy_folder(mmearth10, tmp_path / "f", with_no_data)
    dataset = MMEarthDataset(folder, modalities=["dynamic_world", "esa_worldcover"])
    rows = json.loads((folder / f"{STEM}_splits.json").read_text())["train"]
    raw = h5py.File(folder / f"{STEM}.h5")
    batch = dataset.read_batch(range(len(dataset)))
    dw, raw_dw = batch["dynamic_world"], raw["dynamic_world"][()][rows]
    assert (raw_dw == 0).any() and len(np.unique(raw_dw[raw_dw > 0])) >= 3
    np.testing.assert_array_equal(dw[raw_dw == 0], -1)
    np.testing.assert_array_equal(dw[raw_dw > 0], raw_dw[raw_dw > 0].astype(np.int64) - 1)
    esa, raw_esa = batch["esa_worldcover"], raw["esa_worldcover"][()][rows]
    assert np.isin(raw_esa, [*ESA_WORLDCOVER_CODES, 255]).all()
    present = [code for code in ESA_WORLDCOVER_CODES if (raw_esa == code).any()]
    assert len(present) >= 3 and esa.min() == -1
    np.testing.assert_array_equal(esa[raw_esa == 255], -1)
    for code in present:
        np.testing.assert_array_equal(esa[raw_esa == code], ESA_WORLDCOVER_CODES.index(code), err_msg=str(code))


def test_read_batch_matches_items_in_any_order(mmearth10: Path) -> None:
    dataset = MMEarthDataset(mmearth10)
    indices = [7, 2, 3, 3, 6, 0]
    batch = dataset.read_batch(indices)
    ids = train_tile_ids(mmearth10)
    assert batch["id"] == [ids[i] for i in indices]
    for row, i in enumerate(indices):
        item = dataset[i]
        for name in dataset.selection:
            np.testing.assert_array_equal(batch[name][row], item[name])


def test_bands_selected_by_name_in_file_order(mmearth10: Path) -> None:
    full = MMEarthDataset(mmearth10, modalities="S2")[4]["sentinel2"]
    bgr = MMEarthDataset(mmearth10, modalities={"sentinel2": ["B4", "B2", "B3"]})[4]["sentinel2"]
    assert MMEarthDataset(mmearth10, modalities="rgb").selection == {"sentinel2": ("B2", "B3", "B4")}
    np.testing.assert_array_equal(bgr, full[[SENTINEL2_INPUT_BANDS.index(b) for b in ("B2", "B3", "B4")]])


@pytest.mark.parametrize(
    ("modalities", "message"),
    [
        ("sentinel3", "valid modalities"),
        ({"sentinel2": ["B13"]}, "valid bands"),
        ({"aster": []}, "empty band list"),
        ({"biome": ["biome_0"]}, "one-hot"),
    ],
)
def test_unknown_names_list_the_valid_ones(mmearth10: Path, modalities: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MMEarthDataset(mmearth10, modalities=modalities)


def test_invalid_split_name(mmearth10: Path) -> None:
    with pytest.raises(ValueError, match="valid splits"):
        MMEarthDataset(mmearth10, split="validation")


def test_accepts_torchgeo_layout_uncompressed_and_dtype_variants(mmearth10: Path, tmp_path: Path) -> None:
    """torchgeo's metadata layout (``meta_id``), tile_id-only metadata, no compression, float64 month, uint16
    SCL and int32 elevation all read like the real layout (gzip chunks) the synthetic folder has."""

    def to_torchgeo_layout(name: str, array: np.ndarray) -> np.ndarray:
        if name == "metadata":
            return np.array([(t, s) for t, s in array], dtype=TORCHGEO_METADATA)
        if name == "month":
            return array.astype(np.float64)
        if name == "sentinel2_scl":
            return array.astype(np.uint16)
        if name == "aster":
            return array.astype(np.int32)
        return array

    selection = [*PRESETS["all_mod"], "sentinel2_scl"]
    expected = MMEarthDataset(mmearth10, modalities=selection).read_batch(range(8))
    assert expected["id"] == train_tile_ids(mmearth10)
    for folder in (copy_folder(mmearth10, tmp_path / "torchgeo", to_torchgeo_layout),
                   copy_folder(mmearth10, tmp_path / "merged", tile_id_only, compression="gzip")):
        with h5py.File(folder / f"{STEM}.h5") as h5:
            assert h5["metadata"].dtype.names[0] == ("meta_id" if folder.name == "torchgeo" else "tile_id")
        batch = MMEarthDataset(folder, modalities=selection).read_batch(range(8))
        assert batch["id"] == expected["id"]
        for name in expected:
            if name != "id":
                assert batch[name].dtype == expected[name].dtype, f"{folder.name} {name}"
                np.testing.assert_array_equal(batch[name], expected[name], err_msg=f"{folder.name} {name}")


def test_survives_pickling_and_fork(mmearth10: Path) -> None:
    dataset = MMEarthDataset(mmearth10)
    before = dataset[5]["sentinel1"]
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(clone[5]["sentinel1"], before)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        sums = pool.map(_s1_sum, [(dataset, i) for i in range(4)])
    np.testing.assert_allclose(sums, [float(dataset[i]["sentinel1"].sum()) for i in range(4)])


def _s1_sum(args: tuple[MMEarthDataset, int]) -> float:
    dataset, index = args
    return float(dataset[index]["sentinel1"].sum())


def test_index_out_of_range(mmearth10: Path) -> None:
    dataset = MMEarthDataset(mmearth10)
    with pytest.raises(IndexError, match="8 tiles"):
        dataset[8]
    with pytest.raises(IndexError):
        dataset.read_batch([0, 11])


# -- bad folders: every error names the file and the key ------------------------------------------------


def test_missing_file(mmearth10: Path, tmp_path: Path) -> None:
    folder = copy_folder(mmearth10, tmp_path / "f")
    (folder / f"{STEM}_splits.json").unlink()
    with pytest.raises(MMEarthFormatError, match=r"data_\*_splits.json.*found none"):
        MMEarthDataset(folder)


def test_extra_matching_file(mmearth10: Path, tmp_path: Path) -> None:
    folder = copy_folder(mmearth10, tmp_path / "f")
    shutil.copy(folder / f"{STEM}.h5", folder / "data_copy.h5")
    with pytest.raises(MMEarthFormatError, match=r"data_\*\.h5.*data_copy\.h5.*data_synth_v001_64\.h5"):
        MMEarthDataset(folder)


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(MMEarthFormatError, match="not a directory"):
        MMEarthDataset(tmp_path / "nowhere")


def test_missing_h5_dataset(mmearth10: Path, tmp_path: Path) -> None:
    folder = copy_folder(mmearth10, tmp_path / "f", lambda name, a: None if name == "aster" else a)
    with pytest.raises(MMEarthFormatError, match=r"data_synth_v001_64\.h5: missing dataset 'aster'"):
        MMEarthDataset(folder)
    assert len(MMEarthDataset(folder, modalities="S2")) == 8  # only what is selected must exist


def test_wrong_shape(mmearth10: Path, tmp_path: Path) -> None:
    folder = copy_folder(mmearth10, tmp_path / "f", lambda name, a: a[:, :7] if name == "sentinel1" else a)
    with pytest.raises(MMEarthFormatError, match=r"'sentinel1' has shape \(10, 7, 64, 64\); expected \(10, 8"):
        MMEarthDataset(folder)


def test_wrong_dtype(mmearth10: Path, tmp_path: Path) -> None:
    def as_float(name: str, array: np.ndarray) -> np.ndarray:
        return array.astype(np.float32) if name == "esa_worldcover" else array

    folder = copy_folder(mmearth10, tmp_path / "f", as_float)
    with pytest.raises(MMEarthFormatError, match="'esa_worldcover' has dtype float32; expected an unsigned"):
        MMEarthDataset(folder)


def test_split_index_out_of_range(mmearth10: Path, tmp_path: Path) -> None:
    folder = copy_folder(mmearth10, tmp_path / "f")
    edit_json(folder, "splits", lambda s: s["val"].append(10))
    assert len(MMEarthDataset(folder, split="train")) == 8
    with pytest.raises(MMEarthFormatError, match=r"_splits\.json: split 'val' holds index 10 outside the 10"):
        MMEarthDataset(folder, split="val")


def test_tile_id_absent_from_tile_info(mmearth10: Path, tmp_path: Path) -> None:
    folder = copy_folder(mmearth10, tmp_path / "f")
    tile_id = train_tile_ids(folder)[3]
    edit_json(folder, "tile_info", lambda info: info.pop(tile_id))
    dataset = MMEarthDataset(folder)
    dataset[2]
    with pytest.raises(MMEarthFormatError, match=rf"_tile_info\.json: no entry for tile id '{tile_id}'"):
        dataset[3]


def test_band_stats_missing(mmearth10: Path, tmp_path: Path) -> None:
    folder = copy_folder(mmearth10, tmp_path / "f")
    edit_json(folder, "band_stats", lambda stats: stats.pop("aster"))
    with pytest.raises(MMEarthFormatError, match=r"_band_stats\.json: missing band statistics 'aster'"):
        MMEarthDataset(folder)


def test_band_stats_short_or_nan_for_a_selected_band(mmearth10: Path, tmp_path: Path) -> None:
    folder = copy_folder(mmearth10, tmp_path / "f")

    def break_stats(stats: dict) -> None:
        stats["sentinel1"]["std"] = stats["sentinel1"]["std"][:7]
        stats["sentinel2_l2a"]["mean"][10] = float("nan")  # B10 of L2A tiles, as in the real files

    edit_json(folder, "band_stats", break_stats)
    with pytest.raises(MMEarthFormatError, match=r"sentinel1\.std must list 8 values"):
        MMEarthDataset(folder, modalities=["sentinel1"])
    assert len(MMEarthDataset(folder, modalities="S2")) == 8  # B10 is not an input band
    with pytest.raises(MMEarthFormatError, match=r"sentinel2_l2a has no finite mean/std for .*\['B10'\]"):
        MMEarthDataset(folder, modalities={"sentinel2": ["B2", "B10"]})


@pytest.mark.parametrize("std", [0.0, -1.5])
def test_band_stats_non_positive_std_is_refused_like_nan(mmearth10: Path, tmp_path: Path, std: float) -> None:
    """z-scoring divides by std: 0 turned 69 % of a band into inf (then dropped as no-data) before."""
    folder = copy_folder(mmearth10, tmp_path / "f")

    def flatten(stats: dict) -> None:
        stats["sentinel1"]["std"][3] = std

    edit_json(folder, "band_stats", flatten)
    with pytest.raises(MMEarthFormatError, match=rf"_band_stats\.json: sentinel1\.std is {std} for band 'asc_HV'"):
        MMEarthDataset(folder, modalities=["sentinel1"])
    assert len(MMEarthDataset(folder, modalities={"sentinel1": ["asc_VV"]})) == 8  # unselected: not used


@pytest.mark.parametrize(("value", "found"), [
    (5, "5"), ([[1.0]] * 8, "a list of 8 item(s)"), (["1.0"] * 8, "a list of 8 item(s)"),
    (list(range(10**5)), "a list of 100000 item(s)"),
])
def test_band_stats_not_a_list_of_numbers(mmearth10: Path, tmp_path: Path, value: object, found: str) -> None:
    """A clear error that describes the bad value rather than printing it whole."""
    folder = copy_folder(mmearth10, tmp_path / "f")
    edit_json(folder, "band_stats", lambda stats: stats["sentinel1"].update(mean=value))
    with pytest.raises(MMEarthFormatError, match=r"sentinel1\.mean must list 8 values") as caught:
        MMEarthDataset(folder, modalities=["sentinel1"])
    assert str(caught.value).endswith(f"found {found}")


def test_wide_label_map_dtype_is_refused(mmearth10: Path, tmp_path: Path) -> None:
    """Codes index a table of every possible code: uint32 would need 32 GiB, uint64 cannot be built."""
    folder = copy_folder(mmearth10, tmp_path / "f",
                         lambda name, a: a.astype(np.uint32) if name == "esa_worldcover" else a)
    with pytest.raises(MMEarthFormatError, match="'esa_worldcover' has dtype uint32; expected an unsigned integer "
                                                 "type of at most 16 bits"):
        MMEarthDataset(folder, modalities=["esa_worldcover"])


@pytest.mark.parametrize("damage", ["truncate", "text"])
def test_truncated_or_non_hdf5_file(mmearth10: Path, tmp_path: Path, damage: str) -> None:
    folder = copy_folder(mmearth10, tmp_path / "f")
    h5 = folder / f"{STEM}.h5"
    if damage == "truncate":
        h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    else:
        h5.write_text("not hdf5")
    with pytest.raises(MMEarthFormatError, match=r"data_synth_v001_64\.h5: cannot be read as HDF5"):
        MMEarthDataset(folder)


def test_only_present_processing_levels_need_sentinel2_stats(mmearth10: Path, tmp_path: Path) -> None:
    folder = copy_folder(mmearth10, tmp_path / "f")
    edit_json(folder, "band_stats", lambda stats: stats.pop("sentinel2_l1c"))
    with pytest.raises(MMEarthFormatError, match="missing band statistics 'sentinel2_l1c'"):
        MMEarthDataset(folder, modalities="S2")

    def all_l2a(info: dict) -> None:
        for entry in info.values():
            entry["S2_type"] = "l2a"

    levels = [json.loads((folder / f"{STEM}_tile_info.json").read_text())[t]["S2_type"]
              for t in train_tile_ids(folder)]
    assert "l1c" in levels
    l2a = levels.index("l2a")  # a tile that was L2A reads the same; one that was L1C now uses the L2A stats
    edit_json(folder, "tile_info", all_l2a)
    expected = MMEarthDataset(mmearth10, modalities="S2")[l2a]["sentinel2"]
    np.testing.assert_array_equal(MMEarthDataset(folder, modalities="S2")[l2a]["sentinel2"], expected)
    l1c = levels.index("l1c")
    assert not np.array_equal(MMEarthDataset(folder, modalities="S2")[l1c]["sentinel2"],
                              MMEarthDataset(mmearth10, modalities="S2")[l1c]["sentinel2"])
