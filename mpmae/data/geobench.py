"""GEO-Bench v1.0 task folders: the task registry, a restricted unpickler and the (batched) reader.

A task folder ``$GEO_BENCH_DIR/{classification|segmentation}_v1.0/<task>/`` holds one ``<sample>.hdf5``
per sample (one 2-D dataset per band, plus a ``label`` dataset for segmentation), ``band_stats.json``
(per-band mean/std keyed by GEO-Bench band name, e.g. ``08A - Vegetation Red Edge``),
``<partition>_partition.json`` (train/valid/test sample names) and ``task_specs.pkl``. Sample metadata
(band infos and, for classification, the label) is a pickle stored as the ``repr`` of its bytes in the
HDF5 attribute ``pickle``.

Pickles are code, and the ``geobench`` package that wrote them pins numpy<2, so both pickles are read by
:class:`GeoBenchUnpickler`, which builds inert stand-ins for the GEO-Bench metadata classes and refuses
every other global. Every file is untrusted: a band's declared shape, dtype and storage are checked from
the HDF5 metadata before it is read (the task's image size, data inside the file), a label's type and
length before it is converted, and error messages describe file-supplied values without ``repr``-ing them.

Items follow the reference loader (docs/method.md): channels picked by band name, z-scored in float64 with the
task's ``band_stats.json`` (So2Sat: stats divided by 10000), then cast to float32. Channels are named by
canonical Sentinel-2 names (``B8A``), in the project's canonical order by default (B8A before B8,
docs/method.md, D1); ``band_order="reference"`` gives the reference's order, and an explicit band list (a model
card's) is used as given.
"""

from __future__ import annotations

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
from typing import Any

import h5py
import numpy as np
import torch

from mpmae.modalities import SENTINEL2_BANDS, SENTINEL2_BGR_BANDS, SENTINEL2_INPUT_BANDS
from mpmae.tasks import PARTITIONS, GeoBenchTask, get_task

try:  # numpy >= 2 (numpy 1.26 also ships these modules for reading numpy 2 pickles)
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy < 1.26
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]

SPLIT_FOLDERS = {"train": "train", "val": "valid", "valid": "valid", "test": "test"}
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

#: How much of a file-supplied string an error message shows.
_BRIEF = 60


def _brief(value: Any) -> str:
    """A bounded description of a value for an error message: a short repr, else its type and size.

    Pickled values are untrusted: a 170-byte pickle can hold a list whose ``repr`` never ends.
    """
    if value is None or isinstance(value, bool | float):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"an int of {value.bit_length()} bits"
    if isinstance(value, str | bytes):
        return repr(value[:_BRIEF]) + ("..." if len(value) > _BRIEF else "")
    if isinstance(value, np.ndarray):
        return f"a numpy array of shape {value.shape} and dtype {value.dtype.str}"
    if isinstance(value, np.bool_ | np.integer | np.floating):
        return _brief(value.item())
    if isinstance(value, np.generic):
        return f"a numpy {value.dtype.str} scalar"
    if isinstance(value, GeoBenchObject):
        return f"a {value.kind} object"
    if isinstance(value, list | tuple | dict | set | frozenset):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


class GeoBenchObject:
    """Inert stand-in for a pickled GEO-Bench metadata object: attributes only, no behaviour.

    The pickled class name is the stand-in's class name (see :attr:`kind`); constructor arguments, if
    the pickle passes any, are kept in ``args`` and non-dict state in ``state``.
    """

    args: tuple[Any, ...]

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
        fields = ", ".join(f"{k}={_brief(v)}" for k, v in list(self.__dict__.items())[:20] if k != "args")
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


def _check_dtype(dtype: Any) -> np.dtype:
    """``dtype`` when it is a plain bool, integer or float dtype; refuses anything else.

    numpy restores object arrays by calling pickle itself, and a structured dtype's field offsets address
    memory: GEO-Bench metadata needs neither.
    """
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError(f"expected a numpy dtype, found {_brief(dtype)}")
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.hasobject or dtype.subdtype is not None:
        what = "an object dtype" if dtype.hasobject else "not a plain bool, integer or float dtype"
        raise pickle.UnpicklingError(f"refusing numpy dtype {dtype.str!r} in GEO-Bench metadata ({what})")
    return dtype


