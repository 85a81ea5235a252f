"""Hostile GEO-Bench samples: each function rewrites one sample of a (copied, writable) task folder.

The metadata pickles are written with the ordinary pickler from small objects whose ``__reduce__`` says what
to emit, so each one reads as the attack it is: a dtype given state after it was built, a label that is a
doubling DAG of lists, a label array of an object or structured dtype, a memo index that makes the C
unpickler allocate. Bands are replaced by datasets that declare a huge shape (gzip, nothing written, so a
few KB on disk) or that keep their bytes in another file.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from tests.data.geobench_tiny.data import geobench_stand_ins

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core.multiarray import _reconstruct


class _Reduce:
    """Pickles as ``func(*args)`` followed by BUILD ``state``: how numpy pickles its own dtypes and arrays."""

    def __init__(self, func: Any, args: tuple, state: Any) -> None:
        self.func, self.args, self.state = func, args, state

    def __reduce__(self) -> tuple:
        return self.func, self.args, self.state


def dtype_state_label(n: int, *, code: str = "V8", offset: int = 0, flags: int = 0) -> bytes:
    """Metadata whose label is an (n,) array of dtype ``code`` rewritten by BUILD after it was built.

    With ``offset``, the dtype gets one int64 field ``offset`` bytes in: reading the label reads memory
    past the array's buffer (100 MB in segfaults). With ``flags``, it gets numpy's item flags (1: "holds
    Python objects") that its construction never allowed.
    """
    order = "|" if code.startswith("V") else "<"
    if offset:
        state = (3, order, None, ("a",), {"a": (np.dtype("<i8"), offset)}, 8, 1, 0)
    else:
        state = (3, order, None, None, None, -1, -1, flags)
    dtype = _Reduce(np.dtype, (code, False, True), state)
    array = _Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (n,), dtype, False, bytes(8 * n)))
    return pickle.dumps({"label": array}, protocol=4)


def nested_list_label(levels: int = 30) -> bytes:
    """Metadata whose label is ``L[levels]`` with ``L0 = [0]`` and ``L[k] = [L[k-1], L[k-1]]``: ~200 bytes
    that stand for 2**levels zeros to anything that walks them (``np.asarray``, ``repr``)."""
    label: list = [0]
    for _ in range(levels):
        label = [label, label]
    return pickle.dumps({"label": label}, protocol=4)


def object_label_with_bomb(levels: int = 30) -> bytes:
    """Metadata whose label is a GEO-Bench object holding the doubling list: any ``repr`` of it never ends."""
    bomb: list = [0]
    for _ in range(levels):
        bomb = [bomb, bomb]
    with geobench_stand_ins({"geobench.label": ("Classification",)}) as classes:
        label = classes["Classification"]()
        label.n_classes = bomb
        return pickle.dumps({"label": label}, protocol=4)


def object_dtype_label(n: int) -> bytes:
    """Metadata whose label is an object array (numpy would restore its items by calling pickle itself)."""
    return pickle.dumps({"label": np.zeros(n, dtype=object)}, protocol=4)


def structured_label(n: int) -> bytes:
    """Metadata whose label is a structured array (one int64 field): today it casts to a valid 0 vector."""
    return pickle.dumps({"label": np.zeros(n, dtype=[("a", "<i8")])}, protocol=4)


def memo_index_label(index: int) -> bytes:
    """Metadata of 9 bytes that memoizes the dict at ``index``: the C unpickler sizes its memo to 2 * index."""
    return b"\x80\x04}r" + struct.pack("<I", index) + b"."


def set_metadata(path: Path, data: bytes) -> None:
    """Store ``data`` as the sample's metadata the way GEO-Bench does: the ``repr`` of the pickled bytes."""
    with h5py.File(path, "a") as h5:
        h5.attrs["pickle"] = str(data)


def huge_band(path: Path, band: str, shape: tuple[int, ...]) -> None:
    """Replace ``band`` by a gzip float64 dataset declared ``shape`` with no chunk written: tiny on disk,
    all fill value when read."""
    with h5py.File(path, "a") as h5:
        del h5[band]
        h5.create_dataset(band, shape=shape, dtype="f8", compression="gzip", chunks=True)


def external_band(path: Path, band: str, target: Path) -> None:
    """Replace ``band`` by a dataset whose bytes HDF5 reads from ``target``, a file outside the sample."""
    with h5py.File(path, "a") as h5:
        shape, dtype = h5[band].shape, h5[band].dtype
        del h5[band]
        size = int(np.prod(shape)) * dtype.itemsize
        h5.create_dataset(band, shape=shape, dtype=dtype, external=[(str(target), 0, size)])


def linked_band(path: Path, band: str, target: Path) -> None:
    """Replace ``band`` by an HDF5 external link to dataset ``/data`` of another file, ``target``."""
    with h5py.File(path, "a") as h5:
        shape, dtype = h5[band].shape, h5[band].dtype
        del h5[band]
        h5[band] = h5py.ExternalLink(str(target), "/data")
    with h5py.File(target, "w") as other:
        other.create_dataset("data", data=np.full(shape, 7, dtype))


def task_specs_patch_size(path: Path, side: int) -> None:
    """Rewrite the ``patch_size`` (120 x 120) of an m-bigearthnet ``task_specs.pkl`` pickled as geobench writes it
    (its own files, or tests/data/geobench_tiny's) to side x side."""
    data = path.read_bytes()
    old = b"patch_size\x94K\x78K\x78"  # the key, MEMOIZE, BININT1 120, BININT1 120
    assert data.count(old) == 1 and 0 < side < 256, "expected geobench's own task_specs.pkl of m-bigearthnet"
    path.write_bytes(data.replace(old, b"patch_size\x94K" + bytes([side]) + b"K" + bytes([side])))
