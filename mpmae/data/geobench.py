"""GEO-Bench v1.0 task folders: the task registry, a restricted unpickler and the (batched) reader.

A task folder ``$GEO_BENCH_DIR/{classification|segmentation}_v1.0/<task>/`` holds one ``<sample>.hdf5``
per sample (one 2-D dataset per band, plus a ``label`` dataset for segmentation), ``band_stats.json``
(per-band mean/std keyed by GEO-Bench band name, e.g. ``08A - Vegetation Red Edge``),
``<partition>_partition.json`` (train/valid/test sample names) and ``task_specs.pkl``. Sample metadata
(band infos and, for classification, the label) is a pickle stored as the ``repr`` of its bytes in the
HDF5 attribute ``pickle``.

Pickles are code, and the ``geobench`` package that wrote them pins numpy<2, so both pickles are read by
:class:`GeoBenchUnpickler`, which builds inert stand-ins for the GEO-Bench metadata classes and refuses
every other global.

Items follow the reference loader (spec 5.2): channels picked by band name, z-scored in float64 with the
task's ``band_stats.json`` (So2Sat: stats divided by 10000), then cast to float32. Channels are named by
canonical Sentinel-2 names (``B8A``), in the project's canonical order by default (B8A before B8, spec 7
item 1); ``band_order="reference"`` gives the reference's order, and an explicit band list (a model
card's) is used as given.
"""

from __future__ import annotations

import ast
import collections
import datetime
import io
import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch

from mpmae.modalities import SENTINEL2_BANDS, SENTINEL2_BGR_BANDS, SENTINEL2_INPUT_BANDS

try:  # numpy >= 2 (numpy 1.26 also ships these modules for reading numpy 2 pickles)
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy < 1.26
    from numpy.core import multiarray as _multiarray
    from numpy.core import numeric as _numeric

Kind = Literal["multilabel", "multiclass", "segmentation"]

SPLITS = {"train": "train", "val": "valid", "valid": "valid", "test": "test"}
PARTITIONS = (
    "default", "0.01x_train", "0.02x_train", "0.05x_train", "0.10x_train", "0.20x_train", "0.50x_train",
    "1.00x_train",
)
BAND_ORDERS = ("canonical", "reference")

#: The reference's fine-tuning order (``BAND_NAMES_v1_full.json``): B8 before B8A, unlike pretraining.
REFERENCE_FULL_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
#: Named band sets; ``full`` is in canonical order unless ``band_order="reference"``.
BAND_PRESETS: dict[str, tuple[str, ...]] = {
    "full": SENTINEL2_INPUT_BANDS,
    "bgr": SENTINEL2_BGR_BANDS,
    "rgb": ("B4", "B3", "B2"),
}


class GeoBenchFormatError(ValueError):
    """A folder, file, key or value does not match the GEO-Bench v1.0 format."""


# -- task registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GeoBenchTask:
    """One GEO-Bench task as MMEarth evaluates it (spec 5.1, 5.2).

    ``substitutes`` maps a Sentinel-2 band the task lacks to the band read in its place; the stored
    mean/std are divided by ``stats_divisor`` (So2Sat's pixels are reflectances, its stats x10000).
    """

    name: str
    benchmark: str
    kind: Kind
    num_classes: int
    image_size: int  # native side in pixels, informational
    substitutes: tuple[tuple[str, str], ...] = ()
    stats_divisor: float = 1.0


# m-eurosat and m-brick-kiln: upstream geo-bench reports that their stored band names do not match the
# pixel channels (geo-bench issues #28, #29); like the reference, this reader trusts the stored names.
TASKS: dict[str, GeoBenchTask] = {
    t.name: t
    for t in (
        GeoBenchTask("m-bigearthnet", "classification_v1.0", "multilabel", 43, 120),
        GeoBenchTask("m-so2sat", "classification_v1.0", "multiclass", 17, 32,
                     substitutes=(("B1", "B2"), ("B9", "B8A")), stats_divisor=10000.0),
        GeoBenchTask("m-eurosat", "classification_v1.0", "multiclass", 10, 64),
        GeoBenchTask("m-brick-kiln", "classification_v1.0", "multiclass", 2, 64),
        GeoBenchTask("m-cashew-plant", "segmentation_v1.0", "segmentation", 7, 256),
        GeoBenchTask("m-SA-crop-type", "segmentation_v1.0", "segmentation", 10, 256),
    )
}
#: The paper and the reference's docs call m-cashew-plant "m-cashew-plantation" (spec 7 item 23).
TASK_ALIASES = {"m-cashew-plantation": "m-cashew-plant"}