def _same_plain(value: Any, expected: Any) -> bool:
    """``value == expected`` for tuples of ints, strings and None, without calling a pickled object's ``==``."""
    if type(value) is not type(expected):
        return False
    if isinstance(expected, tuple):
        return len(value) == len(expected) and all(map(_same_plain, value, expected))
    return bool(value == expected)


def _checked_dtype(code: Any, align: Any = False, copy: Any = False) -> np.dtype:
    """``numpy.dtype`` for a plain type code such as ``'i8'`` (never a list or dict that builds fields)."""
    if not isinstance(code, str) or len(code) > 8 or type(align) is not bool or type(copy) is not bool:
        raise pickle.UnpicklingError(f"refusing numpy dtype built from {_brief(code)}: only type codes such as 'i8'")
    try:
        dtype = np.dtype(code, align, copy)
    except TypeError:
        raise pickle.UnpicklingError(f"unknown numpy dtype code {code!r}") from None
    return _check_dtype(dtype)


class _NdarrayToken:
    """What ``numpy.ndarray`` unpickles to: only accepted as ``_reconstruct``'s subtype, never called."""


_NDARRAY = _NdarrayToken()


def _reconstruct(subtype: Any, shape: Any, code: Any) -> np.ndarray:
    """The empty array numpy's pickles start from; its contents come from a checked BUILD."""
    if subtype is not _NDARRAY or not _same_plain(shape, (0,)) or not _same_plain(code, b"b"):
        raise pickle.UnpicklingError("numpy _reconstruct is only allowed as numpy pickles an ndarray")
    return _multiarray._reconstruct(np.ndarray, (0,), b"b")  # type: ignore[return-value]  # stub: -> object


def _scalar(dtype: Any, *args: Any) -> Any:
    return _multiarray.scalar(_check_dtype(dtype), *args)


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _check_array(_numeric._frombuffer(buffer, _check_dtype(dtype), shape, order))  # type: ignore[attr-defined]


def _check_array(array: np.ndarray) -> np.ndarray:
    """Every array is checked once loaded, whatever built it."""
    _check_dtype(array.dtype)
    return array


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


class GeoBenchUnpickler(pickle._Unpickler):
    """Reads GEO-Bench metadata pickles without the ``geobench`` package and without running their code.

    GEO-Bench classes become :class:`GeoBenchObject` stand-ins; numpy arrays of plain numbers, dates and
    georeferencing stand-ins are allowed; any other global raises ``pickle.UnpicklingError``. It is the
    pure-Python unpickler, for two reasons: its BUILD (state applied to an object) can be checked, where
    the C one hands any state to any object's ``__setstate__`` (a numpy dtype's rewrites its fields and
    flags after the checks above); and its memo is a dict, where the C one allocates up to the largest
    memo index a pickle names (9 bytes could ask for 64 GB). Metadata pickles are a few KB: about 0.6 ms
    a sample, against about 5 ms to read the sample's bands.
    """

    dispatch = dict(pickle._Unpickler.dispatch)
    stack: list[Any]  # set by load(); typeshed leaves the pure-Python unpickler's internals out

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module in _GEOBENCH_MODULES and name in _GEOBENCH_CLASSES:
            return _STAND_INS[name]
        raise pickle.UnpicklingError(
            f"refusing to unpickle global {module[:_BRIEF]}.{name[:_BRIEF]}: only GEO-Bench metadata classes, "
            f"numpy arrays and dates are allowed (pickles are code)"
        )

    def load_build(self) -> None:
        """BUILD for stand-ins and arrays of checked dtypes only; a dtype takes no state but its own."""
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, GeoBenchObject):
            inst.__setstate__(state)
        elif type(inst) is np.ndarray:
            if type(state) is not tuple or len(state) != 5:
                raise pickle.UnpicklingError(f"numpy array state is {_brief(state)}; expected a 5-tuple")
            _check_dtype(state[2])
            inst.__setstate__(state)
            _check_array(inst)
        elif isinstance(inst, np.dtype):
            if not _same_plain(state, inst.__reduce__()[2]):
                raise pickle.UnpicklingError(
                    f"refusing to change the state (fields, offsets, flags, byte order) of numpy dtype "
                    f"{inst.str!r}: GEO-Bench metadata holds plain numeric arrays only"
                )
        else:
            raise pickle.UnpicklingError(f"refusing to apply pickled state to {_brief(inst)}")

    # typeshed types the handlers as taking the C ``Unpickler``; they take the pure-Python one.
    dispatch[pickle.BUILD[0]] = load_build  # type: ignore[assignment]


