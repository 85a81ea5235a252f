"""The normalisation the workers run on their device equals the numpy one the golden tests hold, bit for bit
(on real data: tests/external/test_mmearth_golden.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mpmae.data import MMEarthDataset
from mpmae.data.normalize import S2_LEVEL_KEY, BandStatsError, Normalizer
from mpmae.modalities import PRESETS
from tests.crafted.mmearth import copy_mmearth_folder, edit_mmearth_json

WITH_MASKS = [*PRESETS["all_mod"], "sentinel2_cloudmask", "sentinel2_scl"]


def torch_normalised(dataset: MMEarthDataset, raw: dict) -> dict:
    tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in raw.items()}
    return {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in dataset.normalizer(tensors).items()}


def assert_identical(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for name, value in expected.items():
        if name != "id":
            assert got[name].dtype == value.dtype, name
            np.testing.assert_array_equal(got[name], value, err_msg=name)  # NaN where NaN


def test_both_paths_agree_on_levels_masks_and_no_data(mmearth10: Path) -> None:
    dataset = MMEarthDataset(mmearth10, modalities=WITH_MASKS)
    raw = dataset.read_raw(np.arange(len(dataset)))
    assert raw[S2_LEVEL_KEY].any() and not raw[S2_LEVEL_KEY].all()  # both processing levels in one batch
    raw["sentinel2_cloudmask"][:, :, 0] = 65535  # the mask's no-data code
    numpy = dataset.normalizer.numpy(raw)
    assert np.isnan(numpy["sentinel1"]).any() and (numpy["sentinel2_cloudmask"][:, :, 0] == -1).all()
    assert_identical(torch_normalised(dataset, raw), numpy)
    # the tile's level picks its statistics: the same raw values z-score differently under L1C and L2A
    flipped = torch_normalised(dataset, {**raw, S2_LEVEL_KEY: ~raw[S2_LEVEL_KEY]})
    assert not np.array_equal(flipped["sentinel2"], numpy["sentinel2"], equal_nan=True)


def test_the_normalizer_travels_as_json_and_takes_subsets(mmearth10: Path) -> None:
    dataset = MMEarthDataset(mmearth10)
    content = json.loads(json.dumps(dataset.normalizer.to_dict()))
    again = Normalizer.from_dict(content)
    raw = dataset.read_raw(np.arange(4))
    assert_identical(again.numpy(raw), dataset.normalizer.numpy(raw))
    subset = again.subset(["era5", "biome"])
    assert list(subset.numpy(raw)) == ["era5", "biome", "id"]
    with pytest.raises(BandStatsError, match="no band statistics for modality 'aster'"):
        Normalizer({"aster": ("elevation", "slope")}, {})
    with pytest.raises(KeyError, match=S2_LEVEL_KEY):
        dataset.normalizer({k: v for k, v in raw.items() if k != S2_LEVEL_KEY})


def test_a_level_without_statistics_takes_the_other_levels(mmearth10: Path, tmp_path: Path) -> None:
    folder = copy_mmearth_folder(mmearth10, tmp_path / "l2a-only")
    edit_mmearth_json(folder, "tile_info", lambda info: [tile.update(S2_type="l2a") for tile in info.values()])
    edit_mmearth_json(folder, "band_stats", lambda stats: stats.pop("sentinel2_l1c"))
    dataset = MMEarthDataset(folder, modalities=["sentinel2"])
    raw = dataset.read_raw(np.arange(4))
    as_l1c = dataset.normalizer.numpy({**raw, S2_LEVEL_KEY: np.zeros(4, dtype=bool)})
    np.testing.assert_array_equal(as_l1c["sentinel2"], dataset.normalizer.numpy(raw)["sentinel2"])