def get_task(name: str) -> GeoBenchTask:
    """The registry entry for ``name`` (or an alias); raises ``ValueError`` listing the valid names."""
    task = TASKS.get(TASK_ALIASES.get(name, name))
    if task is None:
        raise ValueError(
            f"unknown GEO-Bench task {name!r}; valid tasks: {list(TASKS)} (aliases: {TASK_ALIASES})"
        )
    return task


def resolve_bands(bands: str | Sequence[str], band_order: str = "canonical") -> tuple[str, ...]:
    """Canonical Sentinel-2 names of the channels, in channel order.

    ``bands`` is a preset (``full``, ``bgr``, ``rgb``) or an explicit list such as a model card's
    ``bands``, which is used as given; ``band_order`` only orders the ``full`` preset.
    """
    if band_order not in BAND_ORDERS:
        raise ValueError(f"unknown band_order {band_order!r}; valid: {list(BAND_ORDERS)}")
    if isinstance(bands, str):
        if bands not in BAND_PRESETS:
            raise ValueError(
                f"unknown band set {bands!r}; valid presets: {list(BAND_PRESETS)}, or a list of "
                f"Sentinel-2 band names from {list(SENTINEL2_BANDS)}"
            )
        if bands == "full" and band_order == "reference":
            return REFERENCE_FULL_BANDS
        return BAND_PRESETS[bands]
    if band_order != "canonical":
        raise ValueError("band_order applies to band presets only; an explicit band list is used as given")
    names = tuple(bands)
    unknown = [b for b in names if b not in SENTINEL2_BANDS]
    if unknown or not names:
        raise ValueError(
            f"unknown Sentinel-2 band(s) {unknown or 'none given'}; valid bands: {list(SENTINEL2_BANDS)}"
        )
    return names


def canonical_band_name(geobench_name: str) -> str | None:
    """``08A - Vegetation Red Edge`` -> ``B8A``; None when the name is not a Sentinel-2 band number."""
    match = re.match(r"(\d{1,2})(A?) - ", geobench_name)
    if match is None:
        return None
    name = f"B{int(match.group(1))}{match.group(2)}"
    return name if name in SENTINEL2_BANDS else None


# -- restricted unpickling --------------------------------------------------------------------------


class GeoBenchObject:
    """Inert stand-in for a pickled GEO-Bench metadata object: attributes only, no behaviour.

    The pickled class name is the stand-in's class name (see :attr:`kind`); constructor arguments, if
    the pickle passes any, are kept in ``args`` and non-dict state in ``state``.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> GeoBenchObject:
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state

    @property
    def kind(self) -> str:
        return type(self).__name__

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if k != "args")
        return f"{self.kind}({fields})"


#: Modules GEO-Bench metadata has been pickled under (``ccb.io`` is the package's former name).
_GEOBENCH_MODULES = frozenset({
    "geobench", "geobench.dataset", "geobench.label", "geobench.task",
    "geobench.io", "geobench.io.dataset", "geobench.io.label", "geobench.io.task",
    "ccb.io", "ccb.io.dataset", "ccb.io.label", "ccb.io.task",
})
#: The data classes of GEO-Bench's metadata: task specs, band infos and label types.
_GEOBENCH_CLASSES = (
    "TaskSpecifications", "BandInfo", "SpectralBand", "Sentinel1", "Sentinel2", "Landsat8", "Mask",
    "CloudProbability", "ElevationBand", "MultiBand", "HyperSpectralBands", "SegmentationClasses",
    "Classification", "MultiLabelClassification", "SemanticSegmentation",
)
_STAND_INS: dict[str, type[GeoBenchObject]] = {
    name: type(name, (GeoBenchObject,), {"__module__": __name__}) for name in _GEOBENCH_CLASSES + ("Affine", "CRS")
}


def _checked_dtype(*args: Any) -> np.dtype:
    """A dtype that holds no Python objects: numpy restores object arrays by calling pickle itself."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing a numpy object dtype in GEO-Bench metadata")
    return dtype