def safe_loads(data: bytes) -> Any:
    """Unpickle GEO-Bench metadata with :class:`GeoBenchUnpickler`."""
    return GeoBenchUnpickler(io.BytesIO(data)).load()


def _loads_from(path: Path, data: bytes, what: str) -> Any:
    """:func:`safe_loads`, with any failure (refused global, corrupt bytes) reported against ``path``."""
    try:
        return safe_loads(data)
    except Exception as err:
        raise GeoBenchFormatError(f"{path}: cannot read {what}: {str(err)[:300]}") from None


def load_task_specs(path: Path | str) -> GeoBenchObject:
    """``task_specs.pkl`` as a ``TaskSpecifications`` stand-in."""
    path = Path(path)
    if not path.is_file():
        raise GeoBenchFormatError(f"{path}: missing (expected the pickled GEO-Bench task specifications)")
    specs = _loads_from(path, path.read_bytes(), "pickled task specifications")
    if not isinstance(specs, GeoBenchObject) or specs.kind != "TaskSpecifications":
        raise GeoBenchFormatError(f"{path}: holds {_brief(specs)}; expected a TaskSpecifications")
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
    """Band and class names from ``task_specs.pkl``, after checking its class count and patch size."""
    path = folder / "task_specs.pkl"
    specs = load_task_specs(path)
    label_type = getattr(specs, "label_type", None)
    n_classes = getattr(label_type, "n_classes", None)
    if not _is_int(n_classes) or n_classes != task.num_classes:
        raise GeoBenchFormatError(
            f"{path}: label type has n_classes={_brief(n_classes)}; task {task.name!r} expects {task.num_classes}"
        )
    patch_size = getattr(specs, "patch_size", None)
    side = task.image_size
    square = isinstance(patch_size, list | tuple) and len(patch_size) == 2
    if patch_size is not None and not (square and all(_is_int(v) and v == side for v in patch_size)):
        raise GeoBenchFormatError(
            f"{path}: patch_size is {_values_brief(patch_size)}; task {task.name!r} has {side}x{side} images"
        )
    bands_info = getattr(specs, "bands_info", None)
    if not isinstance(bands_info, list | tuple):
        raise GeoBenchFormatError(f"{path}: bands_info is {_brief(bands_info)}; expected a list of band infos")
    s2_names: dict[str, str] = {}
    for info in bands_info:
        name = getattr(info, "name", None)
        if isinstance(info, GeoBenchObject) and info.kind == "Sentinel2" and isinstance(name, str):
            canonical = canonical_band_name(name)
            if canonical:
                s2_names[canonical] = name
    names = next((getattr(label_type, a) for a in ("_class_names", "class_names", "class_name")
                  if getattr(label_type, a, None) is not None), None)
    if names is not None and (not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names)):
        raise GeoBenchFormatError(f"{path}: class names are {_brief(names)}; expected a list of strings")
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
                f"{path}: band {_brief(name)} needs a numeric 'mean' and a positive 'std', found {_brief(entry)}"
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
    key = SPLIT_FOLDERS[split]
    names = content.get(key) if isinstance(content, Mapping) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        found = [_brief(k) for k in list(content)[:10]] if isinstance(content, Mapping) else _brief(content)
        raise GeoBenchFormatError(f"{path}: expected key {key!r} with a list of sample names; found {found}")
    unsafe = next((n for n in names if Path(n).name != n or n in ("", ".", "..")), None)
    if unsafe is not None:
        raise GeoBenchFormatError(f"{path}: sample name {_brief(unsafe)} is not a plain file name")
    missing = [n for n in names if not (folder / f"{n}.hdf5").is_file()]
    if missing:
        raise GeoBenchFormatError(
            f"{path}: {len(missing)} sample(s) of split {key!r} have no file, e.g. {folder / missing[0]}.hdf5"
        )
    return names


@dataclass(frozen=True)
class _SampleMeta:
    """What this reader uses from a sample's pickled metadata, as plain types."""

    datasets: dict[str, str]  # GEO-Bench band name -> HDF5 dataset name
    label: Any  # the pickled label (classification), unchecked until the task's kind is applied


