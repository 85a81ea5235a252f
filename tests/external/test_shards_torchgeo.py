"""Parquet shards of torchgeo's MMEarth64 fixture (tg64): its older metadata layout, uncompressed datasets and
degenerate values survive the round trip. The unit versions run on synthetic folders (tests/data/test_shards.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mpmae.data import MMEarthDataset
from mpmae.data.shards import find_shards, table_to_batch, write_shards


def test_parquet_round_trip_equals_dataset(tg64: Path, tmp_path: Path) -> None:
    paths = write_shards(tg64, tmp_path, "parquet", tiles_per_shard=4, progress=False)
    dataset = MMEarthDataset(tg64)
    count = -(-len(dataset) // 4)
    assert count == 3  # 10 tiles: the last shard is partial
    assert [p.name for p in paths] == [f"train-{i:05d}-of-{count:05d}.parquet" for i in range(count)]
    assert find_shards(tmp_path) == paths
    got = table_to_batch(pa.concat_tables(pq.read_table(p) for p in paths))
    expected = dataset.read_batch(np.arange(len(dataset)))
    assert list(got) == list(expected) and got["id"] == expected["id"]
    for name, value in expected.items():
        if name != "id":
            assert got[name].dtype == value.dtype, name
            np.testing.assert_array_equal(got[name], value, err_msg=name)
    # no .tmp left; the manifest is written last
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in paths] + ["train-parquet.json"])
