"""MMEarth v001 folders: file discovery, strict validation and the (batched) reader.

A folder holds four files, found by pattern (docs/method.md, MMEarth data): ``data_*.h5``, ``data_*_splits.json``,
``data_*_tile_info.json`` and ``data_*_band_stats.json``. Items are preprocessed as the reference loader
does at HEAD (docs/method.md: no-data to NaN, then z-score; label maps to class indices with -1 as ignore), with
its bugs fixed: ESA WorldCover tree cover (class 0) is kept, and unknown label codes become -1.

:meth:`MMEarthDataset.read_raw` reads a batch as stored (the file's dtypes); :meth:`MMEarthDataset.read_batch`
adds the preprocessing, vectorised over the batch (:class:`mpmae.data.normalize.Normalizer`, which the training
feeds run on the GPU instead); the per-item path calls it with one index. The HDF5 file is opened lazily once
per process, so a dataset object can be pickled to Ray workers or forked into loader processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mpmae.data.normalize import S2_LEVEL_KEY, BandStatsError, Normalizer, RawBatch
from mpmae.modalities import Modality, ModalitySpec, Selection, get_modality, resolve_selection

SPLITS = ("train", "val", "test")
S2_TYPES = ("l1c", "l2a")
#: Largest tile side accepted from a file's declared shapes (MMEarth tiles are 64 or 128 px): a crafted
#: shape must give a clear error before a read tries to allocate it.
MAX_IMAGE_SIDE = 1024
#: Largest label-map item size: the code -> class table has one entry per possible code.
MAX_LABEL_ITEMSIZE = 2
#: Largest metadata row (the real files hold a 100-byte tile id and a 10-byte processing level).
MAX_METADATA_ITEMSIZE = 4096

Batch = dict[str, Any]


class MMEarthFormatError(ValueError):
    """A folder, file, key or value does not match the MMEarth v001 format."""


@dataclass(frozen=True)
class MMEarthFiles:
    """The four files of an MMEarth folder."""

    h5: Path
    splits: Path
    tile_info: Path
    band_stats: Path

    PATTERNS = {
        "h5": "data_*.h5",
        "splits": "data_*_splits.json",
        "tile_info": "data_*_tile_info.json",
        "band_stats": "data_*_band_stats.json",
    }

    @classmethod
    def discover(cls, root: Path | str) -> MMEarthFiles:
        """Find each file by its pattern; exactly one match each, or a clear error."""
        root = Path(root)
        if not root.is_dir():
            raise MMEarthFormatError(f"{root}: not a directory (expected an MMEarth v001 folder)")
        found = {}
        for role, pattern in cls.PATTERNS.items():
            matches = sorted(root.glob(pattern))
            if len(matches) != 1:
                names = [m.name for m in matches] or "none"
                raise MMEarthFormatError(
                    f"{root}: expected exactly one file matching {pattern!r} ({role}), found {names}"
                )
            found[role] = matches[0]
        return cls(**found)


def _load_json(path: Path) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise MMEarthFormatError(f"{path}: not valid JSON ({err})") from None


def open_h5(path: Path) -> h5py.File:
    """Open an HDF5 file read-only, turning h5py's OSError into an error that names the file."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise MMEarthFormatError(f"{path}: cannot be read as HDF5 (truncated or not an HDF5 file: {err})") from None


def h5_dataset(h5: h5py.File, name: str) -> h5py.Dataset:
    """Dataset ``name`` of an open file; a damaged object header becomes an error naming file and dataset."""
    try:
        dataset = h5[name]
    except (OSError, RuntimeError) as err:
        raise MMEarthFormatError(f"{h5.filename}: dataset {name!r} cannot be opened (corrupt file: {err})") from None
    if not isinstance(dataset, h5py.Dataset):
        raise MMEarthFormatError(f"{h5.filename}: {name!r} is a {type(dataset).__name__}; expected a dataset")
    return dataset


def _index_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """Split sorted, unique rows into maximal runs of consecutive rows, as (start, stop) pairs."""
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(rows)]])
    return [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(starts, stops, strict=True)]