class _NdarrayToken:
    """What ``numpy.ndarray`` unpickles to: only accepted as ``_reconstruct``'s subtype, never called."""


_NDARRAY = _NdarrayToken()


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    if subtype is not _NDARRAY:
        raise pickle.UnpicklingError("numpy _reconstruct is only allowed for plain numpy.ndarray")
    return _multiarray._reconstruct(np.ndarray, shape, _checked_dtype(dtype))


def _scalar(dtype: Any, *args: Any) -> Any:
    return _multiarray.scalar(_checked_dtype(dtype), *args)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _numeric._frombuffer(buffer, _checked_dtype(dtype), shape, order)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _checked_dtype,
    **{(f"numpy.{core}.multiarray", "_reconstruct"): _reconstruct for core in ("core", "_core")},
    **{(f"numpy.{core}.multiarray", "scalar"): _scalar for core in ("core", "_core")},
    **{(f"numpy.{core}.numeric", "_frombuffer"): _frombuffer for core in ("core", "_core")},
    ("datetime", "date"): datetime.date,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "time"): datetime.time,
    ("datetime", "timedelta"): datetime.timedelta,
    ("datetime", "timezone"): datetime.timezone,
    ("collections", "OrderedDict"): collections.OrderedDict,
    # Georeferencing of a band (``transform``, ``crs``); unused here, so inert stand-ins.
    ("affine", "Affine"): _STAND_INS["Affine"],
    ("rasterio.crs", "CRS"): _STAND_INS["CRS"],
}


class GeoBenchUnpickler(pickle.Unpickler):
    """Reads GEO-Bench metadata pickles without the ``geobench`` package and without running their code.

    GEO-Bench classes become :class:`GeoBenchObject` stand-ins; numpy arrays (no object dtype), dates
    and georeferencing stand-ins are allowed; any other global raises ``pickle.UnpicklingError``.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module in _GEOBENCH_MODULES and name in _GEOBENCH_CLASSES:
            return _STAND_INS[name]
        raise pickle.UnpicklingError(
            f"refusing to unpickle global {module}.{name}: only GEO-Bench metadata classes, numpy arrays "
            f"and dates are allowed (pickles are code)"
        )


def safe_loads(data: bytes) -> Any:
    """Unpickle GEO-Bench metadata with :class:`GeoBenchUnpickler`."""
    return GeoBenchUnpickler(io.BytesIO(data)).load()


def _loads_from(path: Path, data: bytes, what: str) -> Any:
    """:func:`safe_loads`, with any failure (refused global, corrupt bytes) reported against ``path``."""
    try:
        return safe_loads(data)
    except Exception as err:
        raise GeoBenchFormatError(f"{path}: cannot read {what}: {err}") from None


def load_task_specs(path: Path | str) -> GeoBenchObject:
    """``task_specs.pkl`` as a ``TaskSpecifications`` stand-in."""
    path = Path(path)
    if not path.is_file():
        raise GeoBenchFormatError(f"{path}: missing (expected the pickled GEO-Bench task specifications)")
    specs = _loads_from(path, path.read_bytes(), "pickled task specifications")
    if not isinstance(specs, GeoBenchObject) or specs.kind != "TaskSpecifications":
        raise GeoBenchFormatError(f"{path}: holds {type(specs).__name__}; expected a TaskSpecifications")
    return specs


# -- folder contents --------------------------------------------------------------------------------


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise GeoBenchFormatError(f"{path}: missing")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise GeoBenchFormatError(f"{path}: not valid JSON ({err})") from None


@dataclass(frozen=True)
class _TaskInfo:
    """What this reader uses from ``task_specs.pkl``: Sentinel-2 band names and class names."""

    s2_names: dict[str, str]  # canonical name -> GEO-Bench band name
    class_names: tuple[str, ...] | None


def _task_info(folder: Path, task: GeoBenchTask) -> _TaskInfo:
    path = folder / "task_specs.pkl"
    specs = load_task_specs(path)
    label_type = getattr(specs, "label_type", None)
    n_classes = getattr(label_type, "n_classes", None)
    if n_classes != task.num_classes:
        raise GeoBenchFormatError(
            f"{path}: label type has n_classes={n_classes!r}; task {task.name!r} expects {task.num_classes}"
        )
    s2_names: dict[str, str] = {}
    for info in getattr(specs, "bands_info", None) or []:
        canonical = canonical_band_name(str(getattr(info, "name", "")))
        if isinstance(info, GeoBenchObject) and info.kind == "Sentinel2" and canonical:
            s2_names[canonical] = info.name
    names = next((getattr(label_type, a) for a in ("_class_names", "class_names", "class_name")
                  if getattr(label_type, a, None) is not None), None)
    return _TaskInfo(s2_names, tuple(names) if names is not None else None)


def _source_bands(folder: Path, task: GeoBenchTask, info: _TaskInfo, bands: Sequence[str]) -> tuple[str, ...]:
    """GEO-Bench band names read for each channel, after the task's substitutions."""
    substitutes = dict(task.substitutes)
    names = []
    for band in bands:
        source = substitutes.get(band, band)
        if source not in info.s2_names:
            raise GeoBenchFormatError(
                f"{folder / 'task_specs.pkl'}: task {task.name!r} has no Sentinel-2 band {source!r}"
                f"{f' (substitute for {band})' if source != band else ''}; its Sentinel-2 bands: "
                f"{list(info.s2_names)}"
            )
        names.append(info.s2_names[source])
    return tuple(names)


