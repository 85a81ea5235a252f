"""GEO-Bench reader: z-scoring, band orders and substitutions, the restricted unpickler and clear errors for
bad folders, on a tiny generated m-bigearthnet task (tests/data/geobench_tiny/data.py; the reference's golden
outputs on real patches: tests/external/test_geobench_golden.py).

Synthetic task folders are written the way geobench's writer does (one HDF5 per sample whose attribute
``pickle`` holds ``str(pickle.dumps(metadata))``, a pickled ``task_specs.pkl``); the ``geobench.*``
class names are produced by stand-in modules placed in ``sys.modules`` while writing.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import sys
import types
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mpmae.data.geobench import (
    REFERENCE_FULL_BANDS,
    GeoBenchDataset,
    GeoBenchFormatError,
    canonical_band_name,
    resolve_bands,
    safe_loads,
    to_tensors,
)
from mpmae.modalities import SENTINEL2_INPUT_BANDS
from mpmae.tasks import TASKS, get_task

BEN = "m-bigearthnet"
SPLIT_SIZES = {"train": 4, "val": 1, "test": 1}


@pytest.fixture(scope="module")
def geobench_root(geobench_tiny: Path) -> Path:
    return geobench_tiny


@pytest.fixture
def ben_copy(geobench_root: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny m-bigearthnet folder; returns the GEO-Bench root of the copy."""
    folder = tmp_path / "classification_v1.0" / BEN
    shutil.copytree(geobench_root / "classification_v1.0" / BEN, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return tmp_path


# -- z-scoring and band orders ---------------------------------------------------------------------


@pytest.mark.parametrize("split", list(SPLIT_SIZES))
def test_reference_band_order_z_scores_the_files(geobench_root: Path, split: str) -> None:
    """Items are the files' bands in the reference order, z-scored in float64 with band_stats.json, then float32;
    labels the pickled multi-hot vectors."""
    folder = geobench_root / "classification_v1.0" / BEN
    names = json.loads((folder / "default_partition.json").read_text())["valid" if split == "val" else split]
    stats = json.loads((folder / "band_stats.json").read_text())
    ds = GeoBenchDataset(geobench_root, BEN, split, band_order="reference")
    assert len(ds) == SPLIT_SIZES[split]
    sources = list(ds.source_bands)
    assert [canonical_band_name(b) for b in sources] == list(REFERENCE_FULL_BANDS)
    mean = np.array([stats[b]["mean"] for b in sources])
    std = np.array([stats[b]["std"] for b in sources])
    x, y = ds.read_batch(range(len(ds)))
    assert x.dtype == np.float32 and y.dtype == np.int64 and y.shape == (len(ds), 43)
    for i, name in enumerate(names):
        with h5py.File(folder / f"{name}.hdf5") as h5:
            raw = np.stack([h5[b][()].astype(np.float64) for b in sources])
            label = safe_loads(_repr_bytes(h5.attrs["pickle"]))["label"]
        expected = ((raw - mean[:, None, None]) / std[:, None, None]).astype(np.float32)
        np.testing.assert_array_equal(x[i], expected)
        np.testing.assert_array_equal(y[i], label)
        item_x, item_y = ds[i]
        np.testing.assert_array_equal(item_x, expected)
        np.testing.assert_array_equal(item_y, label)
    assert ds.mean.dtype == np.float32 and ds.std.dtype == np.float32
    np.testing.assert_array_equal(ds.mean, mean.astype(np.float32))
    np.testing.assert_array_equal(ds.std, std.astype(np.float32))


def _repr_bytes(text: str) -> bytes:
    """The bytes whose repr GEO-Bench stores (a trusted, generated file here, so literal_eval is fine)."""
    value = ast.literal_eval(text)
    assert isinstance(value, bytes)
    return value


def test_canonical_order_swaps_b8_and_b8a(geobench_root: Path) -> None:
    ref = GeoBenchDataset(geobench_root, BEN, "train", band_order="reference")
    can = GeoBenchDataset(geobench_root, BEN, "train")
    assert can.bands == SENTINEL2_INPUT_BANDS
    swap = list(range(12))
    swap[7], swap[8] = 8, 7
    assert [ref.bands[i] for i in swap] == list(can.bands)
    np.testing.assert_array_equal(can.read_batch([0, 2])[0], ref.read_batch([0, 2])[0][:, swap])
    np.testing.assert_array_equal(can.mean, ref.mean[swap])
    assert can.source_bands[7:9] == ("08A - Vegetation Red Edge", "08 - NIR")


def test_model_card_band_list_selects_and_orders_channels(geobench_root: Path) -> None:
    card = {"bands": ["B4", "B3", "B2", "B8A"]}
    ds = GeoBenchDataset(geobench_root, BEN, "test", bands=card["bands"])
    ref = GeoBenchDataset(geobench_root, BEN, "test", band_order="reference")
    picks = [REFERENCE_FULL_BANDS.index(b) for b in card["bands"]]
    x, _ = ds[0]
    assert x.shape == (4, 120, 120)
    np.testing.assert_array_equal(x, ref[0][0][picks])
    np.testing.assert_array_equal(ds.std, ref.std[picks])
    bgr = GeoBenchDataset(geobench_root, BEN, "test", bands="bgr")
    assert bgr.source_bands == ("02 - Blue", "03 - Green", "04 - Red")


def test_presets_and_band_names() -> None:
    assert resolve_bands("full") == SENTINEL2_INPUT_BANDS
    assert resolve_bands("full", "reference") == REFERENCE_FULL_BANDS
    assert resolve_bands("rgb") == ("B4", "B3", "B2")
    assert resolve_bands(["B8A", "B1"]) == ("B8A", "B1")
    assert canonical_band_name("08A - Vegetation Red Edge") == "B8A"
    assert canonical_band_name("01 - Coastal aerosol") == "B1"
    assert canonical_band_name("10 - SWIR - Cirrus") == "B10"
    assert canonical_band_name("label") is None


def test_batch_to_tensors_and_pickling(geobench_root: Path) -> None:
    ds = GeoBenchDataset(geobench_root, BEN, "train")
    x, y = to_tensors(*ds.read_batch([3, 1]))
    assert x.dtype == torch.float32 and x.shape == (2, 12, 120, 120)
    assert y.dtype == torch.int64 and y.shape == (2, 43)
    clone = pickle.loads(pickle.dumps(ds))  # what Ray does to ship the dataset to workers
    np.testing.assert_array_equal(clone.read_batch([1])[0][0], x[1].numpy())


def test_root_defaults_to_geo_bench_dir(geobench_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEO_BENCH_DIR", str(geobench_root))
    assert len(GeoBenchDataset(None, BEN, "val")) == 1
    monkeypatch.delenv("GEO_BENCH_DIR")
    with pytest.raises(ValueError, match="GEO_BENCH_DIR"):
        GeoBenchDataset(None, BEN)


# -- synthetic folders: So2Sat substitutions, segmentation, multi-class labels ---------------------


class _Writer:
    """Writes GEO-Bench-format task folders with ``geobench.*`` class names in their pickles."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.classes: dict[str, type] = {}
        for module, names in {
            "geobench.dataset": ("Sentinel1", "Sentinel2", "SegmentationClasses"),
            "geobench.label": ("Classification",),
            "geobench.task": ("TaskSpecifications",),
        }.items():
            mod = types.ModuleType(module)
            for name in names:
                cls = type(name, (), {"__module__": module, "__qualname__": name})
                setattr(mod, name, cls)
                self.classes[name] = cls
            monkeypatch.setitem(sys.modules, module, mod)
        monkeypatch.setitem(sys.modules, "geobench", types.ModuleType("geobench"))

    def new(self, kind: str, **attrs) -> object:
        obj = self.classes[kind]()
        obj.__dict__.update(attrs)
        return obj

    def task(self, folder: Path, bands_info: list, label_type: object, stats: dict, partition: dict) -> None:
        folder.mkdir(parents=True)
        specs = self.new("TaskSpecifications", dataset_name=folder.name, bands_info=bands_info,
                         label_type=label_type)
        (folder / "task_specs.pkl").write_bytes(pickle.dumps(specs))
        stats_json = {name: {"mean": mean, "std": std} for name, (mean, std) in stats.items()}
        (folder / "band_stats.json").write_text(json.dumps(stats_json))
        (folder / "default_partition.json").write_text(json.dumps(partition))

    def sample(self, path: Path, bands: dict[str, tuple[object, np.ndarray]], label=None) -> None:
        meta: dict = {} if label is None else {"label": label}
        with h5py.File(path, "w") as h5:
            for name, (info, data) in bands.items():
                h5.create_dataset(name, data=data)
                meta[name] = {"date": None, "band_info": info, "transform": None, "crs": None}
            meta["bands_order"] = list(bands)
            h5.attrs["pickle"] = str(pickle.dumps(meta))


SO2SAT_S1 = ["01 - VH.Real", "02 - VH.Imaginary", "03 - VV.Real", "04 - VV.Imaginary"]
SO2SAT_S2 = ["02 - Blue", "03 - Green", "04 - Red", "05 - Vegetation Red Edge", "06 - Vegetation Red Edge",
             "07 - Vegetation Red Edge", "08 - NIR", "08A - Vegetation Red Edge", "11 - SWIR", "12 - SWIR"]


@pytest.fixture
def so2sat_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A 2-sample m-so2sat folder: no B1/B9, reflectance pixels, x10000 statistics, and Sentinel-1 bands
    listed last whose numbers ("02 - VH.Imaginary") must not be taken for Sentinel-2 bands."""
    writer = _Writer(monkeypatch)
    infos = [writer.new("Sentinel2", name=n) for n in SO2SAT_S2] + [writer.new("Sentinel1", name=n) for n in SO2SAT_S1]
    stats = {info.name: (1000.0 * (k + 1), 100.0 * (k + 1)) for k, info in enumerate(infos)}
    folder = tmp_path / "classification_v1.0" / "m-so2sat"
    writer.task(folder, infos, writer.new("Classification", n_classes=17, _class_names=None), stats,
                {"train": ["s0", "s1"], "valid": [], "test": []})
    for s, label in ((0, 16), (1, 3)):
        bands = {info.name: (info, np.full((32, 32), 0.01 * (k + 1) + s, np.float32)) for k, info in enumerate(infos)}
        writer.sample(folder / f"s{s}.hdf5", bands, label=label)
    return tmp_path


def test_so2sat_substitutes_b1_b9_and_divides_stats(so2sat_root: Path) -> None:
    ref = GeoBenchDataset(so2sat_root, "m-so2sat", band_order="reference")
    expected_sources = ("02 - Blue", "02 - Blue", *SO2SAT_S2[1:8], "08A - Vegetation Red Edge", *SO2SAT_S2[8:])
    assert ref.source_bands == expected_sources  # the reference's So2Sat list (docs/method.md, GEO-Bench data)
    can = GeoBenchDataset(so2sat_root, "m-so2sat")
    assert can.source_bands[7:9] == ("08A - Vegetation Red Edge", "08 - NIR")
    k = 0  # position of "02 - Blue" among the written bands: its pixels are 0.01 * (k + 1) + sample
    x, y = ref.read_batch([0, 1])
    mean, std = 1000.0 * (k + 1) / 10000, 100.0 * (k + 1) / 10000
    np.testing.assert_array_equal(x[1, 0], np.float32((np.float32(0.01 * (k + 1) + 1) - mean) / std))
    np.testing.assert_array_equal(x[:, 0], x[:, 1])  # B1 and B2 both read "02 - Blue"
    assert ref.mean[0] == np.float32(mean) and ref.std[0] == np.float32(std)
    assert y.dtype == np.int64 and y.shape == (2,) and y.tolist() == [16, 3]
    assert ref[1][1].shape == () and ref[1][1] == 3


def test_so2sat_missing_band_is_named(so2sat_root: Path) -> None:
    with pytest.raises(GeoBenchFormatError, match=r"task_specs.pkl.*no Sentinel-2 band 'B10'"):
        GeoBenchDataset(so2sat_root, "m-so2sat", bands=["B2", "B10"])


@pytest.fixture
def cashew_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    writer = _Writer(monkeypatch)
    names = ["02 - Blue", "03 - Green", "04 - Red"]
    infos = [writer.new("Sentinel2", name=n) for n in names]
    seg = writer.new("SegmentationClasses", name="label", n_classes=7)
    folder = tmp_path / "segmentation_v1.0" / "m-cashew-plant"
    writer.task(folder, infos, seg, {n: (10.0, 2.0) for n in names}, {"train": [], "valid": [], "test": ["t"]})
    label = (np.arange(256 * 256).reshape(256, 256) % 7).astype(np.int16)  # the task's 256 px images
    bands = {n: (info, np.full((256, 256), 12, np.int16)) for n, info in zip(names, infos, strict=True)}
    writer.sample(folder / "t.hdf5", {**bands, "label": (seg, label)})
    return tmp_path


def test_segmentation_label_map_and_alias(cashew_root: Path) -> None:
    ds = GeoBenchDataset(cashew_root, "m-cashew-plantation", "test", bands="bgr")
    assert ds.task is TASKS["m-cashew-plant"]
    x, y = ds[0]
    assert x.shape == (3, 256, 256) and np.all(x == 1.0)
    assert y.dtype == np.int64 and y.shape == (256, 256)
    np.testing.assert_array_equal(y, np.arange(256 * 256).reshape(256, 256) % 7)


# -- restricted unpickler --------------------------------------------------------------------------


class _RunsSystem:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_unpickler_refuses_code_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    handcrafted = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    with pytest.raises(pickle.UnpicklingError, match=r"os\.system"):
        safe_loads(handcrafted)
    with pytest.raises(pickle.UnpicklingError, match=r"posix\.system"):
        safe_loads(pickle.dumps(_RunsSystem(f"touch {marker}")))
    with pytest.raises(pickle.UnpicklingError, match=r"geobench\.dataset\.load_sample_hdf5"):
        safe_loads(b"cgeobench.dataset\nload_sample_hdf5\n.")
    with pytest.raises(pickle.UnpicklingError, match="object dtype"):
        safe_loads(pickle.dumps(np.array([1, None], dtype=object)))
    assert not marker.exists()


def test_unpickler_reads_arrays_and_legacy_module_names(monkeypatch: pytest.MonkeyPatch) -> None:
    array = safe_loads(pickle.dumps({"label": np.arange(5)}))["label"]
    np.testing.assert_array_equal(array, np.arange(5))
    legacy = types.ModuleType("ccb.io.dataset")  # geobench's former package name
    legacy.Sentinel2 = type("Sentinel2", (), {"__module__": "ccb.io.dataset"})
    for parent in ("ccb", "ccb.io"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, "ccb.io.dataset", legacy)
    info = legacy.Sentinel2()
    info.name = "02 - Blue"
    band = safe_loads(pickle.dumps(info))
    assert band.kind == "Sentinel2" and band.name == "02 - Blue"


def test_malicious_task_specs_is_refused_naming_the_file(ben_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = ben_copy / "classification_v1.0" / BEN
    (folder / "task_specs.pkl").write_bytes(pickle.dumps(_RunsSystem(f"touch {marker}")))
    with pytest.raises(GeoBenchFormatError, match=r"task_specs\.pkl.*refusing.*posix\.system"):
        GeoBenchDataset(ben_copy, BEN)
    assert not marker.exists()


def test_malicious_sample_metadata_is_refused_naming_the_file(ben_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = ben_copy / "classification_v1.0" / BEN / "id_0004.hdf5"
    with h5py.File(path, "a") as h5:
        h5.attrs["pickle"] = str(pickle.dumps(_RunsSystem(f"touch {marker}")))
    ds = GeoBenchDataset(ben_copy, BEN, "val")
    with pytest.raises(GeoBenchFormatError, match=r"id_0004\.hdf5.*refusing"):
        ds[0]
    assert not marker.exists()


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "m-nope"}, r"unknown GEO-Bench task 'm-nope'.*m-bigearthnet"),
        ({"split": "validation"}, r"unknown split.*'val'"),
        ({"partition": "0.3x_train"}, r"unknown partition.*0\.01x_train"),
        ({"bands": "all"}, r"unknown band set 'all'.*'bgr'"),
        ({"bands": ["B2", "B08"]}, r"unknown Sentinel-2 band\(s\) \['B08'\].*'B8A'"),
        ({"bands": ["B2"], "band_order": "reference"}, r"band presets only"),
        ({"band_order": "file"}, r"unknown band_order 'file'"),
    ],
)
def test_invalid_arguments_list_valid_values(geobench_root: Path, kwargs: dict, message: str) -> None:
    kwargs = {"task": BEN, **kwargs}
    with pytest.raises(ValueError, match=message):
        GeoBenchDataset(geobench_root, **kwargs)


