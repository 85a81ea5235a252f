"""Broken MMEarth folders, built from a small synthetic folder: a damaged compressed chunk, huge declared sides.

Both start from :func:`mpmae.data.synth.write_synthetic_mmearth`, so everything but the one defect is valid.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mpmae.data.synth import write_synthetic_mmearth
from mpmae.modalities import MODALITIES

STEM = "data_synth_v001_64"
#: Bytes flipped inside the chunk: what the fault test on the real pipeline used.
CORRUPT_BYTES = 4096


@dataclass(frozen=True)
class CorruptChunk:
    """Where the damage lies: the h5 file, the dataset, its h5 row and that row's position in the train split."""

    folder: Path
    h5: Path
    dataset: str
    row: int
    position: int


def write_corrupt_chunk(out: Path, tiles: int = 10, dataset: str = "sentinel2") -> CorruptChunk:
    """A synthetic folder whose ``dataset`` has :data:`CORRUPT_BYTES` flipped inside the compressed chunk of
    one train tile. The chunk's file offset comes from the HDF5 chunk index, so the damage surely hits
    stored data, not free space or metadata."""
    folder = write_synthetic_mmearth(out, tiles, size=64, seed=0)
    h5_path = folder / f"{STEM}.h5"
    train = json.loads((folder / f"{STEM}_splits.json").read_text())["train"]
    position = len(train) // 2
    row = train[position]
    with h5py.File(h5_path, "r") as h5:
        ds = h5[dataset]
        if ds.compression != "gzip" or ds.chunks[0] != 1:
            raise ValueError(f"{dataset!r} is not gzip-compressed with one tile per chunk")
        info = ds.id.get_chunk_info_by_coord((row,) + (0,) * (ds.ndim - 1))
    if info.size < 2 * CORRUPT_BYTES:
        raise ValueError(f"chunk of {dataset!r} row {row} holds {info.size} bytes; too small to damage")
    start = info.byte_offset + (info.size - CORRUPT_BYTES) // 2
    with open(h5_path, "r+b") as f:
        f.seek(start)
        flipped = bytes(b ^ 0xFF for b in f.read(CORRUPT_BYTES))
        f.seek(start)
        f.write(flipped)
    return CorruptChunk(folder, h5_path, dataset, row, position)


def write_huge_side(out: Path, side: int = 200_000, tiles: int = 3) -> Path:
    """A synthetic folder whose pixel datasets all declare ``side`` x ``side`` tiles. Nothing is stored
    in them (HDF5 allocates chunks on write), so the file stays small while a read would need
    ``tiles * side**2 * bands * itemsize`` bytes."""
    folder = write_synthetic_mmearth(out, tiles, size=64, seed=0)
    with h5py.File(folder / f"{STEM}.h5", "r+") as h5:
        for name, modality in MODALITIES.items():
            if modality.level != "pixel":
                continue
            del h5[name]
            h5.create_dataset(name, shape=(tiles, len(modality.bands), side, side), dtype=modality.disk_dtype,
                              chunks=(1, len(modality.bands), 64, 64), compression="gzip")
    return folder


def mmearth_stem(folder: Path) -> str:
    """The ``data_<...>`` stem of an MMEarth folder's one h5 file (``data_synth_v001_64``, ``data_1M_v001_64``)."""
    (h5,) = folder.glob("data_*.h5")
    return h5.stem


def copy_mmearth_folder(src: Path, dst: Path, rewrite: Callable[[str, np.ndarray], np.ndarray | None] | None = None,
                        **dataset_kwargs: Any) -> Path:
    """Copy an MMEarth folder (writable, whatever the source's modes), rewriting its h5 datasets through
    ``rewrite(name, array)`` (None drops one); ``dataset_kwargs`` (``compression="gzip"``) store each
    multi-dimensional dataset with one tile per chunk."""
    stem = mmearth_stem(src)
    dst.mkdir(parents=True)
    for path in src.iterdir():
        if path.suffix != ".h5":
            shutil.copyfile(path, dst / path.name)
    with h5py.File(src / f"{stem}.h5") as fin, h5py.File(dst / f"{stem}.h5", "w") as fout:
        for name, ds in fin.items():
            array = ds[()]
            if rewrite is not None:
                array = rewrite(name, array)
            if array is not None:
                chunks = (1, *array.shape[1:]) if dataset_kwargs and array.ndim > 1 else None
                fout.create_dataset(name, data=array, chunks=chunks, **dataset_kwargs)
    return dst


def tile_id_only(name: str, array: np.ndarray) -> np.ndarray:
    """A :func:`copy_mmearth_folder` rewrite: metadata of tile ids alone, as merged folders store it."""
    return np.array([t for t, _ in array], dtype=[("tile_id", "S100")]) if name == "metadata" else array


def edit_mmearth_json(folder: Path, suffix: str, edit: Callable[[dict], None]) -> None:
    """Apply ``edit`` to the folder's ``<stem>_<suffix>.json`` in place."""
    path = folder / f"{mmearth_stem(folder)}_{suffix}.json"
    content = json.loads(path.read_text())
    edit(content)
    path.write_text(json.dumps(content))
