"""MMEarthDataset against the reference loader's golden outputs, and its validation errors."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpmae.data import MMEarthDataset, MMEarthFormatError
from mpmae.modalities import PRESETS, SENTINEL2_INPUT_BANDS

STEM = "data_1M_v001_64"
REAL_METADATA = np.dtype([("tile_id", "S100"), ("S2_type", "S10")])


def copy_folder(src: Path, dst: Path, rewrite: Callable[[str, np.ndarray], np.ndarray | None] | None = None,
                **dataset_kwargs) -> Path:
    """Copy an MMEarth folder, rewriting h5 datasets through ``rewrite(name, array)`` (None drops it)."""
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.suffix != ".h5":
            shutil.copy(path, dst / path.name)
    with h5py.File(src / f"{STEM}.h5") as fin, h5py.File(dst / f"{STEM}.h5", "w") as fout:
        for name, ds in fin.items():
            array = ds[()]
            if rewrite is not None:
                array = rewrite(name, array)
            if array is not None:
                chunks = (1, *array.shape[1:]) if dataset_kwargs and array.ndim > 1 else None
                fout.create_dataset(name, data=array, chunks=chunks, **dataset_kwargs)
    return dst


def edit_json(folder: Path, suffix: str, edit: Callable[[dict], None]) -> None:
    path = folder / f"{STEM}_{suffix}.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))


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


def test_read_batch_matches_items_in_any_order(tg64: Path) -> None:
    dataset = MMEarthDataset(tg64)
    indices = [7, 2, 3, 3, 9, 0]
    batch = dataset.read_batch(indices)
    assert batch["id"] == [str(i) for i in indices]
    for row, i in enumerate(indices):
        item = dataset[i]
        for name in dataset.selection:
            np.testing.assert_array_equal(batch[name][row], item[name])


def test_bands_selected_by_name_in_file_order(tg64: Path) -> None:
    full = MMEarthDataset(tg64, modalities="S2")[4]["sentinel2"]
    bgr = MMEarthDataset(tg64, modalities={"sentinel2": ["B4", "B2", "B3"]})[4]["sentinel2"]
    assert MMEarthDataset(tg64, modalities="rgb").selection == {"sentinel2": ("B2", "B3", "B4")}
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
def test_unknown_names_list_the_valid_ones(tg64: Path, modalities: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MMEarthDataset(tg64, modalities=modalities)


def test_invalid_split_name(tg64: Path) -> None:
    with pytest.raises(ValueError, match="valid splits"):
        MMEarthDataset(tg64, split="validation")


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

    def tile_id_only(name: str, array: np.ndarray) -> np.ndarray:
        return np.array([t for t, _ in array], dtype=[("tile_id", "S100")]) if name == "metadata" else array

    expected = MMEarthDataset(tg64, modalities=[*PRESETS["all_mod"], "sentinel2_scl"]).read_batch(range(10))
    for folder in (copy_folder(tg64, tmp_path / "real", to_real_layout, compression="gzip"),
                   copy_folder(tg64, tmp_path / "merged", tile_id_only)):
        batch = MMEarthDataset(folder, modalities=[*PRESETS["all_mod"], "sentinel2_scl"]).read_batch(range(10))
        assert batch["id"] == expected["id"]
        for name in expected:
            if name != "id":
                np.testing.assert_array_equal(batch[name], expected[name], err_msg=f"{folder.name} {name}")


def test_survives_pickling_and_fork(tg64: Path) -> None:
    dataset = MMEarthDataset(tg64)
    before = dataset[5]["sentinel1"]
    clone = pickle.loads(pickle.dumps(dataset))
    np.testing.assert_array_equal(clone[5]["sentinel1"], before)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        sums = pool.map(_s1_sum, [(dataset, i) for i in range(4)])
    np.testing.assert_allclose(sums, [float(dataset[i]["sentinel1"].sum()) for i in range(4)])


def _s1_sum(args: tuple[MMEarthDataset, int]) -> float:
    dataset, index = args
    return float(dataset[index]["sentinel1"].sum())


def test_index_out_of_range(tg64: Path) -> None:
    dataset = MMEarthDataset(tg64)
    with pytest.raises(IndexError, match="10 tiles"):
        dataset[10]
    with pytest.raises(IndexError):
        dataset.read_batch([0, 11])


# -- bad folders: every error names the file and the key ------------------------------------------------


def test_missing_file(tg64: Path, tmp_path: Path) -> None:
    folder = copy_folder(tg64, tmp_path / "f")
    (folder / f"{STEM}_splits.json").unlink()
    with pytest.raises(MMEarthFormatError, match=r"data_\*_splits.json.*found none"):
        MMEarthDataset(folder)


def test_extra_matching_file(tg64: Path, tmp_path: Path) -> None:
    folder = copy_folder(tg64, tmp_path / "f")
    shutil.copy(folder / f"{STEM}.h5", folder / "data_copy.h5")
    with pytest.raises(MMEarthFormatError, match=r"data_\*\.h5.*data_1M_v001_64\.h5.*data_copy\.h5"):
        MMEarthDataset(folder)


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(MMEarthFormatError, match="not a directory"):
        MMEarthDataset(tmp_path / "nowhere")


def test_missing_h5_dataset(tg64: Path, tmp_path: Path) -> None:
    folder = copy_folder(tg64, tmp_path / "f", lambda name, a: None if name == "aster" else a)
    with pytest.raises(MMEarthFormatError, match=r"data_1M_v001_64\.h5: missing dataset 'aster'"):
        MMEarthDataset(folder)
    assert len(MMEarthDataset(folder, modalities="S2")) == 10  # only what is selected must exist


def test_wrong_shape(tg64: Path, tmp_path: Path) -> None:
    folder = copy_folder(tg64, tmp_path / "f", lambda name, a: a[:, :7] if name == "sentinel1" else a)
    with pytest.raises(MMEarthFormatError, match=r"'sentinel1' has shape \(10, 7, 64, 64\); expected \(10, 8"):
        MMEarthDataset(folder)


def test_wrong_dtype(tg64: Path, tmp_path: Path) -> None:
    def as_float(name: str, array: np.ndarray) -> np.ndarray:
        return array.astype(np.float32) if name == "esa_worldcover" else array

    folder = copy_folder(tg64, tmp_path / "f", as_float)
    with pytest.raises(MMEarthFormatError, match="'esa_worldcover' has dtype float32; expected an unsigned"):
        MMEarthDataset(folder)


def test_split_index_out_of_range(tg64: Path, tmp_path: Path) -> None:
    folder = copy_folder(tg64, tmp_path / "f")
    edit_json(folder, "splits", lambda s: s["val"].append(10))
    assert len(MMEarthDataset(folder, split="train")) == 10
    with pytest.raises(MMEarthFormatError, match=r"_splits\.json: split 'val' holds index 10 outside the 10"):
        MMEarthDataset(folder, split="val")


def test_tile_id_absent_from_tile_info(tg64: Path, tmp_path: Path) -> None:
    folder = copy_folder(tg64, tmp_path / "f")
    edit_json(folder, "tile_info", lambda info: info.pop("3"))
    dataset = MMEarthDataset(folder)
    dataset[2]
    with pytest.raises(MMEarthFormatError, match=r"_tile_info\.json: no entry for tile id '3'"):
        dataset[3]


def test_band_stats_missing(tg64: Path, tmp_path: Path) -> None:
    folder = copy_folder(tg64, tmp_path / "f")
    edit_json(folder, "band_stats", lambda stats: stats.pop("aster"))
    with pytest.raises(MMEarthFormatError, match=r"_band_stats\.json: missing band statistics 'aster'"):
        MMEarthDataset(folder)


def test_band_stats_short_or_nan_for_a_selected_band(tg64: Path, tmp_path: Path) -> None:
    folder = copy_folder(tg64, tmp_path / "f")

    def break_stats(stats: dict) -> None:
        stats["sentinel1"]["std"] = stats["sentinel1"]["std"][:7]
        stats["sentinel2_l2a"]["mean"][10] = float("nan")  # B10 of L2A tiles, as in the real files

    edit_json(folder, "band_stats", break_stats)
    with pytest.raises(MMEarthFormatError, match=r"sentinel1\.std must list 8 values"):
        MMEarthDataset(folder, modalities=["sentinel1"])
    assert len(MMEarthDataset(folder, modalities="S2")) == 10  # B10 is not an input band
    with pytest.raises(MMEarthFormatError, match=r"sentinel2_l2a has no finite mean/std for .*\['B10'\]"):
        MMEarthDataset(folder, modalities={"sentinel2": ["B2", "B10"]})


@pytest.mark.parametrize("std", [0.0, -1.5])
def test_band_stats_non_positive_std_is_refused_like_nan(tg64: Path, tmp_path: Path, std: float) -> None:
    """z-scoring divides by std: 0 turned 69 % of a band into inf (then dropped as no-data) before."""
    folder = copy_folder(tg64, tmp_path / "f")

    def flatten(stats: dict) -> None:
        stats["sentinel1"]["std"][3] = std

    edit_json(folder, "band_stats", flatten)
    with pytest.raises(MMEarthFormatError, match=rf"_band_stats\.json: sentinel1\.std is {std} for band 'asc_HV'"):
        MMEarthDataset(folder, modalities=["sentinel1"])
    assert len(MMEarthDataset(folder, modalities={"sentinel1": ["asc_VV"]})) == 10  # unselected: not used


@pytest.mark.parametrize(("value", "found"), [
    (5, "5"), ([[1.0]] * 8, "a list of 8 item(s)"), (["1.0"] * 8, "a list of 8 item(s)"),
    (list(range(10**5)), "a list of 100000 item(s)"),
])
def test_band_stats_not_a_list_of_numbers(tg64: Path, tmp_path: Path, value: object, found: str) -> None:
    """A clear error that describes the bad value rather than printing it whole."""
    folder = copy_folder(tg64, tmp_path / "f")
    edit_json(folder, "band_stats", lambda stats: stats["sentinel1"].update(mean=value))
    with pytest.raises(MMEarthFormatError, match=r"sentinel1\.mean must list 8 values") as caught:
        MMEarthDataset(folder, modalities=["sentinel1"])
    assert str(caught.value).endswith(f"found {found}")


def test_wide_label_map_dtype_is_refused(tg64: Path, tmp_path: Path) -> None:
    """Codes index a table of every possible code: uint32 would need 32 GiB, uint64 cannot be built."""
    folder = copy_folder(tg64, tmp_path / "f", lambda name, a: a.astype(np.uint32) if name == "esa_worldcover" else a)
    with pytest.raises(MMEarthFormatError, match="'esa_worldcover' has dtype uint32; expected an unsigned integer "
                                                 "type of at most 16 bits"):
        MMEarthDataset(folder, modalities=["esa_worldcover"])


@pytest.mark.parametrize("damage", ["truncate", "text"])
def test_truncated_or_non_hdf5_file(tg64: Path, tmp_path: Path, damage: str) -> None:
    folder = copy_folder(tg64, tmp_path / "f")
    h5 = folder / f"{STEM}.h5"
    if damage == "truncate":
        h5.write_bytes(h5.read_bytes()[: h5.stat().st_size // 2])
    else:
        h5.write_text("not hdf5")
    with pytest.raises(MMEarthFormatError, match=r"data_1M_v001_64\.h5: cannot be read as HDF5"):
        MMEarthDataset(folder)


def test_only_present_processing_levels_need_sentinel2_stats(tg64: Path, tmp_path: Path) -> None:
    folder = copy_folder(tg64, tmp_path / "f")
    edit_json(folder, "band_stats", lambda stats: stats.pop("sentinel2_l1c"))
    with pytest.raises(MMEarthFormatError, match="missing band statistics 'sentinel2_l1c'"):
        MMEarthDataset(folder, modalities="S2")

    def all_l2a(info: dict) -> None:
        for entry in info.values():
            entry["S2_type"] = "l2a"

    edit_json(folder, "tile_info", all_l2a)
    expected = MMEarthDataset(tg64, modalities="S2")[0]["sentinel2"]  # tile 0 is L2A
    np.testing.assert_array_equal(MMEarthDataset(folder, modalities="S2")[0]["sentinel2"], expected)