def test_get_task_registry() -> None:
    assert get_task("m-so2sat").num_classes == 17
    assert get_task("m-cashew-plantation").name == "m-cashew-plant"
    assert {t.benchmark for t in TASKS.values()} == {"classification_v1.0", "segmentation_v1.0"}


def test_missing_partition_file_is_named(geobench_root: Path) -> None:
    with pytest.raises(GeoBenchFormatError, match=r"0\.01x_train_partition\.json: partition file missing.*default"):
        GeoBenchDataset(geobench_root, BEN, partition="0.01x_train")


def test_missing_task_folder(tmp_path: Path) -> None:
    with pytest.raises(GeoBenchFormatError, match=r"classification_v1\.0/m-eurosat: not a directory"):
        GeoBenchDataset(tmp_path, "m-eurosat")


def test_missing_sample_file_is_named(ben_copy: Path) -> None:
    (ben_copy / "classification_v1.0" / BEN / "id_0002.hdf5").unlink()
    with pytest.raises(GeoBenchFormatError, match=r"default_partition\.json: 1 sample.*id_0002\.hdf5"):
        GeoBenchDataset(ben_copy, BEN, "train")
    assert len(GeoBenchDataset(ben_copy, BEN, "test")) == 1


def test_truncated_hdf5_is_named(ben_copy: Path) -> None:
    path = ben_copy / "classification_v1.0" / BEN / "id_0005.hdf5"
    with open(path, "r+b") as f:
        f.truncate(1000)
    ds = GeoBenchDataset(ben_copy, BEN, "test")
    with pytest.raises(GeoBenchFormatError, match=r"id_0005\.hdf5: cannot be read as HDF5"):
        ds[0]


def test_missing_band_in_sample_is_named(ben_copy: Path) -> None:
    path = ben_copy / "classification_v1.0" / BEN / "id_0005.hdf5"
    with h5py.File(path, "a") as h5:
        del h5["09 - Water vapour"]
    ds = GeoBenchDataset(ben_copy, BEN, "test")
    with pytest.raises(GeoBenchFormatError, match=r"id_0005\.hdf5: missing band '09 - Water vapour'"):
        ds[0]
    assert GeoBenchDataset(ben_copy, BEN, "test", bands="rgb")[0][0].shape == (3, 120, 120)


def test_class_count_mismatch_with_task_specs(ben_copy: Path) -> None:
    source = ben_copy / "classification_v1.0" / BEN
    fake = ben_copy / "classification_v1.0" / "m-eurosat"
    shutil.copytree(source, fake)
    with pytest.raises(GeoBenchFormatError, match=r"task_specs\.pkl: label type has n_classes=43.*expects 10"):
        GeoBenchDataset(ben_copy, "m-eurosat")
