"""Loaders deliver the canonical batch dict equal to MMEarthDataset; the aligned random crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mpmae.data import MMEarthDataset
from mpmae.data.loaders import (
    MMEarthDatasource,
    aligned_random_crop,
    ffcv_loader,
    iter_ray_batches,
    ray_dataset,
    to_batch,
)
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


def test_to_batch_normalises_ray_and_ffcv_outputs() -> None:
    frozen = np.arange(6, dtype=np.float32).reshape(2, 3)
    frozen.flags.writeable = False
    ray_like = {"id": np.array(["a", "b"], dtype=object), "sentinel2": frozen}
    batch = to_batch(ray_like)
    assert batch["id"] == ["a", "b"] and batch["sentinel2"].dtype == torch.float32
    batch["sentinel2"].add_(1)  # a copy: the read-only source is untouched
    assert frozen[0, 0] == 0
    ffcv_like = {"biome": torch.zeros(2, 14, dtype=torch.int64),
                 "id": torch.tensor([[97, 0, 0], [98, 99, 0]], dtype=torch.uint8)}
    batch = to_batch(ffcv_like)
    assert batch["id"] == ["a", "bc"] and list(batch) == ["biome", "id"]
    assert batch["biome"] is not ffcv_like["biome"]  # FFCV reuses its buffers
    assert list(to_batch({"era5": torch.ones(2, 12)})) == ["era5"]


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
    source = MMEarthDatasource(synth, block_rows=5)
    tasks = source.get_read_tasks(parallelism=3)
    assert len(tasks) == 3 and sum(t.metadata.num_rows for t in tasks) == 32
    assert source.estimate_inmemory_data_size() == 32 * tasks[0].metadata.size_bytes // tasks[0].metadata.num_rows
    blocks = [table for task in tasks for table in task()]
    assert [b.num_rows for b in blocks] == [5, 5, 5, 5, 5, 5, 2]
    shuffled = MMEarthDatasource(synth, block_rows=5, shuffle=True, seed=1).get_read_tasks(parallelism=1)
    ids = [i for table in shuffled[0]() for i in table.column("id").to_pylist()]
    assert ids != sorted(ids) and sorted(ids) == sorted(i for b in blocks for i in b.column("id").to_pylist())


@pytest.mark.ray
@pytest.mark.timeout(RAY_TIMEOUT)
@pytest.mark.parametrize("source", ["folder", "parquet"])
def test_ray_dataset_equals_mmearth_dataset(source: str, ray_cluster: object, synth: Path, parquet_dir: Path,
                                            expected: dict) -> None:
    data = ray_dataset(synth if source == "folder" else parquet_dir, block_rows=8)
    batches = list(iter_ray_batches(data, batch_size=10))
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
        # without the string column, Ray's default collate works too; to_batch makes it canonical
        batches = [to_batch(b) for b in data.iter_torch_batches(batch_size=16)]
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
    batches = list(loader)
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
