"""Parquet and FFCV shard writers: round trip, metadata, refusal to overwrite, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mpmae.data import MMEarthDataset
from mpmae.data.normalize import S2_LEVEL_KEY
from mpmae.data.shards import (
    ShardError,
    ffcv_field_modality,
    find_shards,
    read_shard_metadata,
    table_to_batch,
    table_to_raw,
    write_shards,
)
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.modalities import MODALITIES, PRESETS
from tests.crafted.mmearth import copy_mmearth_folder, edit_mmearth_json


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic tiles (32 in train): real no-data patterns (S1 -inf, S2 zeros, label no-data)."""
    return write_synthetic_mmearth(tmp_path_factory.mktemp("synth") / "folder", 40, size=64, seed=3)


def assert_batches_equal(got: dict, expected: dict) -> None:
    """Exact equality, NaN where NaN, same dtypes, same keys and ids."""
    assert list(got) == list(expected)
    assert got["id"] == expected["id"]
    for name, value in expected.items():
        if name != "id":
            assert got[name].dtype == value.dtype, name
            np.testing.assert_array_equal(got[name], value, err_msg=name)


def read_parquet_shards(paths: list[Path]) -> dict:
    return table_to_batch(pa.concat_tables(pq.read_table(p) for p in paths))


@pytest.mark.parametrize("source", ["mmearth10", "synth"])
def test_parquet_round_trip_equals_dataset(source: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    folder = request.getfixturevalue(source)
    paths = write_shards(folder, tmp_path, "parquet", tiles_per_shard=4, progress=False)
    dataset = MMEarthDataset(folder)
    count = -(-len(dataset) // 4)
    assert [p.name for p in paths] == [f"train-{i:05d}-of-{count:05d}.parquet" for i in range(count)]
    assert find_shards(tmp_path) == paths
    assert_batches_equal(read_parquet_shards(paths), dataset.read_batch(np.arange(len(dataset))))
    # no .tmp left; the manifest lists every shard with its rows
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([p.name for p in paths] + ["train-parquet.json"])
    manifest = json.loads((tmp_path / "train-parquet.json").read_text())
    assert [(s["name"], s["rows"]) for s in manifest["shards"]] == [
        (p.name, pq.read_metadata(p).num_rows) for p in paths]
    assert manifest["rows"] == len(dataset) and manifest["format"] == "parquet"
    assert manifest["fingerprint"] == read_shard_metadata(paths[0])["fingerprint"]


def test_parquet_schema_and_metadata(mmearth10: Path, tmp_path: Path) -> None:
    (path,) = write_shards(mmearth10, tmp_path, "parquet", tiles_per_shard=10, progress=False)
    schema = pq.read_schema(path)
    s2 = schema.field("sentinel2")
    # a plain fixed-size list of the h5's own dtype, which any Arrow reader decodes; the shape in the field
    assert s2.type == pa.list_(pa.uint16(), 12 * 64 * 64)
    assert json.loads(s2.metadata[b"shape"]) == [12, 64, 64]
    assert json.loads(s2.metadata[b"bands"]) == list(PRESETS["all_mod"]["sentinel2"])
    assert schema.field("dynamic_world").type == pa.list_(pa.uint8(), 64 * 64)
    assert schema.field("sentinel1").type.value_type == pa.float32()
    assert schema.field(S2_LEVEL_KEY).type == pa.bool_() and schema.field("id").type == pa.string()
    meta = read_shard_metadata(path)
    assert meta["format_version"] == 2
    assert meta["selection"] == {k: list(v) for k, v in PRESETS["all_mod"].items()}
    assert meta["image_size"] == 64 and meta["split"] == "train"
    assert meta["registry"]["sentinel1"]["no_data"] == "-inf"
    assert meta["registry"]["esa_worldcover"]["num_classes"] == 11
    stats = json.loads((mmearth10 / "data_synth_v001_64_band_stats.json").read_text())
    assert json.dumps(meta["band_stats"], sort_keys=True) == json.dumps(stats, sort_keys=True)  # NaN where NaN
    assert meta["normalization"] == MMEarthDataset(mmearth10).normalizer.to_dict()
    raw = table_to_raw(pq.read_table(path))
    np.testing.assert_array_equal(raw["sentinel2"], MMEarthDataset(mmearth10).read_raw(np.arange(8))["sentinel2"])


def test_shards_of_the_older_preprocessed_format_are_refused(mmearth10: Path, tmp_path: Path) -> None:
    write_shards(mmearth10, tmp_path, "parquet", tiles_per_shard=10, progress=False)
    manifest = tmp_path / "train-parquet.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format_version": 1}))
    with pytest.raises(ShardError, match=r"shard format 1, this mpmae reads format 2 .* `mpmae shard --overwrite`"):
        find_shards(tmp_path)