def _read_rows(dataset: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """Read arbitrary rows with one h5 call per run of consecutive rows, returned in ``rows`` order."""
    unique, inverse = np.unique(rows, return_inverse=True)
    parts = [_read_run(dataset, start, stop) for start, stop in _index_runs(unique)]
    return np.concatenate(parts)[inverse]


def _read_run(dataset: h5py.Dataset, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop``; a damaged chunk (h5py's OSError or RuntimeError) becomes an error naming the
    file, the dataset and the rows, so that it reads as bad data rather than a passing I/O fault."""
    try:
        return dataset[start:stop]
    except (OSError, RuntimeError) as err:
        rows = f"row {start}" if stop == start + 1 else f"rows {start}..{stop - 1}"
        raise MMEarthFormatError(
            f"{dataset.file.filename}: dataset {dataset.name.lstrip('/')!r}, {rows}: cannot be read "
            f"(corrupt file: {err})"
        ) from None


class MMEarthDataset:
    """An MMEarth v001 folder as a map-style dataset of ``{modality: array, "id": tile_id}`` dicts.

    ``modalities`` is a preset (``S2``, ``rgb``, ``img_mod``, ``pix_mod``, ``all_mod``), a list of
    modality names or a ``{modality: bands}`` mapping (see :func:`mpmae.modalities.resolve_selection`).
    Continuous modalities come back float32 (NaN where no data), label maps int64 with -1 as ignore,
    biome and eco_region as the reference's one-hot int64 vectors.
    """

    def __init__(
        self,
        root: Path | str,
        split: str = "train",
        modalities: ModalitySpec = "all_mod",
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {list(SPLITS)}")
        self.root = Path(root)
        self.split = split
        self.selection: Selection = resolve_selection(modalities)
        self.files = MMEarthFiles.discover(self.root)
        self.tile_info: dict[str, dict[str, Any]] = _load_json(self.files.tile_info)
        if not isinstance(self.tile_info, dict):
            raise MMEarthFormatError(f"{self.files.tile_info}: expected an object keyed by tile id")
        self._h5: h5py.File | None = None
        self._h5_pid: int | None = None
        self.num_tiles = self._validate_h5()
        self.rows = self._load_split(self.num_tiles)
        self.normalizer = self._load_normalizer()

    # -- validation ---------------------------------------------------------------------------------

    def _validate_h5(self) -> int:
        """Check every selected dataset's shape and dtype against the registry; return the tile count."""
        h5 = self.h5
        if "metadata" not in h5:
            raise MMEarthFormatError(f"{self.files.h5}: missing dataset 'metadata' (tile ids)")
        metadata = h5_dataset(h5, "metadata")
        if metadata.ndim != 1 or metadata.dtype.itemsize > MAX_METADATA_ITEMSIZE:
            raise MMEarthFormatError(
                f"{self.files.h5}: dataset 'metadata' has shape {metadata.shape} and "
                f"{metadata.dtype.itemsize}-byte rows; expected one row per tile of at most "
                f"{MAX_METADATA_ITEMSIZE} bytes"
            )
        num_tiles = metadata.shape[0]
        size: int | None = None
        for name in self.selection:
            modality = get_modality(name)
            if name not in h5:
                raise MMEarthFormatError(f"{self.files.h5}: missing dataset {name!r}")
            ds = h5_dataset(h5, name)
            expected_ndim = 4 if modality.level == "pixel" else 2
            if ds.ndim != expected_ndim or ds.shape[0] != num_tiles or ds.shape[1] != len(modality.bands):
                raise MMEarthFormatError(
                    f"{self.files.h5}: dataset {name!r} has shape {ds.shape}; expected "
                    f"({num_tiles}, {len(modality.bands)}{', H, W' if expected_ndim == 4 else ''}) "
                    f"for {num_tiles} tiles and bands {list(modality.bands)}"
                )
            if expected_ndim == 4:
                _check_side(self.files.h5, name, ds.shape)
                if ds.shape[2] != ds.shape[3] or (size is not None and ds.shape[2] != size):
                    raise MMEarthFormatError(
                        f"{self.files.h5}: dataset {name!r} has image size {ds.shape[2:]}; expected "
                        f"square tiles of one size across modalities"
                    )
                size = ds.shape[2]
            _check_dtype(self.files.h5, modality, ds.dtype)
        self.image_size = size
        return num_tiles

    def _load_split(self, num_tiles: int) -> np.ndarray:
        splits = _load_json(self.files.splits)
        if self.split not in splits:
            raise MMEarthFormatError(
                f"{self.files.splits}: missing key {self.split!r}; found {sorted(splits)}"
            )
        rows = np.asarray(splits[self.split], dtype=np.int64)
        bad = rows[(rows < 0) | (rows >= num_tiles)]
        if bad.size:
            raise MMEarthFormatError(
                f"{self.files.splits}: split {self.split!r} holds index {int(bad[0])} outside the "
                f"{num_tiles} tiles of {self.files.h5.name} (valid 0..{num_tiles - 1})"
            )
        return rows

    def _load_normalizer(self) -> Normalizer:
        """The selection's normalisation from the band statistics (checked for the selected bands)."""
        try:
            return Normalizer.from_band_stats(self.selection, _load_json(self.files.band_stats),
                                              str(self.files.band_stats), self._s2_levels_present())
        except BandStatsError as err:
            raise MMEarthFormatError(str(err)) from None

    def _s2_levels_present(self) -> list[str]:
        """Processing levels that occur in tile_info: only their Sentinel-2 statistics must exist."""
        found = {str(info.get("S2_type", "")).lower() for info in self.tile_info.values() if isinstance(info, dict)}
        return [level for level in S2_TYPES if level in found]

    # -- file handle --------------------------------------------------------------------------------

    @property
    def h5(self) -> h5py.File:
        """The HDF5 file, opened once per process (handles do not survive fork or pickling)."""
        if self._h5 is None or self._h5_pid != os.getpid():
            self._h5 = open_h5(self.files.h5)
            self._h5_pid = os.getpid()
        return self._h5

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"] = None
        state["_h5_pid"] = None
        return state

    # -- reading ------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Batch:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for the {len(self)} tiles of split {self.split!r}")
        batch = self.read_batch([index % len(self)])
        return {key: value[0] for key, value in batch.items()}

    def read_batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Items ``indices`` (positions in the split) stacked and preprocessed: :meth:`read_raw`, then the
        normalisation. Returns ``{modality: array (N, ...), "id": list[str]}``."""
        return self.normalizer.numpy(self.read_raw(indices))

    def read_raw(self, indices: Sequence[int] | np.ndarray) -> RawBatch:
        """Items ``indices`` as stored: ``{modality: array (N, ...) of the file's dtype, selected bands,
        "s2_l2a": bool (N,) when Sentinel-2 is selected, "id": list[str]}``, one h5 call per run of rows.
        :attr:`normalizer` turns it into the canonical batch (on the GPU, in a training worker)."""
        positions = np.asarray(indices, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= len(self)):
            raise IndexError(f"indices out of range for the {len(self)} tiles of split {self.split!r}")
        rows = self.rows[positions]
        ids = self.tile_ids(rows)
        batch: RawBatch = {}
        for name, bands in self.selection.items():
            modality = get_modality(name)
            raw = _read_rows(h5_dataset(self.h5, name), rows)
            batch[name] = raw[:, modality.band_indices(bands)] if len(bands) != len(modality.bands) else raw
        if "sentinel2" in self.selection:
            batch[S2_LEVEL_KEY] = self._s2_levels(ids)
        batch["id"] = ids
        return batch

    @property
    def raw_dtypes(self) -> dict[str, np.dtype]:
        """The file's dtype of each selected modality (what :meth:`read_raw` returns)."""
        return {name: h5_dataset(self.h5, name).dtype for name in self.selection}

    def tile_ids(self, rows: np.ndarray) -> list[str]:
        """Tile ids of h5 ``rows`` from ``metadata`` by position (field 0), whatever its compound layout."""
        meta = _read_rows(h5_dataset(self.h5, "metadata"), rows)
        if meta.dtype.names:
            meta = meta[meta.dtype.names[0]]
        return [m.decode() if isinstance(m, bytes) else str(m) for m in meta]

    def _s2_levels(self, ids: list[str]) -> np.ndarray:
        """Per tile, True for L2A: Sentinel-2 statistics depend on the processing level in tile_info."""
        levels = []
        for tile_id in ids:
            info = self.tile_info.get(tile_id)
            if info is None:
                raise MMEarthFormatError(f"{self.files.tile_info}: no entry for tile id {tile_id!r}")
            if not isinstance(info, dict):
                raise MMEarthFormatError(f"{self.files.tile_info}: entry {tile_id!r} is not an object")
            level = str(info.get("S2_type", "")).lower()
            if level not in S2_TYPES:
                raise MMEarthFormatError(
                    f"{self.files.tile_info}: tile {tile_id!r} has S2_type {info.get('S2_type')!r}; "
                    f"expected one of {list(S2_TYPES)}"
                )
            levels.append(level == "l2a")
        return np.asarray(levels)


def _check_side(h5_path: Path, name: str, shape: tuple[int, ...]) -> None:
    """Refuse declared image sides beyond :data:`MAX_IMAGE_SIDE` before anything is read."""
    if max(shape[2:]) > MAX_IMAGE_SIDE:
        raise MMEarthFormatError(
            f"{h5_path}: dataset {name!r} declares image size {shape[2:]}; at most {MAX_IMAGE_SIDE} px "
            f"per side is accepted (MMEarth tiles are 64 or 128 px)"
        )


def _check_dtype(h5_path: Path, modality: Modality, dtype: np.dtype) -> None:
    """Label maps must be small unsigned integers (codes index a lookup table of every possible code);
    anything else numeric."""
    if modality.encoding == "label_map":
        ok = dtype.kind == "u" and dtype.itemsize <= MAX_LABEL_ITEMSIZE
        bits = 8 * MAX_LABEL_ITEMSIZE
        expected = f"an unsigned integer type of at most {bits} bits (registry: {modality.disk_dtype})"
    elif modality.encoding in ("one_hot", "raw"):
        ok = dtype.kind == "u" or (modality.encoding == "one_hot" and dtype.kind == "i")
        expected = f"an unsigned integer type (registry: {modality.disk_dtype})"
    else:
        ok = dtype.kind in "uif"
        expected = f"a numeric type (registry: {modality.disk_dtype})"
    if not ok:
        raise MMEarthFormatError(f"{h5_path}: dataset {modality.name!r} has dtype {dtype}; expected {expected}")
