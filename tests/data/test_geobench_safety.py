"""GEO-Bench reader against hostile files: dtypes rewritten by pickled state, huge declared shapes, label
bombs, data kept in other files, and error messages that stay short whatever the file holds.

Each case copies the tiny generated m-bigearthnet folder (tests/data/geobench_tiny/data.py) and rewrites its
one ``valid`` sample (``id_0004``) with a generator from :mod:`tests.crafted.geobench`. Memory is measured
with ``tracemalloc`` (numpy reports its array buffers to it), so a refusal that still allocates the declared
size fails.
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpmae.data.geobench import GeoBenchDataset, GeoBenchFormatError, safe_loads
from tests.crafted import geobench as crafted

BEN = "m-bigearthnet"
N = 43  # m-bigearthnet classes
SAMPLE = "id_0004"  # the one sample of the "valid" split


@pytest.fixture
def root(geobench_tiny: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny m-bigearthnet folder; returns the GEO-Bench root of the copy."""
    folder = tmp_path / "gb" / "classification_v1.0" / BEN
    shutil.copytree(geobench_tiny / "classification_v1.0" / BEN, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return tmp_path / "gb"


def _sample(root: Path) -> Path:
    return root / "classification_v1.0" / BEN / f"{SAMPLE}.hdf5"


def _refused(root: Path, match: str) -> tuple[float, float, str]:
    """Read the sample expecting an error that names it; returns (seconds, peak MiB traced, message)."""
    dataset = GeoBenchDataset(root, BEN, "val")
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(GeoBenchFormatError, match=rf"{SAMPLE}\.hdf5: {match}") as info:
            dataset[0]
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    message = str(info.value)
    assert len(message) < 600, message[:1000]
    return elapsed, peak, message


# -- numpy dtypes: no state but their own ----------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"offset": 4096}, r"refusing numpy dtype '\|V8' in GEO-Bench metadata"),  # reads memory today
        ({"offset": 4096, "code": "i8"}, r"refusing to change the state .* of numpy dtype '<i8'"),
        ({"flags": 1, "code": "i8"}, r"refusing to change the state .* of numpy dtype '<i8'"),
    ],
    ids=["void-fields", "int-fields", "int-flags"],
)
def test_dtype_rewritten_by_pickled_state_is_refused(root: Path, state: dict, match: str) -> None:
    crafted.set_metadata(_sample(root), crafted.dtype_state_label(N, **state))
    _refused(root, rf"cannot read attribute 'pickle': {match}")


def test_dtype_state_that_crashed_the_process_is_refused_in_a_subprocess(root: Path) -> None:
    """The issue's segfault (exit 139): a field 100 MB past the label's buffer. Run apart from pytest."""
    pickled = crafted.dtype_state_label(1, offset=100_000_000)
    assert len(pickled) < 250  # the 212-byte attribute
    crafted.set_metadata(_sample(root), crafted.dtype_state_label(N, offset=100_000_000))
    code = (
        "import sys\nfrom mpmae.data.geobench import GeoBenchDataset, GeoBenchFormatError\n"
        f"try:\n    GeoBenchDataset(sys.argv[1], {BEN!r}, 'val')[0]\n"
        "except GeoBenchFormatError as err:\n    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert f"{SAMPLE}.hdf5: cannot read attribute 'pickle': refusing numpy dtype '|V8'" in done.stdout


def test_plain_arrays_and_scalars_still_load() -> None:
    loaded = safe_loads(pickle.dumps({"a": np.arange(4, dtype="u2"), "b": np.int64(7), "c": np.ones(2, "f4"),
                                      "d": np.array([True, False])}))
    np.testing.assert_array_equal(loaded["a"], np.arange(4))
    assert loaded["a"].dtype == np.uint16 and loaded["c"].dtype == np.float32 and loaded["d"].dtype == bool
    assert loaded["b"] == 7 and loaded["b"].dtype == np.int64


def test_non_native_byte_order_is_refused_as_dtype_state() -> None:
    """numpy gives a dtype its byte order by BUILD; only the state a dtype already has is accepted."""
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to change the state .* numpy dtype '<i8'"):
        safe_loads(pickle.dumps(np.arange(3, dtype=">i8")))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (crafted.object_dtype_label, r"refusing numpy dtype '\|O' .*object dtype"),
        (crafted.structured_label, r"refusing numpy dtype '\|V8' .*not a plain bool, integer or float dtype"),
    ],
    ids=["object", "structured"],
)
def test_object_and_structured_label_arrays_are_refused(root: Path, make: Callable[[int], bytes], match: str) -> None:
    crafted.set_metadata(_sample(root), make(N))
    _refused(root, rf"cannot read attribute 'pickle': {match}")