def test_parquet_band_selection(synth: Path, tmp_path: Path) -> None:
    selection = {"sentinel2": ["B4", "B2"], "biome": None, "esa_worldcover": None}
    paths = write_shards(synth, tmp_path, "parquet", tiles_per_shard=100, modalities=selection, progress=False)
    dataset = MMEarthDataset(synth, modalities=selection)
    batch = read_parquet_shards(paths)
    assert batch["sentinel2"].shape == (len(dataset), 2, 64, 64)
    assert_batches_equal(batch, dataset.read_batch(np.arange(len(dataset))))
    assert read_shard_metadata(paths[0])["selection"]["sentinel2"] == ["B2", "B4"]


def test_ffcv_shards_layout(mmearth10: Path, tmp_path: Path) -> None:
    from ffcv.reader import Reader

    paths = write_shards(mmearth10, tmp_path, "ffcv", tiles_per_shard=6, progress=False)
    assert [p.name for p in paths] == ["train-00000-of-00002.beton", "train-00001-of-00002.beton"]
    assert [Reader(str(p)).num_samples for p in paths] == [6, 2]  # the 8 train tiles
    handlers = Reader(str(paths[0])).handlers
    names = [ffcv_field_modality(f) for f in handlers]
    assert names == [*PRESETS["all_mod"], S2_LEVEL_KEY, "id"]
    assert handlers["sentinel2"].shape == (12, 64, 64) and handlers["sentinel2"].dtype == np.uint16
    assert handlers["canopy_height_et"].dtype == np.int8  # the h5's dtype, under FFCV's 16-byte name
    assert handlers["esa_worldcover"].dtype == np.uint8 and handlers["id"].dtype == np.uint8
    sidecar = json.loads((tmp_path / "train-ffcv.json").read_text())
    assert [(s["name"], s["rows"]) for s in sidecar["shards"]] == [(paths[0].name, 6), (paths[1].name, 2)]
    assert "band_stats" in sidecar and sidecar["rows"] == 8
    assert find_shards(tmp_path, format="ffcv") == paths


def test_ffcv_field_names_map_back() -> None:
    for name in (*MODALITIES, "id"):
        assert ffcv_field_modality(name[:16]) == name
    with pytest.raises(ShardError):
        ffcv_field_modality("nope")


@pytest.mark.parametrize("format", ["parquet", "ffcv"])
def test_refuses_existing_shards_unless_overwrite(format: str, mmearth10: Path, tmp_path: Path) -> None:
    ext = "parquet" if format == "parquet" else "beton"
    old = write_shards(mmearth10, tmp_path, format, tiles_per_shard=3, progress=False)
    assert len(old) == 3  # the 8 train tiles: one more shard than the rewrite below
    unrelated = tmp_path / "notes.txt"
    unrelated.write_text("keep me")
    other_split = tmp_path / f"val-00000-of-00001.{ext}"
    other_split.write_bytes(b"not touched")
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(mmearth10, tmp_path, format, tiles_per_shard=5, progress=False)
    assert sorted(tmp_path.glob(f"train-*.{ext}")) == old
    new = write_shards(mmearth10, tmp_path, format, tiles_per_shard=5, overwrite=True, progress=False)
    assert sorted(tmp_path.glob(f"train-*.{ext}")) == new == [
        tmp_path / f"train-0000{i}-of-00002.{ext}" for i in range(2)
    ]
    assert unrelated.read_text() == "keep me" and other_split.read_bytes() == b"not touched"