def _band_stats(folder: Path, task: GeoBenchTask, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and std of each channel, shaped (C, 1, 1), divided by the task's ``stats_divisor``."""
    path = folder / "band_stats.json"
    stats = _load_json(path)
    means, stds = [], []
    for name in names:
        entry = stats.get(name) if isinstance(stats, Mapping) else None
        mean = entry.get("mean") if isinstance(entry, Mapping) else None
        std = entry.get("std") if isinstance(entry, Mapping) else None
        if not isinstance(mean, int | float) or not isinstance(std, int | float) or not std > 0:
            raise GeoBenchFormatError(
                f"{path}: band {name!r} needs a numeric 'mean' and a positive 'std', found {entry!r:.120}"
            )
        means.append(float(mean))
        stds.append(float(std))
    shape = (len(names), 1, 1)
    # Divided in float64 as the reference does, so that inputs match it bit for bit.
    return (np.asarray(means).reshape(shape) / task.stats_divisor,
            np.asarray(stds).reshape(shape) / task.stats_divisor)


def _partition_names(folder: Path, partition: str, split: str) -> list[str]:
    path = folder / f"{partition}_partition.json"
    if not path.is_file():
        present = sorted(p.name.removesuffix("_partition.json") for p in folder.glob("*_partition.json"))
        raise GeoBenchFormatError(f"{path}: partition file missing; partitions present: {present}")
    content = _load_json(path)
    key = SPLITS[split]
    names = content.get(key) if isinstance(content, Mapping) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        found = sorted(content) if isinstance(content, Mapping) else type(content).__name__
        raise GeoBenchFormatError(f"{path}: expected key {key!r} with a list of sample names; found {found}")
    missing = [n for n in names if not (folder / f"{n}.hdf5").is_file()]
    if missing:
        raise GeoBenchFormatError(
            f"{path}: {len(missing)} sample(s) of split {key!r} have no file, e.g. {folder / missing[0]}.hdf5"
        )
    return names


def _sample_metadata(path: Path, h5: h5py.File) -> dict[str, Any]:
    """The pickled metadata dict of a sample: ``bands_order``, per-band attributes and maybe ``label``."""
    raw = h5.attrs.get("pickle")
    if raw is None:
        raise GeoBenchFormatError(f"{path}: missing HDF5 attribute 'pickle' (GEO-Bench sample metadata)")
    try:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        data = ast.literal_eval(text)
    except (ValueError, SyntaxError, UnicodeDecodeError):
        data = None
    if not isinstance(data, bytes):
        raise GeoBenchFormatError(f"{path}: attribute 'pickle' is not the repr of pickled bytes: {raw!r:.80}")
    meta = _loads_from(path, data, "attribute 'pickle'")
    if not isinstance(meta, dict):
        raise GeoBenchFormatError(f"{path}: attribute 'pickle' holds {type(meta).__name__}; expected a dict")
    return meta


def _dataset_names(h5: h5py.File, meta: Mapping[str, Any]) -> dict[str, str]:
    """GEO-Bench band name -> HDF5 dataset name (datasets may carry a date suffix); first date wins."""
    names: dict[str, str] = {}
    for dataset in meta.get("bands_order", list(h5.keys())):
        attrs = meta.get(dataset)
        info = attrs.get("band_info") if isinstance(attrs, dict) else None
        names.setdefault(getattr(info, "name", dataset), dataset)
    return names


def open_h5(path: Path) -> h5py.File:
    """Open a sample read-only, turning h5py's OSError into an error that names the file."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise GeoBenchFormatError(f"{path}: cannot be read as HDF5 (missing, truncated or not HDF5: {err})") from None


# -- dataset ----------------------------------------------------------------------------------------


class GeoBenchDataset:
    """One split of a GEO-Bench v1.0 task as a map-style dataset of ``(x, y)`` numpy pairs.

    ``x`` is float32 (C, H, W), z-scored; ``y`` is int64: a (num_classes,) 0/1 vector for multi-label
    tasks, a scalar class for multi-class tasks, an (H, W) class map for segmentation. ``root`` is the
    GEO-Bench directory (default ``$GEO_BENCH_DIR``); ``split`` is ``train``, ``val`` (``valid``) or
    ``test``; ``bands`` and ``band_order`` as in :func:`resolve_bands`. Samples are opened per read, so
    the object pickles to Ray workers and forks into loader processes.
    """

    def __init__(
        self,
        root: Path | str | None,
        task: str,
        split: str = "train",
        *,
        partition: str = "default",
        bands: str | Sequence[str] = "full",
        band_order: str = "canonical",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
        if partition not in PARTITIONS:
            raise ValueError(f"unknown partition {partition!r}; valid partitions: {list(PARTITIONS)}")
        self.task = get_task(task)
        self.split = split
        self.partition = partition
        self.bands = resolve_bands(bands, band_order)
        self.folder = _task_folder(root, self.task)
        info = _task_info(self.folder, self.task)
        self.class_names = info.class_names
        self.source_bands = _source_bands(self.folder, self.task, info, self.bands)
        self._mean64, self._std64 = _band_stats(self.folder, self.task, self.source_bands)
        self.sample_names = _partition_names(self.folder, partition, split)

    @property
    def mean(self) -> np.ndarray:
        """float32 (C,) mean of each channel, as the reference returns it (So2Sat: already /10000)."""
        return self._mean64.ravel().astype(np.float32)

    @property
    def std(self) -> np.ndarray:
        """float32 (C,) std of each channel."""
        return self._std64.ravel().astype(np.float32)

    def __len__(self) -> int:
        return len(self.sample_names)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for the {len(self)} samples of split {self.split!r}")
        x, y = self.read_batch([index % len(self)])
        return x[0], y[0]

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Samples ``indices`` (positions in the split) stacked: x float32 (N, C, H, W), y int64 (N, ...)."""
        positions = np.asarray(indices, dtype=np.int64).reshape(-1)
        if not positions.size:
            raise ValueError("read_batch needs at least one index")
        if positions.min() < 0 or positions.max() >= len(self):
            raise IndexError(f"indices out of range for the {len(self)} samples of split {self.split!r}")
        names = [self.sample_names[i] for i in positions]
        pairs = [self._read_sample(name) for name in names]
        sizes = {name: p[0].shape[1:] for name, p in zip(names, pairs, strict=True)}
        if len(set(sizes.values())) > 1:
            raise GeoBenchFormatError(f"{self.folder}: samples of different sizes cannot be batched: {sizes}")
        raw = np.stack([p[0] for p in pairs])
        # float64 arithmetic, then float32, as the reference does.
        x = ((raw - self._mean64) / self._std64).astype(np.float32)
        return x, np.stack([p[1] for p in pairs])

    def _read_sample(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.folder / f"{name}.hdf5"
        with open_h5(path) as h5:
            meta = _sample_metadata(path, h5)
            datasets = _dataset_names(h5, meta)
            try:
                planes = [_read_2d(path, h5, datasets, band) for band in self.source_bands]
                label = _read_label(path, h5, meta, datasets, self.task)
            except OSError as err:  # a corrupt chunk in a file whose header is intact
                raise GeoBenchFormatError(f"{path}: cannot read band data ({err})") from None
        shapes = {p.shape for p in planes} | ({label.shape} if label.ndim == 2 else set())
        if len(shapes) > 1:
            raise GeoBenchFormatError(f"{path}: bands (and label map) differ in size: {sorted(shapes)}")
        return np.stack(planes), label


def _task_folder(root: Path | str | None, task: GeoBenchTask) -> Path:
    if root is None:
        root = os.environ.get("GEO_BENCH_DIR")
        if not root:
            raise ValueError("no GEO-Bench root given and $GEO_BENCH_DIR is not set")
    folder = Path(root) / task.benchmark / task.name
    if not folder.is_dir():
        raise GeoBenchFormatError(f"{folder}: not a directory (expected the GEO-Bench folder of {task.name!r})")
    return folder


def _read_2d(path: Path, h5: h5py.File, datasets: Mapping[str, str], band: str) -> np.ndarray:
    """One band (or the label map) of a sample as a 2-D array."""
    name = datasets.get(band)
    if name is None or name not in h5:
        raise GeoBenchFormatError(f"{path}: missing band {band!r}; bands present: {list(datasets)}")
    data = h5[name][()]
    if data.ndim != 2:
        raise GeoBenchFormatError(f"{path}: dataset {name!r} has shape {data.shape}; expected (H, W)")
    return data


def _read_label(
    path: Path, h5: h5py.File, meta: Mapping[str, Any], datasets: Mapping[str, str], task: GeoBenchTask
) -> np.ndarray:
    """The label as int64: a dataset for segmentation, the metadata's ``label`` otherwise."""
    if task.kind == "segmentation":
        label = _read_2d(path, h5, datasets, "label")
    elif "label" not in meta:
        raise GeoBenchFormatError(f"{path}: sample metadata has no 'label'")
    else:
        label = meta["label"]
    try:
        label = np.asarray(label).astype(np.int64)
    except (TypeError, ValueError):
        raise GeoBenchFormatError(f"{path}: label {label!r:.80} is not numeric") from None
    _check_label(path, task, label)
    return label


def _check_label(path: Path, task: GeoBenchTask, label: np.ndarray) -> None:
    n = task.num_classes
    in_range = bool(label.size) and 0 <= label.min() and label.max() < n
    if task.kind == "multilabel":
        ok, expected = label.shape == (n,) and bool(np.isin(label, (0, 1)).all()), f"a 0/1 vector of length {n}"
    elif task.kind == "multiclass":
        ok, expected = label.shape == () and in_range, f"one class index in 0..{n - 1}"
    else:
        ok, expected = label.ndim == 2 and in_range, f"an (H, W) map of class indices in 0..{n - 1}"
    if not ok:
        raise GeoBenchFormatError(
            f"{path}: {task.kind} label of shape {label.shape} ({label!r:.60}) is invalid; expected {expected}"
        )


def to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A :meth:`GeoBenchDataset.read_batch` result as torch tensors (no copy)."""
    return torch.from_numpy(x), torch.from_numpy(y)
