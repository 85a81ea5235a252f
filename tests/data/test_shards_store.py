"""Shards in an object store (the session's S3 stand-in): written in-process and as Ray tasks, read back by
Ray Data from the URI, a manifest written last, an interrupted run resumed, another run's shards refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import mpmae.storage as storage
from mpmae.cli import main
from mpmae.config import ConfigError, PretrainConfig, load_config
from mpmae.data import MMEarthDataset
from mpmae.data.loaders import feed_normalizer, ffcv_loader, iter_ray_batches, ray_dataset
from mpmae.data.shards import ShardError, find_shards, read_shard_metadata, table_to_batch, write_shards
from mpmae.train.trainer import describe_data
from tests.conftest import RayHead, S3Store

REPO = Path(__file__).resolve().parents[2]
RAY_TIMEOUT = 120
NAMES3 = [f"train-{i:05d}-of-00003.parquet" for i in range(3)]  # the 8 train tiles of mmearth10, 3 per shard


@pytest.fixture(scope="module")
def expected(mmearth10: Path) -> dict:
    dataset = MMEarthDataset(mmearth10)
    return dataset.read_batch(np.arange(len(dataset)))


def read_uris(paths: list[str]) -> dict:
    store, _ = storage.resolve(paths[0])
    return table_to_batch(pa.concat_tables(pq.read_table(storage.resolve(p)[1], filesystem=store) for p in paths))


def assert_equal_to(got: dict, expected: dict) -> None:
    assert got["id"] == expected["id"]
    for name, value in expected.items():
        if name != "id":
            assert got[name].dtype == value.dtype, name
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def manifest_of(out: str, format: str = "parquet") -> dict:
    return json.loads(storage.read_bytes(storage.join(out, f"train-{format}.json")))


def test_parquet_shards_into_a_bucket_in_process(s3: S3Store, mmearth10: Path, expected: dict) -> None:
    out = f"{s3.bucket()}/shards"
    paths = write_shards(mmearth10, out, "parquet", tiles_per_shard=3, progress=False, parallel=False)
    assert paths == [f"{out}/{name}" for name in NAMES3]
    assert sorted(storage.file_sizes(out)) == sorted([*NAMES3, "train-parquet.json"])  # no temporary objects
    manifest = manifest_of(out)
    assert [(s["name"], s["rows"]) for s in manifest["shards"]] == list(zip(NAMES3, [3, 3, 2], strict=True))
    assert sum(s["rows"] for s in manifest["shards"]) == manifest["rows"] == 8
    assert manifest["run"]["tiles_per_shard"] == 3 and manifest["run"]["shards"] == 3
    assert manifest["run"]["source"] == "data_synth_v001_64.h5" and manifest["image_size"] == 64
    assert manifest["fingerprint"] == read_shard_metadata(paths[0])["fingerprint"]
    assert find_shards(out) == paths
    assert_equal_to(read_uris(paths), expected)


def test_ffcv_shards_are_uploaded_whole_and_read_locally_only(s3: S3Store, mmearth10: Path) -> None:
    out = f"{s3.bucket()}/ffcv"
    paths = write_shards(mmearth10, out, "ffcv", tiles_per_shard=5, progress=False, parallel=False)
    assert paths == [f"{out}/train-0000{i}-of-00002.beton" for i in range(2)]
    assert [(s["name"], s["rows"]) for s in manifest_of(out, "ffcv")["shards"]] == [
        ("train-00000-of-00002.beton", 5), ("train-00001-of-00002.beton", 3)]
    assert find_shards(out, format="ffcv") == paths  # the row counts come from each shard's header
    with pytest.raises(ShardError, match="FFCV reads local shards only"):
        ffcv_loader(out, batch_size=2)


@pytest.mark.ray
@pytest.mark.timeout(RAY_TIMEOUT)
def test_ray_tasks_write_into_the_bucket_and_ray_data_streams_it(ray_cluster: RayHead, s3: S3Store,
                                                                 mmearth10: Path, expected: dict,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray.util.state import list_tasks

    out = f"{s3.bucket()}/shards"
    paths = write_shards(mmearth10, out, "parquet", tiles_per_shard=3, progress=False)  # Ray is up: tasks
    assert find_shards(out) == paths and manifest_of(out)["rows"] == 8
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster.address)
    assert main(["shard", str(mmearth10), f"{out}-cli", "--tiles-per-shard", "3", "--ray"]) == 0
    assert manifest_of(f"{out}-cli")["fingerprint"] == manifest_of(out)["fingerprint"]
    tasks = list_tasks(filters=[("name", "=", f"mpmae shard {NAMES3[0]}")])
    assert tasks and {t.node_id for t in tasks} == {ray.get_runtime_context().get_node_id()}  # the h5's node
    batches = list(iter_ray_batches(ray_dataset(out, block_rows=4), 4, feed_normalizer(out)))
    ids = [i for b in batches for i in b["id"]]
    order = np.argsort(ids)
    got = {k: np.concatenate([b[k].numpy() for b in batches])[order] for k in batches[0] if k != "id"}
    assert_equal_to({**got, "id": [ids[i] for i in order]}, expected)
    rows = ray_dataset(paths, modalities=["biome"], include_id=False).take_all()  # a list of URIs too
    assert len(rows) == 8 and all(list(row) == ["biome"] for row in rows)


def test_an_interrupted_run_is_refused_then_resumed(s3: S3Store, mmearth10: Path, expected: dict,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = f"{s3.bucket()}/shards"
    reads = {"n": 0}
    read_raw = MMEarthDataset.read_raw

    def crashing(self: MMEarthDataset, indices: np.ndarray) -> dict:
        reads["n"] += 1
        if reads["n"] == 2:
            raise OSError("killed")
        return read_raw(self, indices)

    monkeypatch.setattr(MMEarthDataset, "read_raw", crashing)
    with pytest.raises(OSError, match="killed"):
        write_shards(mmearth10, out, "parquet", tiles_per_shard=3, progress=False, parallel=False)
    assert sorted(storage.file_sizes(out)) == NAMES3[:1]  # the failed shard's object was removed, no manifest
    with pytest.raises(ShardError, match=rf"^{out}: the parquet shard set of split 'train' is incomplete: 1 shard "
                                         r"file\(s\) but no manifest train-parquet.json \(written by an interrupted "
                                         r"`mpmae shard`: rerun it to resume, or pass --overwrite\)$"):
        find_shards(out)
    first = storage.info(f"{out}/{NAMES3[0]}")
    with pytest.raises(FileExistsError, match=rf"^{out}/{NAMES3[0]}: written by a different `mpmae shard` run"):
        write_shards(mmearth10, out, "parquet", tiles_per_shard=4, progress=False, parallel=False)
    reads["n"] = -100
    paths = write_shards(mmearth10, out, "parquet", tiles_per_shard=3, progress=False, parallel=False)
    assert reads["n"] == -100 + 2  # shards 1 and 2 only
    kept = storage.info(f"{out}/{NAMES3[0]}")
    assert (kept.mtime, kept.size) == (first.mtime, first.size)
    assert find_shards(out) == paths
    assert_equal_to(read_uris(paths), expected)


def test_a_missing_manifest_refuses_and_overwrite_replaces(s3: S3Store, mmearth10: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = f"{s3.bucket()}/shards"
    write_shards(mmearth10, out, "parquet", tiles_per_shard=3, progress=False, parallel=False)
    assert main(["shard", str(mmearth10), out, "--tiles-per-shard", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mpmae shard: error: {out}: already holds a complete parquet shard set of split 'train' "
                   f"(3 shard(s), train-parquet.json); pass overwrite=True (--overwrite) to replace it"]
    storage.delete_file(f"{out}/train-parquet.json")
    with pytest.raises(ShardError, match=rf"^{out}: the parquet shard set of split 'train' is incomplete"):
        find_shards(out)
    assert main(["shard", str(mmearth10), out, "--tiles-per-shard", "4", "--overwrite"]) == 0
    names = [f"train-0000{i}-of-00002.parquet" for i in range(2)]
    assert sorted(storage.file_sizes(out)) == [*names, "train-parquet.json"]  # the 3-shard set is gone
    assert [s["name"] for s in manifest_of(out)["shards"]] == names
    foreign = f"{out}/{names[0]}"
    storage.write_bytes(foreign, b"PAR1 someone else's", overwrite=True)
    with pytest.raises(FileExistsError, match=rf"refusing to replace {foreign}: it carries no mpmae shard metadata"):
        write_shards(mmearth10, out, "parquet", tiles_per_shard=4, overwrite=True, progress=False, parallel=False)
    assert storage.read_bytes(foreign) == b"PAR1 someone else's" and storage.exists(f"{out}/train-parquet.json")


def test_a_missing_bucket_is_one_line(s3: S3Store, mmearth10: Path, capsys: pytest.CaptureFixture[str]) -> None:
    uri = "s3://no-such-bucket/shards"
    assert main(["shard", str(mmearth10), uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpmae shard: error: ") and uri in err[0], err


def _config(path: str, fmt: str, tmp_path: Path) -> PretrainConfig:
    return load_config(PretrainConfig, REPO / "configs" / "demo.yaml", [
        f"data.path={path}", f"data.format={fmt}", f"run.storage_path={tmp_path}", "optim.batch_size=4"])


def test_describe_data_takes_shards_from_the_store(s3: S3Store, mmearth10: Path, tmp_path: Path) -> None:
    out = f"{s3.bucket()}/shards"
    write_shards(mmearth10, out, "parquet", tiles_per_shard=3, progress=False, parallel=False)
    source = describe_data(_config(out, "parquet", tmp_path))
    assert (source.rows, source.image_size, source.name) == (8, 64, "shards")
    assert "sentinel2_l1c" in source.band_stats or "sentinel2_l2a" in source.band_stats
    with pytest.raises(ConfigError, match=rf"^data\.path: {out}: the MMEarth h5 folder must be local .*`mpmae shard"):
        describe_data(_config(out, "mmearth", tmp_path))
    with pytest.raises(ConfigError, match=rf"^data\.path: {out}: FFCV reads local shards only; copy them"):
        describe_data(_config(out, "ffcv", tmp_path))
    with pytest.raises(ConfigError, match=r"^data\.path: .*s3://no-such-bucket/x"):
        describe_data(_config("s3://no-such-bucket/x", "parquet", tmp_path))
    empty = f"{s3.bucket()}/empty"
    with pytest.raises(ConfigError, match=rf"^data\.path: {empty}: no parquet shards"):
        describe_data(_config(empty, "parquet", tmp_path))