@pytest.mark.parametrize("format", ["parquet", "ffcv"])
def test_failed_shard_leaves_no_partial_file(format: str, mmearth10: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Shard 0 completes, reading shard 1 fails: shard 0 is visible, shard 1 neither final nor .tmp."""
    calls = {"n": 0}
    read_raw = MMEarthDataset.read_raw

    def failing(self: MMEarthDataset, indices: np.ndarray) -> dict:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError("disk on fire")
        return read_raw(self, indices)

    monkeypatch.setattr(MMEarthDataset, "read_raw", failing)
    with pytest.raises(OSError, match="disk on fire"):
        write_shards(mmearth10, tmp_path, format, tiles_per_shard=5, progress=False, parallel=False)
    ext = "parquet" if format == "parquet" else "beton"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"train-00000-of-00002.{ext}"]  # and no manifest
    with pytest.raises(ShardError, match=rf"^{tmp_path}: the {format} shard set of split 'train' is incomplete: .*"
                                         r"interrupted `mpmae shard`: rerun it to resume, or pass --overwrite"):
        find_shards(tmp_path, format=format)
    monkeypatch.undo()
    paths = write_shards(mmearth10, tmp_path, format, tiles_per_shard=5, progress=False, parallel=False)  # resumes
    assert find_shards(tmp_path, format=format) == paths


def test_parquet_write_interrupted_mid_file(mmearth10: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure after some row groups were written removes the partial .tmp file."""
    write_table = pq.ParquetWriter.write_table
    calls = {"n": 0}

    def failing(self: pq.ParquetWriter, table: pa.Table, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        write_table(self, table, *args, **kwargs)

    monkeypatch.setattr("mpmae.data.shards.BLOCK_ROWS", 4)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing)
    with pytest.raises(KeyboardInterrupt):
        write_shards(mmearth10, tmp_path, "parquet", tiles_per_shard=10, progress=False, parallel=False)
    assert list(tmp_path.iterdir()) == []


def test_find_shards_errors(tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="no parquet shards"):
        find_shards(tmp_path)
    for name in ("train-00000-of-00003.parquet", "train-00001-of-00003.parquet", "train-00000-of-00002.parquet"):
        (tmp_path / name).touch()
    with pytest.raises(ShardError, match="incomplete: 3 shard file.*no manifest train-parquet.json"):
        find_shards(tmp_path)
    assert find_shards([tmp_path / "a.parquet"]) == [tmp_path / "a.parquet"]
    assert find_shards(["s3://b/a.parquet"]) == ["s3://b/a.parquet"]
    with pytest.raises(ShardError, match="mixes"):
        find_shards([tmp_path / "a.parquet", "s3://b/a.parquet"])


def test_find_shards_refuses_a_manifest_that_does_not_match(mmearth10: Path, tmp_path: Path) -> None:
    paths = write_shards(mmearth10, tmp_path, "parquet", tiles_per_shard=3, progress=False, parallel=False)
    manifest = tmp_path / "train-parquet.json"
    content = json.loads(manifest.read_text())
    wrong = json.loads(json.dumps(content))
    wrong["shards"][1]["rows"] = 4
    manifest.write_text(json.dumps(wrong))
    with pytest.raises(ShardError, match=rf"^{paths[1]}: holds 3 rows, {manifest} says 4"):
        find_shards(tmp_path)
    manifest.write_text(json.dumps(content))
    paths[2].rename(tmp_path / "elsewhere.parquet")
    with pytest.raises(ShardError, match=rf"^{paths[2]}: listed in {manifest} but missing"):
        find_shards(tmp_path)
    manifest.write_text("{not json")
    with pytest.raises(ShardError, match="not a manifest mpmae shard wrote"):
        find_shards(tmp_path)


def test_rerun_resumes_same_run_and_refuses_another(mmearth10: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupted run's shards are kept when this run is the same; a different run's refuse."""
    calls = {"n": 0}
    read_raw = MMEarthDataset.read_raw

    def failing(self: MMEarthDataset, indices: np.ndarray) -> dict:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("interrupted")
        return read_raw(self, indices)

    monkeypatch.setattr(MMEarthDataset, "read_raw", failing)
    with pytest.raises(OSError, match="interrupted"):
        write_shards(mmearth10, tmp_path, "parquet", tiles_per_shard=3, progress=False, parallel=False)
    first = tmp_path / "train-00000-of-00003.parquet"
    before = first.stat().st_mtime_ns
    with pytest.raises(FileExistsError, match=rf"^{first}: written by a different `mpmae shard` run .*--overwrite"):
        write_shards(mmearth10, tmp_path, "parquet", tiles_per_shard=4, progress=False, parallel=False)
    with pytest.raises(FileExistsError, match="different `mpmae shard` run"):
        write_shards(mmearth10, tmp_path, "parquet", tiles_per_shard=3, modalities=["sentinel2"], progress=False,
                     parallel=False)
    calls["n"] = -100
    paths = write_shards(mmearth10, tmp_path, "parquet", tiles_per_shard=3, progress=False, parallel=False)
    assert calls["n"] == -100 + 2  # shards 1 and 2 only: one read block each
    assert first.stat().st_mtime_ns == before and find_shards(tmp_path) == paths
    assert_batches_equal(read_parquet_shards(paths), MMEarthDataset(mmearth10).read_batch(np.arange(8)))
    other = write_shards(mmearth10, tmp_path, "parquet", tiles_per_shard=4, overwrite=True, progress=False)
    assert sorted(tmp_path.iterdir()) == sorted([*other, tmp_path / "train-parquet.json"])


def test_write_shards_argument_errors(mmearth10: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format"):
        write_shards(mmearth10, tmp_path, "tfrecord", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tiles_per_shard"):
        write_shards(mmearth10, tmp_path, tiles_per_shard=0, progress=False)
    empty_val = copy_mmearth_folder(mmearth10, tmp_path / "empty_val")
    edit_mmearth_json(empty_val, "splits", lambda splits: splits.update(val=[]))
    with pytest.raises(ValueError, match="no tiles"):
        write_shards(empty_val, tmp_path / "out", split="val", progress=False)