def _pickled_bytes(path: Path, raw: Any) -> bytes:
    """The bytes whose ``repr`` GEO-Bench stores in attribute ``pickle``, decoded without parsing Python."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    if not isinstance(text, str) or len(text) < 3 or text[:2] not in ("b'", 'b"') or text[-1] != text[1]:
        raise GeoBenchFormatError(f"{path}: attribute 'pickle' is not the repr of pickled bytes: {_brief(raw)}")
    try:  # a bytes repr holds ASCII and backslash escapes only
        return text[2:-1].encode("ascii").decode("unicode_escape").encode("latin-1")
    except UnicodeError:
        raise GeoBenchFormatError(f"{path}: attribute 'pickle' is not a valid bytes repr: {_brief(raw)}") from None


def _sample_metadata(path: Path, h5: h5py.File) -> _SampleMeta:
    """The band datasets and label of a sample, from the pickled metadata dict in attribute ``pickle``."""
    raw = h5.attrs.get("pickle")
    if raw is None:
        raise GeoBenchFormatError(f"{path}: missing HDF5 attribute 'pickle' (GEO-Bench sample metadata)")
    meta = _loads_from(path, _pickled_bytes(path, raw), "attribute 'pickle'")
    if not isinstance(meta, dict):
        raise GeoBenchFormatError(f"{path}: attribute 'pickle' holds {_brief(meta)}; expected a dict")
    return _SampleMeta(_dataset_names(path, h5, meta), meta.get("label"))


def _dataset_names(path: Path, h5: h5py.File, meta: Mapping[str, Any]) -> dict[str, str]:
    """GEO-Bench band name -> HDF5 dataset name (datasets may carry a date suffix); first date wins."""
    order = meta.get("bands_order")
    order = list(h5.keys()) if order is None else order
    if not isinstance(order, list | tuple) or not all(isinstance(d, str) and "/" not in d for d in order):
        raise GeoBenchFormatError(f"{path}: metadata 'bands_order' is {_brief(order)}; expected a list of names")
    names: dict[str, str] = {}
    for dataset in order:
        attrs = meta.get(dataset)
        info = attrs.get("band_info") if isinstance(attrs, dict) else None
        name = getattr(info, "name", dataset)
        if not isinstance(name, str):
            raise GeoBenchFormatError(f"{path}: band_info of {_brief(dataset)} has name {_brief(name)}; expected a str")
        names.setdefault(name, dataset)
    return names


def open_h5(path: Path) -> h5py.File:
    """Open a sample read-only, turning h5py's OSError into an error that names the file."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise GeoBenchFormatError(f"{path}: cannot be read as HDF5 (missing, truncated or not HDF5: {err})") from None


# -- dataset ----------------------------------------------------------------------------------------


