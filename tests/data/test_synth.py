"""The synthetic MMEarth generator: real-data format, no-data conventions, statistics, safety, learnability."""

from __future__ import annotations

import json
import warnings
from datetime import date
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpmae.data import MMEarthDataset, synth
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.modalities import (
    DYNAMIC_WORLD_CODES,
    ESA_WORLDCOVER_CODES,
    MODALITIES,
    SENTINEL2_BANDS,
    SENTINEL2_INPUT_BANDS,
)

TILES, SIZE, SEED = 40, 64, 3
STEM = f"data_synth_v001_{SIZE}"
B10 = SENTINEL2_BANDS.index("B10")
ESA_INDEX = np.full(256, -1)
ESA_INDEX[list(ESA_WORLDCOVER_CODES)] = np.arange(len(ESA_WORLDCOVER_CODES))
TREE, WATER, BUILT, MANGROVE = (ESA_WORLDCOVER_CODES.index(c) for c in (10, 80, 50, 95))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mmearth(tmp_path_factory.mktemp("synth") / "out", TILES, SIZE, SEED)


@pytest.fixture(scope="module")
def data(folder: Path) -> dict[str, np.ndarray]:
    with h5py.File(folder / f"{STEM}.h5") as h5:
        return {name: h5[name][()] for name in h5}


@pytest.fixture(scope="module")
def tile_info(folder: Path) -> dict[str, dict]:
    return json.loads((folder / f"{STEM}_tile_info.json").read_text())


@pytest.fixture(scope="module")
def l2a(data: dict[str, np.ndarray]) -> np.ndarray:
    return data["metadata"]["S2_type"] == b"l2a"


# -- format -----------------------------------------------------------------------------------------


def test_folder_holds_the_four_files_and_the_registry_layout(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{STEM}{suffix}" for suffix in (".h5", "_splits.json", "_tile_info.json", "_band_stats.json")
    )
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers
    with h5py.File(folder / f"{STEM}.h5") as h5:
        assert set(h5) == {*MODALITIES, "metadata"}
        for name, modality in MODALITIES.items():
            ds = h5[name]
            per_tile = (len(modality.bands), SIZE, SIZE) if modality.level == "pixel" else (len(modality.bands),)
            assert ds.shape == (TILES, *per_tile), name
            assert ds.dtype == np.dtype(modality.disk_dtype), name
            assert ds.chunks == (1, *per_tile) and ds.compression == "gzip", name
        assert h5["metadata"].dtype == np.dtype([("tile_id", "S100"), ("S2_type", "S10")])


