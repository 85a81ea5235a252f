"""GEO-Bench reader on the shared mini m-bigearthnet folder (6 real BigEarthNet patches written by geobench's
own writer) against the upstream reference loader's golden outputs. The unit tests run on a generated folder
(tests/data/test_geobench.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpmae.data.geobench import GeoBenchDataset

BEN = "m-bigearthnet"
SPLIT_SIZES = {"train": 4, "val": 1, "test": 1}


@pytest.fixture(scope="module")
def geobench_root(realdata: Path) -> Path:
    return realdata / "geobench_mini"


@pytest.fixture(scope="module")
def golden(realdata: Path):
    with np.load(realdata / "golden" / "golden_geobench_mbigearthnet.npz") as npz:
        return dict(npz)


@pytest.mark.parametrize("split", list(SPLIT_SIZES))
def test_reference_band_order_reproduces_golden_exactly(geobench_root: Path, golden, split: str) -> None:
    ds = GeoBenchDataset(geobench_root, BEN, split, band_order="reference")
    assert len(ds) == SPLIT_SIZES[split]
    x, y = ds.read_batch(range(len(ds)))
    assert x.dtype == np.float32 and y.dtype == np.int64
    for i in range(len(ds)):
        np.testing.assert_array_equal(x[i], golden[f"{split}_{i}_x"])  # bit-exact, not approximate
        np.testing.assert_array_equal(y[i], golden[f"{split}_{i}_y"])
        item_x, item_y = ds[i]
        np.testing.assert_array_equal(item_x, golden[f"{split}_{i}_x"])
        np.testing.assert_array_equal(item_y, golden[f"{split}_{i}_y"])
    assert ds.mean.dtype == np.float32 and ds.std.dtype == np.float32
    np.testing.assert_array_equal(ds.mean, golden[f"{split}_mean"])
    np.testing.assert_array_equal(ds.std, golden[f"{split}_std"])
