"""The held-out land-cover task built from an MMEarth folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpmae.data.downstream import dominant_class, land_cover_task
from mpmae.data.mmearth import MMEarthDataset
from mpmae.data.synth import write_synthetic_mmearth


def test_dominant_class_ignores_no_data() -> None:
    maps = np.array([[[[2, 2, -1, -1, -1]]], [[[-1, -1, -1, -1, -1]]], [[[0, 1, 1, 0, 0]]]])
    np.testing.assert_array_equal(dominant_class(maps, 3), [2, -1, 0])


def test_task_uses_held_out_tiles_and_sentinel2_only(tmp_path: Path) -> None:
    folder = write_synthetic_mmearth(tmp_path / "data", tiles=30, seed=2)
    x, y = land_cover_task(folder, "val", crop_size=56)
    val = MMEarthDataset(folder, "val", ["sentinel2", "esa_worldcover"])
    crop = val.read_batch(range(len(val)))["esa_worldcover"][:, :, 4:60, 4:60]
    expected = dominant_class(crop, 11)
    expected = expected[expected >= 0]
    assert len(expected) >= len(val) - 1
    assert x.shape == (len(expected), 12, 56, 56) and str(x.dtype) == "torch.float32"
    assert not x.isnan().any() and y.min() >= 0 and y.max() < 11
    np.testing.assert_array_equal(y.numpy(), expected)
    with pytest.raises(ValueError, match="exceeds the tiles' 64 px"):
        land_cover_task(folder, "val", crop_size=72)