def test_tile_info_follows_the_real_pipeline(data: dict[str, np.ndarray], tile_info: dict[str, dict]) -> None:
    ids = [m.decode() for m in data["metadata"]["tile_id"]]
    assert list(tile_info) == ids and len(set(ids)) == TILES
    for row, tile_id in enumerate(ids):
        info = tile_info[tile_id]
        assert info["S2_type"] == data["metadata"]["S2_type"][row].decode()
        assert info["NO_DATA"] is False
        day = date.fromisoformat(info["S2_DATE"])
        assert date(2017, 1, 1) <= day <= date(2020, 12, 31)
        zone = int((info["lon"] + 180) // 6) % 60 + 1
        assert info["CRS"] == f"EPSG:{(32600 if info['lat'] >= 0 else 32700) + zone}"
        bands = info["BANDS"]
        assert ("B10" in bands["sentinel2"]) == (info["S2_type"] == "l1c")
        assert ("SCL" in bands["sentinel2"]) == (info["S2_type"] == "l2a")
        assert bands["era5"][4] == f"{day.year}{day.month:02d}_temperature_2m"
        era5 = info["era5"]
        np.testing.assert_array_equal(data["era5"][row], era5["month1"] + era5["month2"] + era5["year"])


def test_image_level_vectors_encode_tile_info(data: dict[str, np.ndarray], tile_info: dict[str, dict]) -> None:
    infos = list(tile_info.values())
    lat = np.radians([i["lat"] for i in infos])
    lon = np.radians([i["lon"] for i in infos])
    month = np.array([date.fromisoformat(i["S2_DATE"]).month for i in infos])
    np.testing.assert_allclose(data["lat"], np.stack([np.sin(lat), np.cos(lat)], 1), atol=1e-6)
    np.testing.assert_allclose(data["lon"], np.stack([np.sin(lon), np.cos(lon)], 1), atol=1e-6)
    np.testing.assert_allclose(data["month"], np.stack([np.sin(month * np.pi / 6), np.cos(month * np.pi / 6)], 1),
                               atol=1e-6)
    for name in ("biome", "eco_region"):
        assert (data[name].sum(axis=1) == 1).all()
        np.testing.assert_array_equal(data[name].argmax(axis=1), [i[name] for i in infos])


def test_processing_levels_fill_their_missing_products(data: dict[str, np.ndarray], l2a: np.ndarray) -> None:
    assert 0 < l2a.sum() < TILES
    s2 = data["sentinel2"]
    assert (s2[l2a, B10] == 0).all()
    assert (s2[~l2a, B10] > 0).mean() > 0.95  # zeros only on swath edges
    assert (data["sentinel2_scl"][~l2a] == 255).all() and (data["sentinel2_cloudprod"][~l2a] == 65535).all()
    assert not (data["sentinel2_scl"][l2a] == 255).any() and not (data["sentinel2_cloudprod"][l2a] == 65535).any()
    assert set(np.unique(data["sentinel2_cloudmask"])) <= {0, 1024, 2048}


def test_missing_data_matches_tile_info(data: dict[str, np.ndarray], tile_info: dict[str, dict]) -> None:
    channels = MODALITIES["sentinel1"].bands
    missing_orbits = 0
    for row, info in enumerate(tile_info.values()):
        for c, channel in enumerate(channels):
            orbit, pol = channel.split("_")
            acquired = pol in (info["BANDS"][f"sentinel1_{orbit}"] or [])
            values = data["sentinel1"][row, c]
            assert (np.isfinite(values).all() if acquired else (values == -np.inf).all()), (row, channel)
        missing_orbits += [info["BANDS"][f"sentinel1_{o}"] for o in ("asc", "desc")].count(None)
        assert (data["dynamic_world"][row] == 0).all() == (info["BANDS"]["dynamic_world"] is None)
        assert (data["canopy_height_eth"][row] == -1).all() == (info["BANDS"]["canopy_height_eth"] is None)
    assert missing_orbits > 0
    water = data["esa_worldcover"][:, 0] == 80
    assert water.any() and (data["canopy_height_eth"][:, 0][water] == -1).all()
    assert (data["canopy_height_eth"] >= -1).all()


def test_values_are_physically_plausible(data: dict[str, np.ndarray], l2a: np.ndarray) -> None:
    s2 = data["sentinel2"][:, [SENTINEL2_BANDS.index(b) for b in SENTINEL2_INPUT_BANDS]]
    medians = np.median(s2.transpose(1, 0, 2, 3).reshape(len(SENTINEL2_INPUT_BANDS), -1), axis=1)
    assert ((medians > 100) & (medians < 6000)).all()
    blue = SENTINEL2_INPUT_BANDS.index("B2")
    assert np.median(s2[~l2a, blue]) > np.median(s2[l2a, blue]) + 300  # L1C carries path radiance
    s1 = data["sentinel1"][np.isfinite(data["sentinel1"])]
    assert -25 < np.median(s1) < 0 and np.percentile(s1, 1) > -40 and np.percentile(s1, 99) < 5
    slope = data["aster"][:, 1]
    assert slope.min() >= 0 and slope.max() <= 90 and np.median(slope) < 15
    era5 = data["era5"].reshape(TILES, 3, 4)
    assert ((era5[..., :3] > 200) & (era5[..., :3] < 330)).all() and (era5[..., 3] >= 0).all()
    assert (era5[:, :, 1] <= era5[:, :, 0]).all() and (era5[:, :, 0] <= era5[:, :, 2]).all()
    assert (era5[:, 2, 3] >= era5[:, 1, 3]).all()  # the 13-month sum holds the current month
    assert set(np.unique(data["dynamic_world"])) <= {0, *DYNAMIC_WORLD_CODES}
    assert set(np.unique(data["esa_worldcover"])) <= set(ESA_WORLDCOVER_CODES)


# -- statistics and splits --------------------------------------------------------------------------


def _moments(values: np.ndarray, no_data: float | None) -> dict[str, np.ndarray]:
    """Per-channel statistics of (N, C, H, W) values over non-no-data entries, by plain numpy."""
    x = np.moveaxis(values.astype(np.float64), 1, 0).reshape(values.shape[1], -1)
    x = np.where(x == no_data, np.nan, x) if no_data is not None else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # channels without valid values give NaN
        return {"mean": np.nanmean(x, axis=1), "std": np.nanstd(x, axis=1), "min": np.nanmin(x, axis=1),
                "max": np.nanmax(x, axis=1)}


def test_band_stats_are_the_data_statistics(folder: Path, data: dict[str, np.ndarray], l2a: np.ndarray) -> None:
    stats = json.loads((folder / f"{STEM}_band_stats.json").read_text())
    per_level = ("sentinel2", "sentinel2_cloudmask", "sentinel2_cloudprod")
    assert set(stats) == {f"{n}_{lv}" for n in per_level for lv in ("l1c", "l2a")} | {
        "sentinel1", "aster", "canopy_height_eth", "era5", "lat", "lon", "month"}
    expected = {name: (data[name], MODALITIES[name].no_data)
                for name in ("sentinel1", "aster", "canopy_height_eth", "era5", "lat", "lon", "month")}
    for name in per_level:
        expected[f"{name}_l2a"] = (data[name][l2a], MODALITIES[name].no_data)
        expected[f"{name}_l1c"] = (data[name][~l2a], MODALITIES[name].no_data)
    for key, (values, no_data) in expected.items():
        values = values[..., None, None] if values.ndim == 2 else values
        ref = _moments(values, no_data)
        for field in ("mean", "std"):
            np.testing.assert_allclose(stats[key][field], ref[field], rtol=1e-6, atol=1e-9, err_msg=key)
        valid = ~np.isnan(ref["mean"])
        for field in ("min", "max"):
            np.testing.assert_allclose(np.asarray(stats[key][field])[valid], ref[field][valid], err_msg=key)
    # As the real files: bands without valid pixels have NaN mean/std and +inf/-inf min/max.
    l2a_b10 = stats["sentinel2_l2a"]
    assert np.isnan(l2a_b10["mean"][B10]) and np.isnan(l2a_b10["std"][B10])
    assert l2a_b10["min"][B10] == np.inf and l2a_b10["max"][B10] == -np.inf
    assert np.isnan(stats["sentinel2_cloudprod_l1c"]["mean"]).all()
    assert np.isfinite(stats["sentinel2_l1c"]["mean"]).all() and np.isfinite(stats["sentinel1"]["std"]).all()


def test_splits_are_a_seeded_80_10_10_partition(folder: Path) -> None:
    splits = json.loads((folder / f"{STEM}_splits.json").read_text())
    assert [len(splits[s]) for s in ("train", "val", "test")] == [32, 4, 4]
    assert sorted(splits["train"] + splits["val"] + splits["test"]) == list(range(TILES))
    assert splits["train"] != list(range(32))  # shuffled, not the first rows


# -- determinism, safety, arguments -----------------------------------------------------------------


def _arrays(folder: Path) -> dict[str, bytes]:
    stem = next(folder.glob("data_*.h5")).stem
    with h5py.File(folder / f"{stem}.h5") as h5:
        content = {name: h5[name][()].tobytes() for name in h5}
    content.update({p.name: p.read_bytes() for p in folder.glob("*.json")})
    return content


def test_output_is_a_function_of_the_seed(tmp_path: Path, folder: Path) -> None:
    again = write_synthetic_mmearth(tmp_path / "again", TILES, SIZE, SEED, progress=True)
    assert _arrays(again) == _arrays(folder)
    other = _arrays(write_synthetic_mmearth(tmp_path / "other", TILES, SIZE, SEED + 1))
    assert all(other[name] != value for name, value in _arrays(folder).items())


def test_refuses_non_empty_folders_and_overwrites_on_request(tmp_path: Path) -> None:
    out = write_synthetic_mmearth(tmp_path / "out", 3)
    before = _arrays(out)
    with pytest.raises(FileExistsError, match=str(out)):
        write_synthetic_mmearth(out, 3, seed=1)
    assert _arrays(out) == before
    write_synthetic_mmearth(out, 3, seed=1, overwrite=True)
    assert _arrays(out) != before and len(list(out.iterdir())) == 4
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="'notes.txt' was not written by mpmae synth"):
        write_synthetic_mmearth(out, 3, overwrite=True)
    assert (out / "notes.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(list(write_synthetic_mmearth(empty, 2).iterdir())) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


def test_a_failed_run_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(*args: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(synth, "_render", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_synthetic_mmearth(tmp_path / "out", 5)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tiles": 0}, "tiles must be an integer >= 1"),
    ({"tiles": 2.5}, "tiles must be an integer >= 1"),
    ({"tiles": 2, "size": 96}, r"size must be one of \[64, 128\]"),
    ({"tiles": 2, "seed": -1}, "seed must be an integer >= 0"),
])
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_synthetic_mmearth(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_two_large_tiles_cover_both_levels_and_all_radar_channels(tmp_path: Path) -> None:
    out = write_synthetic_mmearth(tmp_path / "big", 2, size=128, seed=5)
    with h5py.File(out / "data_synth_v001_128.h5") as h5:
        assert h5["sentinel2"].shape == (2, 13, 128, 128) and h5["sentinel2"].chunks == (1, 13, 128, 128)
        assert sorted(h5["metadata"]["S2_type"]) == [b"l1c", b"l2a"]
        assert np.isfinite(h5["sentinel1"][()]).any(axis=(0, 2, 3)).all()


# -- through the reader -----------------------------------------------------------------------------


def test_reads_back_through_mmearth_dataset(folder: Path, data: dict[str, np.ndarray]) -> None:
    dataset = MMEarthDataset(folder, "train", "all_mod")
    rows = dataset.rows
    assert len(dataset) == 32
    batch = dataset.read_batch(range(len(dataset)))
    assert batch["sentinel2"].shape == (32, len(SENTINEL2_INPUT_BANDS), SIZE, SIZE)
    assert batch["sentinel2"].dtype == np.float32
    s2_valid = data["sentinel2"][rows][:, [SENTINEL2_BANDS.index(b) for b in SENTINEL2_INPUT_BANDS]] > 0
    np.testing.assert_array_equal(np.isfinite(batch["sentinel2"]), s2_valid)
    assert abs(np.nanmean(batch["sentinel2"])) < 0.3 and 0.6 < np.nanstd(batch["sentinel2"]) < 1.5
    np.testing.assert_array_equal(np.isnan(batch["sentinel1"]), np.isinf(data["sentinel1"][rows]))
    np.testing.assert_array_equal(batch["esa_worldcover"], ESA_INDEX[data["esa_worldcover"][rows]])
    dw = batch["dynamic_world"]
    np.testing.assert_array_equal(dw, data["dynamic_world"][rows].astype(np.int64) - 1)
    assert (batch["biome"].argmax(axis=1) == data["biome"][rows].argmax(axis=1)).all()
    for name in ("era5", "lat", "lon", "month", "aster"):
        assert np.isfinite(batch[name]).all(), name


# -- learnability -----------------------------------------------------------------------------------


def test_sentinel2_spectra_separate_land_cover(data: dict[str, np.ndarray], l2a: np.ndarray) -> None:
    """Per-pixel nearest class mean on clear, snow-free L2A pixels, fitted and scored on disjoint tiles."""
    idx = [SENTINEL2_BANDS.index(b) for b in SENTINEL2_INPUT_BANDS]
    x = np.log(np.maximum(data["sentinel2"][:, idx], 1).astype(np.float64)).transpose(0, 2, 3, 1)
    y = ESA_INDEX[data["esa_worldcover"][:, 0]]
    usable = (data["sentinel2_cloudmask"][:, 0] == 0) & (data["sentinel2_scl"][:, 0] != 11)
    usable &= (data["sentinel2"][:, 1] > 0) & l2a[:, None, None]
    fit = (np.arange(TILES) % 2 == 0)[:, None, None] & usable
    score = (np.arange(TILES) % 2 == 1)[:, None, None] & usable
    classes = np.unique(y[fit])
    means = np.stack([x[fit & (y == c)].mean(axis=0) for c in classes])
    predicted = classes[((x[score][:, None] - means[None]) ** 2).sum(-1).argmin(axis=1)]
    accuracy = (predicted == y[score]).mean()
    majority = np.bincount(y[score]).max() / score.sum()
    assert accuracy > 0.6 and accuracy > majority + 0.2, (accuracy, majority)


def test_biome_is_predictable_from_climate_and_latitude() -> None:
    """Nearest biome centroid of ERA5 + lat, on image-level draws of the generative model (no pixels)."""
    tiles = synth._sample_tiles(np.random.default_rng(0), 2800)
    lat = np.radians(tiles.lat)[:, None]
    features = np.concatenate([tiles.era5, np.sin(lat), np.cos(lat)], axis=1).astype(np.float64)
    features = (features - features.mean(0)) / features.std(0)
    fit, score = slice(0, 1400), slice(1400, None)
    centroids = np.stack([features[fit][tiles.biome[fit] == b].mean(0) for b in range(14)])
    predicted = ((features[score][:, None] - centroids[None]) ** 2).sum(-1).argmin(axis=1)
    assert (predicted == tiles.biome[score]).mean() > 0.4  # chance: 1/14


def test_elevation_cools_the_climate() -> None:
    tiles = synth._sample_tiles(np.random.default_rng(1), 2000)
    montane = tiles.biome == 8
    assert tiles.elevation[montane].mean() > 2000
    assert tiles.era5[montane, 8].mean() < tiles.era5[(tiles.biome == 1), 8].mean() - 15  # vs lowland tropics


def test_label_maps_are_smooth_and_agree(data: dict[str, np.ndarray]) -> None:
    esa = data["esa_worldcover"][:, 0]
    assert (esa[:, 1:] == esa[:, :-1]).mean() > 0.9 and (esa[:, :, 1:] == esa[:, :, :-1]).mean() > 0.9
    dw, have = data["dynamic_world"][:, 0], data["dynamic_world"][:, 0] > 0
    # Dynamic World index of each ESA class (water 0 .. snow 8), as the generator's cover table says.
    dw_of_esa = np.array([c.dw for c in synth._COVERS])[ESA_INDEX[esa]]
    agreement = (np.asarray(DYNAMIC_WORLD_CODES)[dw_of_esa] == dw)[have].mean()
    assert 0.8 < agreement < 0.95


def test_canopy_and_radar_follow_land_cover(data: dict[str, np.ndarray]) -> None:
    y = ESA_INDEX[data["esa_worldcover"][:, 0]]
    height = data["canopy_height_eth"][:, 0].astype(float)
    known = height >= 0
    woody = np.isin(y, [TREE, MANGROVE])
    assert height[known & (y == TREE)].mean() > 8 and height[known & ~woody].mean() < 2
    vv = data["sentinel1"][:, 0]
    finite = np.isfinite(vv)
    medians = {c: np.median(vv[finite & (y == c)]) for c in (BUILT, TREE, WATER) if (finite & (y == c)).any()}
    assert medians[TREE] > medians[WATER] + 8
    if BUILT in medians:
        assert medians[BUILT] > medians[TREE]