class GeoBenchDataset(torch.utils.data.Dataset[tuple[np.ndarray, np.ndarray]]):
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
        if split not in SPLIT_FOLDERS:
            raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLIT_FOLDERS)}")
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
        pairs = [self._read_sample(self.sample_names[i]) for i in positions]
        raw = np.stack([p[0] for p in pairs])  # every sample is checked to be the task's image size
        # float64 arithmetic, then float32, as the reference does.
        x = ((raw - self._mean64) / self._std64).astype(np.float32)
        return x, np.stack([p[1] for p in pairs])

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole split as tensors: what an in-memory linear probe trains or scores on."""
        return to_tensors(*self.read_batch(range(len(self))))

    def _read_sample(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        path = self.folder / f"{name}.hdf5"
        side = self.task.image_size
        with open_h5(path) as h5:
            try:
                meta = _sample_metadata(path, h5)
                planes = [_read_2d(path, h5, meta.datasets, band, side) for band in self.source_bands]
                if self.task.kind == "segmentation":
                    label = _label_map(path, _read_2d(path, h5, meta.datasets, "label", side), self.task)
                else:
                    label = _classification_label(path, meta.label, self.task)
            except OSError as err:  # a corrupt chunk or object header in a file whose superblock is intact
                raise GeoBenchFormatError(f"{path}: cannot read its metadata or band data ({err})") from None
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


def _read_2d(path: Path, h5: h5py.File, datasets: Mapping[str, str], band: str, side: int) -> np.ndarray:
    """One band (or the label map) of a sample, checked from its HDF5 metadata before any data is read.

    The declared shape must be the task's (side, side), so a few KB of compressed zeros cannot declare
    gigabytes; the data must be stored in the sample itself, not in another file through an external link,
    external storage or a virtual dataset.
    """
    name = datasets.get(band)
    link = h5.get(name, getlink=True) if name is not None else None
    if link is None:
        present = [_brief(b) for b in list(datasets)[:30]]
        raise GeoBenchFormatError(f"{path}: missing band {_brief(band)}; bands present: {present}")
    where = f"{path}: dataset {_brief(name)}"
    if not isinstance(link, h5py.HardLink):
        raise GeoBenchFormatError(f"{where} is a link ({type(link).__name__}); expected data stored in this file")
    dataset = h5[name]
    if not isinstance(dataset, h5py.Dataset):
        raise GeoBenchFormatError(f"{where} is a {type(dataset).__name__}; expected a dataset")
    if dataset.shape != (side, side):
        raise GeoBenchFormatError(f"{where} has shape {dataset.shape}; the task's images are ({side}, {side})")
    dtype = dataset.dtype
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.subdtype is not None:
        raise GeoBenchFormatError(f"{where} has dtype {dtype.str!r}; expected bool, integer or float values")
    layout = dataset.id.get_create_plist()
    if layout.get_layout() == h5py.h5d.VIRTUAL or layout.get_external_count():
        raise GeoBenchFormatError(f"{where} keeps its data in another file; expected data stored in this file")
    if layout.get_layout() == h5py.h5d.CHUNKED and any(c > side for c in layout.get_chunk()):
        # a chunk is decompressed whole, so it is bounded like the shape
        raise GeoBenchFormatError(f"{where} has chunks {layout.get_chunk()} larger than its shape {dataset.shape}")
    return dataset[()]


def _is_int(value: Any) -> bool:
    """An integer that is not a bool (Python or numpy)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def _is_number(value: Any) -> bool:
    """A bool, integer or float (Python or numpy), as a label value may be."""
    return isinstance(value, bool | int | float | np.bool_ | np.integer | np.floating)


def _classification_label(path: Path, label: Any, task: GeoBenchTask) -> np.ndarray:
    """The pickled label as int64, its type and length checked before it is converted.

    Multi-label: ``num_classes`` values 0/1 (a list, tuple or array); multi-class: one class index.
    """
    n = task.num_classes
    if label is None:
        raise GeoBenchFormatError(f"{path}: sample metadata has no 'label'")
    if task.kind == "multilabel":
        expected = f"{n} values 0/1"
        if isinstance(label, np.ndarray):
            ok = label.shape == (n,)
        else:
            ok = isinstance(label, list | tuple) and len(label) == n and all(map(_is_number, label))
    else:
        expected = f"one class index in 0..{n - 1}"
        ok = (isinstance(label, np.ndarray) and label.shape == ()) or _is_number(label)
    if ok:
        try:
            values = np.asarray(label, dtype=np.float64)  # checked above: at most n plain numbers
        except OverflowError:  # an int beyond float64
            values = np.full(np.shape(label), np.nan)
        ok = bool(np.isin(values, (0, 1) if task.kind == "multilabel" else range(n)).all())
    if not ok:
        raise GeoBenchFormatError(f"{path}: {task.kind} label is {_values_brief(label)}; expected {expected}")
    return values.astype(np.int64)


def _values_brief(value: Any) -> str:
    """:func:`_brief`, with the values of a short list or array of numbers (the usual mistake is a value)."""
    if isinstance(value, list | tuple) and len(value) <= 50 and all(map(_is_number, value)):
        return "[" + ", ".join(map(_brief, value)) + "]"
    if isinstance(value, np.ndarray) and value.size <= 50:
        return f"{_brief(value)}: {value.tolist()}"
    return _brief(value)


def _label_map(path: Path, label: np.ndarray, task: GeoBenchTask) -> np.ndarray:
    """A segmentation map as int64, every value a class index."""
    n = task.num_classes
    values = label.astype(np.int64)
    if not (values == label).all() or values.min() < 0 or values.max() >= n:
        raise GeoBenchFormatError(
            f"{path}: segmentation label holds values in {label.min()}..{label.max()}; expected class indices "
            f"0..{n - 1}"
        )
    return values


def to_tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """A :meth:`GeoBenchDataset.read_batch` result as torch tensors (no copy)."""
    return torch.from_numpy(x), torch.from_numpy(y)
