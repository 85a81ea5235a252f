"""Loaders deliver raw batches whose normalisation equals MMEarthDataset's batches; the aligned random crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mpmae.data import MMEarthDataset
from mpmae.data.loaders import (
    MMEarthDatasource,
    aligned_random_crop,
    feed_normalizer,
    ffcv_loader,
    iter_raw_batches,
    iter_ray_batches,
    raw_tensors,
    ray_dataset,
)
from mpmae.data.normalize import S2_LEVEL_KEY
from mpmae.data.shards import ShardError, write_shards
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.modalities import MODALITIES, PRESETS

RAY_TIMEOUT = 120


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic tiles: 32 in train, so several read blocks and shards."""
    return write_synthetic_mmearth(tmp_path_factory.mktemp("synth") / "folder", 40, size=64, seed=5)


@pytest.fixture(scope="module")
def expected(synth: Path) -> dict:
    dataset = MMEarthDataset(synth)
    return dataset.read_batch(np.arange(len(dataset)))


@pytest.fixture(scope="module")
def parquet_dir(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("parquet")
    write_shards(synth, out, "parquet", tiles_per_shard=12, progress=False)
    return out


def collect(batches: list[dict]) -> dict:
    """Batches concatenated and put back in split order (Ray Data does not preserve order)."""
    ids = [i for b in batches for i in b["id"]]
    order = np.argsort(ids)
    out = {k: torch.cat([b[k] for b in batches]).numpy()[order] for k in batches[0] if k != "id"}
    out["id"] = [ids[i] for i in order]
    return out


def assert_canonical(batch: dict, keys: list[str], size: int = 64) -> None:
    """Keys in selection order then ``id``; writable torch tensors of the dataset's dtypes and shapes."""
    assert list(batch) == [*keys, "id"]
    assert isinstance(batch["id"], list) and all(isinstance(i, str) for i in batch["id"])
    n = len(batch["id"])
    for name in keys:
        modality = MODALITIES[name]
        tensor = batch[name]
        assert isinstance(tensor, torch.Tensor)
        assert tensor.dtype == (torch.int64 if modality.is_label else torch.float32), name
        bands = len(PRESETS["all_mod"][name])
        assert tensor.shape == ((n, bands, size, size) if modality.level == "pixel" else (n, bands)), name
        tensor.add_(0)  # must not raise: the trainer may sanitise in place


def assert_equal_to(got: dict, expected: dict) -> None:
    assert got["id"] == expected["id"]
    for name in got:
        if name != "id":
            assert got[name].dtype == expected[name].dtype, name
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


# -- canonical batch --------------------------------------------------------------------------------


def test_raw_tensors_view_ray_and_ffcv_outputs_without_copies() -> None:
    frozen = np.arange(6, dtype=np.uint16).reshape(2, 3)
    frozen.flags.writeable = False  # Arrow's memory in Ray's object store
    ray_like = {"sentinel2": frozen, S2_LEVEL_KEY: np.array([True, False]), "id": np.array(["a", "b"], dtype=object)}
    batch = raw_tensors(ray_like)
    assert list(batch) == ["sentinel2", S2_LEVEL_KEY, "id"] and batch["id"] == ["a", "b"]
    assert batch["sentinel2"].dtype == torch.uint16 and batch["sentinel2"].data_ptr() == frozen.ctypes.data
    ffcv_like = {"biome": torch.zeros(2, 14, dtype=torch.uint8),
                 S2_LEVEL_KEY: torch.tensor([[1], [0]], dtype=torch.uint8),
                 "id": torch.tensor([[97, 0, 0], [98, 99, 0]], dtype=torch.uint8)}
    batch = raw_tensors(ffcv_like)
    assert batch["id"] == ["a", "bc"] and batch["biome"] is ffcv_like["biome"]
    assert torch.equal(batch[S2_LEVEL_KEY], torch.tensor([True, False]))  # FFCV's (N, 1) bytes as (N,) bools


# -- aligned random crop ----------------------------------------------------------------------------


def coordinate_batch(n: int = 16, size: int = 64) -> dict:
    """Pixel modalities whose values encode (row, col), so a crop's offset can be read off its values."""
    rows = torch.arange(size).view(1, 1, size, 1).expand(n, 1, size, size)
    cols = torch.arange(size).view(1, 1, 1, size).expand(n, 1, size, size)
    code = (rows * 1000 + cols).float()
    return {
        "sentinel2": code.repeat(1, 12, 1, 1) + torch.arange(12).view(1, 12, 1, 1) * 1e6,
        "sentinel1": code.repeat(1, 8, 1, 1).clone(),
        "dynamic_world": (rows * 1000 + cols).long().contiguous(),
        "esa_worldcover": (rows * 1000 + cols).long().contiguous(),
        "era5": torch.randn(n, 12),
        "biome": torch.eye(14, dtype=torch.int64)[torch.arange(n) % 14],
        "id": [str(i) for i in range(n)],
    }


def test_aligned_crop_of_a_raw_batch_equals_the_crop_of_its_normalisation(synth: Path) -> None:
    """The worker crops raw values (uint16, uint8, int16, ...) before normalising: same result as after."""
    dataset = MMEarthDataset(synth)
    raw = raw_tensors(dataset.read_raw(np.arange(8)))
    raw.pop("id")
    crop_raw = dataset.normalizer(aligned_random_crop(raw, 56, generator=torch.Generator().manual_seed(3)))
    whole = dataset.normalizer(raw)
    crop_whole = aligned_random_crop(whole, 56, generator=torch.Generator().manual_seed(3))
    assert raw["sentinel2"].dtype == torch.uint16 and raw["esa_worldcover"].dtype == torch.uint8
    for name in PRESETS["all_mod"]:
        assert torch.equal(crop_raw[name].nan_to_num(-9), crop_whole[name].nan_to_num(-9)), name


@pytest.mark.parametrize(("size", "crop"), [(64, 56), (128, 112)])
def test_aligned_crop_shares_offsets_across_modalities(size: int, crop: int) -> None:
    batch = coordinate_batch(size=size)
    out = aligned_random_crop(batch, crop, generator=torch.Generator().manual_seed(0))
    top = out["dynamic_world"][:, 0, 0, 0] // 1000
    left = out["dynamic_world"][:, 0, 0, 0] % 1000
    assert top.max() <= size - crop and left.max() <= size - crop
    expected = (top.view(-1, 1, 1) + torch.arange(crop).view(1, crop, 1)) * 1000 + (
        left.view(-1, 1, 1) + torch.arange(crop).view(1, 1, crop))
    for name in ("sentinel2", "sentinel1", "dynamic_world", "esa_worldcover"):
        assert out[name].shape[-2:] == (crop, crop) and out[name].dtype == batch[name].dtype
        assert torch.equal(out[name][:, :1].long() % 1_000_000, expected.unsqueeze(1)), name
    assert torch.equal(out["sentinel2"][:, :, 0, 0] // 1e6, torch.arange(12.0).expand(16, 12))
    assert out["era5"] is batch["era5"] and out["biome"] is batch["biome"] and out["id"] is batch["id"]
    assert len(set(zip(top.tolist(), left.tolist(), strict=True))) > 1  # independent per sample


def test_aligned_crop_is_reproducible_and_checks_shapes() -> None:
    batch = coordinate_batch()
    a = aligned_random_crop(batch, 56, generator=torch.Generator().manual_seed(7))
    b = aligned_random_crop(batch, 56, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a["sentinel2"], b["sentinel2"])
    assert aligned_random_crop(batch, 64)["sentinel2"].equal(batch["sentinel2"])
    with pytest.raises(ValueError, match="does not fit"):
        aligned_random_crop(batch, 65)
    with pytest.raises(ValueError, match="one N, H, W"):
        aligned_random_crop({**batch, "aster": torch.zeros(16, 2, 32, 32)}, 28)
    assert aligned_random_crop({"era5": batch["era5"]}, 56)["era5"] is batch["era5"]


# -- Ray Data ---------------------------------------------------------------------------------------


def test_datasource_read_tasks_cover_the_split_in_blocks(synth: Path) -> None:
    source = MMEarthDatasource(synth, block_rows=2)
    tasks = source.get_read_tasks(parallelism=3)  # 16 runs of 2 rows, at least RUNS_PER_TASK (8) a task
    assert len(tasks) == 2 and [t.metadata.num_rows for t in tasks] == [16, 16]
    assert source.estimate_inmemory_data_size() == 32 * tasks[0].metadata.size_bytes // tasks[0].metadata.num_rows
    assert len(MMEarthDatasource(synth, block_rows=1).get_read_tasks(parallelism=3)) == 3  # 32 runs
    blocks = [table for task in tasks for table in task()]
    assert [b.num_rows for b in blocks] == [2] * 16
    shuffled = MMEarthDatasource(synth, block_rows=5, shuffle=True, seed=1).get_read_tasks(parallelism=1)
    ids = [i for table in shuffled[0]() for i in table.column("id").to_pylist()]
    assert ids != sorted(ids) and sorted(ids) == sorted(i for b in blocks for i in b.column("id").to_pylist())


@pytest.mark.ray
@pytest.mark.timeout(RAY_TIMEOUT)
@pytest.mark.parametrize("source", ["folder", "parquet"])
def test_ray_dataset_equals_mmearth_dataset(source: str, ray_cluster: object, synth: Path, parquet_dir: Path,
                                            expected: dict) -> None:
    where = synth if source == "folder" else parquet_dir
    data = ray_dataset(where, block_rows=8)
    batches = list(iter_ray_batches(data, 10, feed_normalizer(where)))
    assert [len(b["id"]) for b in batches] == [10, 10, 10, 2]
    for batch in batches:
        assert_canonical(batch, list(PRESETS["all_mod"]))
    assert_equal_to(collect(batches), expected)


@pytest.mark.ray
@pytest.mark.timeout(RAY_TIMEOUT)
def test_ray_dataset_options(ray_cluster: object, synth: Path, parquet_dir: Path, expected: dict) -> None:
    subset = ["sentinel2", "biome"]
    for source in (synth, parquet_dir):
        data = ray_dataset(source, modalities=subset, include_id=False, shuffle=True, seed=0)
        raw = list(iter_raw_batches(data, 16))
        assert list(raw[0]) == [*subset, S2_LEVEL_KEY] and raw[0]["sentinel2"].dtype == torch.uint16
        normalizer = feed_normalizer(source, modalities=subset)
        batches = [normalizer(b) for b in raw]
        assert list(batches[0]) == subset
        total = torch.cat([b["sentinel2"] for b in batches])
        assert total.shape == (32, 12, 64, 64)
        np.testing.assert_array_equal(np.sort(total.sum((1, 2, 3)).numpy()),
                                      np.sort(torch.from_numpy(expected["sentinel2"]).sum((1, 2, 3)).numpy()))
    with pytest.raises(ShardError, match="not in the shards"):
        ray_dataset(parquet_dir, modalities={"sentinel2": ["B2"]})


# -- FFCV -------------------------------------------------------------------------------------------


def test_ffcv_loader_equals_mmearth_dataset(synth: Path, expected: dict, tmp_path: Path) -> None:
    write_shards(synth, tmp_path, "ffcv", tiles_per_shard=20, progress=False)
    loader = ffcv_loader(tmp_path, batch_size=8)
    assert len(loader) == 3 + 2  # a batch never spans two shards (20 + 12 tiles)
    normalizer = MMEarthDataset(synth).normalizer
    batches = [normalizer(b) for b in loader]  # new tensors: FFCV reuses its buffers
    for batch in batches:
        assert_canonical(batch, list(PRESETS["all_mod"]))
    assert_equal_to(collect(batches), expected)
    assert [i for b in batches for i in b["id"]] == expected["id"]  # sequential order
    shuffled = ffcv_loader(tmp_path, batch_size=8, shuffle=True, seed=1, modalities=["era5"])
    first, second = ([i for b in shuffled for i in b["id"]] for _ in range(2))
    assert sorted(first) == sorted(second) == expected["id"] and first != second
    assert list(next(iter(shuffled))) == ["era5", "id"]


def test_a_mid_epoch_resume_on_ffcv_takes_exactly_the_rest_of_the_epoch(synth: Path, tmp_path: Path) -> None:
    """A rank's epoch order depends only on (seed, epoch, rank), the seed the worker gives a fresh loader each
    epoch: skipping the batches a checkpoint had done yields the rest of that epoch, none repeated or missed."""
    write_shards(synth, tmp_path, "ffcv", tiles_per_shard=20, progress=False)

    def epoch_ids(skip: int) -> list[list[str]]:
        batches = iter(ffcv_loader(tmp_path, batch_size=4, shuffle=True, seed=1003, drop_last=True,
                                   modalities=["era5"]))
        for _ in range(skip):
            next(batches)
        return [list(b["id"]) for b in batches]

    whole, resumed = epoch_ids(0), epoch_ids(3)
    assert resumed == whole[3:] and len({i for b in whole for i in b}) == 4 * len(whole)


def test_one_ffcv_loader_serves_every_epoch_and_replays_any(synth: Path, tmp_path: Path) -> None:
    """The worker builds its FFCV loader once a run: an epoch's order depends only on (seed, epoch), so a run
    resumed at epoch 2 draws what it would have drawn."""
    write_shards(synth, tmp_path, "ffcv", tiles_per_shard=20, progress=False)
    loader = ffcv_loader(tmp_path, batch_size=4, shuffle=True, seed=7, drop_last=True, modalities=["era5"])
    epochs = [[i for b in loader for i in b["id"]] for _ in range(3)]
    assert len({tuple(e) for e in epochs}) == 3 and all(sorted(e) == sorted(epochs[0]) for e in epochs)
    resumed = ffcv_loader(tmp_path, batch_size=4, shuffle=True, seed=7, drop_last=True, modalities=["era5"])
    resumed.set_epoch(2)
    assert [i for b in resumed for i in b["id"]] == epochs[2]