# -- bounded reads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 15000, 15000), (200000, 200000)], ids=str)
def test_huge_declared_band_is_refused_before_reading(root: Path, shape: tuple[int, ...]) -> None:
    crafted.huge_band(_sample(root), "02 - Blue", shape)
    assert _sample(root).stat().st_size < 2**20  # gigabytes declared, not stored
    elapsed, peak, _ = _refused(root, rf"dataset '02 - Blue' has shape \({', '.join(map(str, shape))}\); "
                                      r"the task's images are \(120, 120\)")
    assert peak < 16 and elapsed < 5


def test_nested_list_label_bomb_is_refused_fast(root: Path) -> None:
    bomb = crafted.nested_list_label(30)
    assert len(bomb) < 256  # 2**30 zeros to anything that walks it
    crafted.set_metadata(_sample(root), bomb)
    elapsed, peak, _ = _refused(root, rf"multilabel label is a list of length 2; expected {N} values 0/1")
    assert peak < 8 and elapsed < 5


def test_label_object_holding_a_bomb_is_described_not_repr(root: Path) -> None:
    crafted.set_metadata(_sample(root), crafted.object_label_with_bomb(30))
    elapsed, peak, _ = _refused(root, r"multilabel label is a Classification object; expected")
    assert peak < 8 and elapsed < 5
    assert len(repr(safe_loads(crafted.object_label_with_bomb(30))["label"])) < 200


def test_memo_index_does_not_allocate(root: Path) -> None:
    """9 bytes that make the C unpickler size its memo to 2**25 entries (256 MB)."""
    crafted.set_metadata(_sample(root), crafted.memo_index_label(2**24))
    _, peak, _ = _refused(root, r"sample metadata has no 'label'$")
    assert peak < 16


def test_metadata_that_is_not_a_bytes_repr_is_not_parsed(root: Path) -> None:
    """A 4 MB list literal: ast.literal_eval would build millions of nodes before refusing it."""
    with h5py.File(_sample(root), "a") as h5:
        h5.attrs["pickle"] = "[" + "0," * 2_000_000 + "]"
    _, peak, _ = _refused(root, r"attribute 'pickle' is not the repr of pickled bytes: '\[0,0,")
    assert peak < 32


@pytest.mark.parametrize(
    ("label", "match"),
    [
        ("x" * 10**6, r"'x{60}'\.\.\."),
        (2**100_000, r"an int of 100001 bits"),
        (list(range(10**5)), r"a list of length 100000"),
        ([0.5] + [0] * (N - 1), r"\[0\.5, 0, 0, [0, ]*0\]"),
    ],
    ids=["long-str", "huge-int", "long-list", "fraction"],
)
def test_bad_labels_give_short_messages(root: Path, label: object, match: str) -> None:
    crafted.set_metadata(_sample(root), pickle.dumps({"label": label}))
    _refused(root, rf"multilabel label is {match}; expected {N} values 0/1$")


@pytest.mark.parametrize(
    "label",
    [[1] + [0] * (N - 1), tuple([0] * (N - 1) + [1]), np.eye(N, dtype=bool)[3], np.eye(N, dtype="f4")[5]],
    ids=["list", "tuple", "bool-array", "float-array"],
)
def test_plain_labels_are_accepted(root: Path, label: object) -> None:
    crafted.set_metadata(_sample(root), pickle.dumps({"label": label}))
    _, y = GeoBenchDataset(root, BEN, "val")[0]
    assert y.dtype == np.int64 and y.shape == (N,)
    np.testing.assert_array_equal(y, np.asarray(label, dtype=np.int64))


# -- data in other files ---------------------------------------------------------------------------


def test_band_stored_in_another_file_is_refused(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRET!!" * (120 * 120 // 2))
    crafted.external_band(_sample(root), "02 - Blue", secret)
    _refused(root, r"dataset '02 - Blue' keeps its data in another file")


def test_band_linked_to_another_file_is_refused(root: Path, tmp_path: Path) -> None:
    crafted.linked_band(_sample(root), "02 - Blue", tmp_path / "other.h5")
    _refused(root, r"dataset '02 - Blue' is a link \(ExternalLink\)")


def test_partition_name_outside_the_folder_is_refused(root: Path) -> None:
    folder = root / "classification_v1.0" / BEN
    shutil.copy(_sample(root), root / "outside.hdf5")
    (folder / "default_partition.json").write_text('{"train": [], "valid": ["../../outside"], "test": []}')
    with pytest.raises(GeoBenchFormatError, match=r"default_partition\.json: sample name '\.\./\.\./outside' is not"):
        GeoBenchDataset(root, BEN, "val")


def test_task_specs_patch_size_must_match_the_task(root: Path) -> None:
    specs = root / "classification_v1.0" / BEN / "task_specs.pkl"
    crafted.task_specs_patch_size(specs, 64)
    with pytest.raises(GeoBenchFormatError, match=r"task_specs\.pkl: patch_size is \[64, 64\]; .*120x120"):
        GeoBenchDataset(root, BEN, "val")
