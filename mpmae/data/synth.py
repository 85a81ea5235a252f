"""A learnable synthetic MMEarth v001 folder, identical in format to the real data (docs/method.md, MMEarth data).

Random arrays in the right shapes would test the plumbing but not the method: pretraining only helps when
the pretext targets can be predicted from Sentinel-2. So the modalities are tied the way they are on Earth.

The generative model, per tile:

1. **Place.** A fixed synthetic world (independent of ``seed``, so folders drawn with different seeds share
   it) assigns each of the 846 eco-regions to one of the 14 biomes (in proportion to the real RESOLVE
   counts), a centre inside the biome's latitude band and its own offsets of temperature, precipitation,
   elevation and land-cover prior. A tile draws its biome uniformly (as MMEarth sampled biomes), an
   eco-region of that biome, a location near the eco-region's centre, a Sentinel-2 date in 2017-2020 and a
   processing level (L1C or L2A; L2A rarer before December 2018, as in the real collection).
2. **Climate (ERA5).** Monthly 2 m temperature = the biome's sea-level mean, cooled poleward within the band
   and by 6.5 K/km of tile elevation, plus a seasonal cycle (peak in July north, January south) and noise.
   Monthly min/max spread with aridity; precipitation follows the biome's annual total and its wet season.
   The 12 values are previous month, current month and the 13-month window stats (mean, min, max, sum),
   in K and m. The current month also sets vegetation greenness, seasonal snow and soil wetness.
3. **Terrain (ASTER).** Elevation = the tile's base elevation plus a smooth multi-octave field scaled by a
   biome relief (montane and conifer tiles are rugged, mangroves flat); slope in degrees from its gradient
   at 10 m spacing.
4. **Land cover (ESA WorldCover, 11 classes).** Per-tile class weights are a Dirichlet draw around the
   eco-region's prior; the map is the argmax over classes of log-weight + a smooth random field per class
   + terrain preferences (water and wetlands in hollows, snow and bare rock high and steep, crops and
   built-up on flat ground). **Dynamic World** is the same map in its 9 classes, relabelled to a confusable
   class on ~12% of the area (a different product and year); a few tiles have no DW (all 0).
5. **Sentinel-2.** Each class has a surface-reflectance signature (vegetation red edge and NIR plateau,
   bright sandy soils, dark water, bright snow) that drifts towards dry soil out of season; a per-tile
   spectral jitter, within-class brightness texture, terrain illumination from the sun position (latitude
   and date), seasonal snow, 20/60 m band blur and sensor noise follow. L1C adds path radiance (brighter,
   bluer), water-vapour absorption in B9 and a cirrus band B10; L2A leaves B10 at 0. Some tiles carry
   clouds (QA60 1024/2048, SCL 8-10, MSK_CLDPRB); SCL is derived from the class for L2A, 255 for L1C
   (cloud probability 65535). A few tiles lie on a swath edge: a half-plane of zeros (no data).
6. **Sentinel-1** backscatter (dB) per class (built-up bright, water dark and wind-roughened, forest
   high VH), brighter for wet soil and on slopes facing the sensor (east-looking ascending, west-looking
   descending), with texture and speckle. Most tiles are VV/VH, polar ones mostly HH/HV; some tiles miss
   an orbit (or both): those channels are -inf.
7. **Canopy height (ETH)** = the biome's tree height on tree and mangrove pixels (a little on shrubs),
   with texture and a std growing with height; no data (-1) over water and for a few whole tiles.

Band statistics are computed exactly over all generated tiles (the reference subsamples with
replacement), with the reference's no-data rules and its NaN/inf for bands without valid values.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
from tqdm import tqdm

from mpmae.modalities import (
    DYNAMIC_WORLD_CODES,
    ESA_WORLDCOVER_CODES,
    MODALITIES,
    SENTINEL2_BANDS,
    SENTINEL2_INPUT_BANDS,
)

SIZES = (64, 128)
PIXEL_M = 10.0
#: Tiles rendered per block at 64 px (fewer at 128 px): bounds memory, keeps numpy vectorised.
BLOCK_TILES_64 = 64
_WORLD_SEED = 20240502
_LAPSE_K_PER_M = 0.0065
_KELVIN = 273.15
METADATA_DTYPE = np.dtype([("tile_id", "S100"), ("S2_type", "S10")])
#: The files a folder of ``size`` px tiles holds: the only entries `overwrite` may replace.
FILE_SUFFIXES = (".h5", "_splits.json", "_tile_info.json", "_band_stats.json")
#: Written size over raw size of the gzip-compressed h5 (measured 0.44-0.46 at 64 and 128 px), with margin.
_H5_COMPRESSION_BOUND = 0.6
#: tile_info, splits and band statistics per tile (measured about 1.13 kB), with margin.
_JSON_BYTES_PER_TILE = 1500


class _Biome(NamedTuple):
    lat: tuple[float, float]  # absolute latitude band, degrees
    south: float  # share of locations in the southern hemisphere
    t_mean: float  # annual mean temperature at sea level in the band's centre, deg C
    t_amp: float  # half the annual temperature range, K
    precip: float  # annual precipitation, m
    p_season: float  # relative amplitude of the precipitation cycle
    p_peak: int  # wettest month in the northern hemisphere
    elevation: float  # typical tile elevation, m
    relief: float  # typical within-tile elevation std, m (sets slopes)
    canopy: float  # typical tree height, m
    eco_regions: int  # eco-regions of this biome (RESOLVE 2017, rounded)
    # ESA class prior in ESA_WORLDCOVER_CODES order: tree shrub grass crop built bare snow water wetland
    # mangrove moss
    cover: tuple[float, ...]


#: In the order of MMEarth's stats/biome_labels.json (index = biome id).
_BIOMES = (
    _Biome((60, 76), 0.05, -8, 15, 0.30, 0.4, 7, 200, 6, 3, 45,  # Tundra
           (.02, .15, .25, 0, .003, .12, .06, .10, .08, 0, .25)),
    _Biome((0, 18), 0.5, 26, 1.5, 2.4, 0.3, 7, 300, 10, 30, 230,  # Tropical & Subtropical Moist Broadleaf
           (.65, .04, .06, .12, .03, .005, 0, .04, .03, .005, 0)),
    _Biome((30, 42), 0.3, 17, 8, 0.6, 0.8, 1, 300, 15, 12, 39,  # Mediterranean Forests, Woodlands & Scrub
           (.20, .25, .20, .20, .06, .06, 0, .02, .005, 0, 0)),
    _Biome((15, 35), 0.35, 25, 9, 0.12, 0.5, 7, 500, 8, 5, 100,  # Deserts & Xeric Shrublands
           (.01, .20, .08, .04, .01, .65, 0, .01, .003, 0, 0)),
    _Biome((35, 55), 0.25, 9, 14, 0.45, 0.5, 6, 400, 4, 12, 46,  # Temperate Grasslands, Savannas & Shrub.
           (.05, .08, .45, .35, .03, .02, 0, .02, .02, 0, 0)),
    _Biome((50, 68), 0.0, 0, 17, 0.5, 0.5, 7, 250, 6, 16, 28,  # Boreal Forests/Taiga
           (.60, .08, .08, .02, .005, .01, .005, .10, .08, 0, .05)),
    _Biome((35, 55), 0.2, 12, 10, 0.9, 0.3, 1, 900, 25, 28, 53,  # Temperate Conifer Forests
           (.60, .10, .12, .05, .02, .05, .02, .03, .01, 0, 0)),
    _Biome((35, 55), 0.2, 11, 10, 0.85, 0.2, 7, 250, 8, 24, 83,  # Temperate Broadleaf & Mixed Forests
           (.45, .03, .15, .25, .06, .01, 0, .03, .02, 0, 0)),
    _Biome((0, 40), 0.4, 26, 6, 0.6, 0.6, 7, 3400, 40, 8, 54,  # Montane Grasslands & Shrublands
           (.05, .20, .40, .04, .005, .22, .06, .02, .03, 0, .04)),
    _Biome((0, 25), 0.5, 27, 2, 2.0, 0.4, 7, 3, 0.5, 14, 19,  # Mangroves
           (.15, .03, .03, .05, .02, .02, 0, .30, .10, .30, 0)),
    _Biome((0, 30), 0.5, 25, 4, 1.1, 0.6, 7, 100, 1, 10, 26,  # Flooded Grasslands & Savannas
           (.08, .05, .20, .10, .01, .02, 0, .20, .34, 0, 0)),
    _Biome((5, 25), 0.5, 25, 4, 0.9, 0.7, 7, 600, 6, 12, 50,  # Tropical & Subtropical Grasslands, Sav.
           (.20, .25, .35, .12, .015, .05, 0, .01, .02, 0, 0)),
    _Biome((10, 25), 0.5, 26, 4, 1.1, 0.7, 7, 400, 10, 18, 56,  # Tropical & Subtropical Dry Broadleaf
           (.40, .20, .12, .20, .03, .03, 0, .01, .01, 0, 0)),
    _Biome((15, 28), 0.2, 27, 4, 1.5, 0.5, 7, 1600, 25, 25, 17,  # Tropical & Subtropical Coniferous
           (.60, .10, .15, .10, .02, .02, 0, .01, 0, 0, 0)),
)


class _Cover(NamedTuple):
    reflectance: tuple[float, ...]  # L2A surface reflectance in SENTINEL2_INPUT_BANDS order
    phenology: float  # share of the drift towards dry soil when greenness is 0
    vv: float  # C-band VV backscatter, dB
    vh: float  # C-band VH backscatter, dB
    wet: float  # dB gained on fully wet soil
    lowland: float  # preference for hollows (negative: for high ground) within a tile
    steep: float  # preference for steep slopes
    height: float  # canopy height relative to the tile's tree height
    scl: int  # Sen2Cor scene class
    dw: int  # Dynamic World class index (0 water .. 8 snow and ice)
    dw_alt: int  # the Dynamic World class it is most often confused with


#: In ESA_WORLDCOVER_CODES order (10 tree .. 100 moss and lichen).
_COVERS = (
    _Cover((.025, .026, .048, .025, .075, .205, .250, .280, .270, .180, .130, .055),  # tree cover
           .2, -7.0, -13.0, 0.0, 0.0, 0.3, 1.0, 4, 1, 5),
    _Cover((.055, .060, .090, .105, .140, .190, .215, .235, .230, .160, .300, .210),  # shrubland
           .6, -9.5, -16.5, 1.0, 0.0, 0.2, 0.12, 4, 5, 2),
    _Cover((.045, .050, .085, .070, .125, .260, .310, .340, .330, .220, .250, .140),  # grassland
           .9, -11.5, -18.5, 1.5, 0.0, 0.0, 0.0, 4, 2, 5),
    _Cover((.045, .050, .095, .055, .135, .310, .380, .420, .410, .260, .230, .115),  # cropland
           .9, -10.5, -17.0, 2.0, 0.3, -0.8, 0.0, 4, 4, 2),
    _Cover((.090, .095, .105, .115, .130, .150, .160, .175, .170, .120, .200, .180),  # built-up
           0.0, -3.0, -10.5, 0.0, 0.2, -0.8, 0.05, 5, 6, 7),
    _Cover((.110, .130, .170, .220, .250, .270, .285, .300, .295, .200, .380, .320),  # bare / sparse
           0.0, -16.0, -24.0, 2.5, -0.4, 0.6, 0.0, 5, 7, 5),
    _Cover((.560, .580, .570, .560, .550, .530, .510, .490, .500, .280, .060, .050),  # snow and ice
           0.0, -13.0, -21.0, 0.0, -1.5, 0.2, 0.0, 11, 8, 7),
    _Cover((.070, .060, .055, .035, .025, .015, .012, .010, .011, .006, .007, .005),  # permanent water
           0.0, -21.0, -28.0, 0.0, 1.8, -1.5, 0.0, 6, 0, 3),
    _Cover((.040, .040, .062, .048, .080, .150, .170, .185, .180, .110, .110, .055),  # herbaceous wetland
           .5, -9.5, -17.5, 1.0, 1.2, -1.2, 0.05, 4, 3, 2),
    _Cover((.028, .030, .045, .028, .065, .165, .200, .220, .215, .135, .090, .035),  # mangroves
           .15, -7.0, -12.5, 0.0, 1.2, -1.0, 0.7, 4, 1, 3),
    _Cover((.060, .065, .085, .095, .120, .160, .180, .200, .195, .140, .200, .150),  # moss and lichen
           .5, -12.5, -20.0, 1.0, -0.3, 0.0, 0.0, 4, 2, 7),
)
_DRY_SOIL = (.075, .085, .120, .160, .190, .215, .235, .255, .250, .170, .330, .270)
_CLOUD = (.42, .40, .40, .40, .40, .40, .40, .39, .40, .25, .26, .18)
#: L1C = gain * surface + haze * path reflectance (per SENTINEL2_INPUT_BANDS); B9 sits in a vapour band.
_L1C_GAIN = (.93, .93, .93, .93, .93, .93, .93, .93, .93, .50, .93, .93)
_L1C_PATH = (.10, .075, .05, .032, .028, .022, .019, .014, .016, .006, .004, .002)
_BANDS_20M = ("B5", "B6", "B7", "B8A", "B11", "B12")
_BANDS_60M = ("B1", "B9", "B10")
_TREE, _SNOW, _WATER = (ESA_WORLDCOVER_CODES.index(code) for code in (10, 70, 80))
_S1_SLOPE_DB = 0.2  # backscatter gained per degree of slope towards the radar

_S2_INPUT = [SENTINEL2_BANDS.index(b) for b in SENTINEL2_INPUT_BANDS]
_B10 = SENTINEL2_BANDS.index("B10")
_GEE_S2_BANDS = {  # the band lists tile_info["BANDS"]["sentinel2"] holds in the real data
    "l2a": [*SENTINEL2_INPUT_BANDS, "MSK_CLDPRB", "SCL", "QA60"],
    "l1c": [*SENTINEL2_BANDS, "QA60"],
}
_S1_POLARISATIONS = (None, ("VV", "VH"), ("HH", "HV"))  # per orbit: missing, co-pol V, co-pol H
_ERA5_QUANTITIES = ("temperature_2m", "temperature_2m_min", "temperature_2m_max", "total_precipitation_sum")
_ERA5_YEAR_NAMES = ("0_temperature_2m_mean", "1_temperature_2m_min_min", "2_temperature_2m_max_max",
                    "3_total_precipitation_sum_sum")

assert len(_COVERS) == len(ESA_WORLDCOVER_CODES) and len(_BIOMES) == MODALITIES["biome"].num_classes
assert sum(b.eco_regions for b in _BIOMES) == MODALITIES["eco_region"].num_classes


def _column(name: str, table: tuple[NamedTuple, ...]) -> np.ndarray:
    return np.asarray([getattr(row, name) for row in table], dtype=np.float32)


def _with_b10(rows: Any, b10: float = 0.0) -> np.ndarray:
    """Spectra given in SENTINEL2_INPUT_BANDS order, widened to the 13 file bands."""
    rows = np.asarray(rows, dtype=np.float32)
    out = np.full((*rows.shape[:-1], len(SENTINEL2_BANDS)), b10, dtype=np.float32)
    out[..., _S2_INPUT] = rows
    return out


# -- the fixed world --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _World:
    """Eco-regions and their traits; drawn once from a fixed seed so every folder shares one Earth."""

    members: np.ndarray  # (E,) eco-region ids sorted by biome
    first: np.ndarray  # (B,) offset of each biome's block in ``members``
    lat: np.ndarray
    lon: np.ndarray
    dt: np.ndarray  # temperature offset, K
    wet: np.ndarray  # precipitation factor
    lift: np.ndarray  # elevation factor
    cover: np.ndarray  # (E, 11) log class prior, -inf where the biome never has the class


@lru_cache(maxsize=1)
def _world() -> _World:
    rng = np.random.default_rng(_WORLD_SEED)
    counts = np.asarray([b.eco_regions for b in _BIOMES])
    biome = rng.permutation(np.repeat(np.arange(len(_BIOMES)), counts))
    band = np.asarray([b.lat for b in _BIOMES], dtype=np.float64)[biome]
    south = rng.random(biome.size) < np.asarray([b.south for b in _BIOMES])[biome]
    lat = rng.uniform(band[:, 0], band[:, 1]) * np.where(south, -1, 1)
    prior = np.asarray([b.cover for b in _BIOMES], dtype=np.float64)[biome]
    with np.errstate(divide="ignore"):
        cover = np.log(prior / prior.sum(axis=1, keepdims=True)) + rng.normal(0, 0.5, prior.shape)
    members = np.argsort(biome, kind="stable")
    return _World(
        members=members, first=np.concatenate([[0], np.cumsum(counts)[:-1]]),
        lat=lat, lon=rng.uniform(-180, 180, biome.size), dt=rng.normal(0, 1.5, biome.size),
        wet=np.exp(rng.normal(0, 0.3, biome.size)), lift=np.exp(rng.normal(0, 0.4, biome.size)), cover=cover,
    )


# -- image-level draws ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tiles:
    """Everything about a set of tiles that is one number (or vector) per tile."""

    biome: np.ndarray
    eco: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    year: np.ndarray
    month: np.ndarray
    day: np.ndarray
    l2a: np.ndarray
    era5: np.ndarray  # (n, 12) float32 in registry band order
    elevation: np.ndarray
    relief: np.ndarray
    cover: np.ndarray  # (n, 11) log class weights
    canopy: np.ndarray
    greenness: np.ndarray
    snow: np.ndarray  # share of the tile under seasonal snow
    wetness: np.ndarray
    water_rough: np.ndarray  # dB of wind roughening on open water
    haze: np.ndarray
    s1: np.ndarray  # (n, 2) ascending/descending: index into _S1_POLARISATIONS
    clouds: np.ndarray  # cloud-covered share
    s2_edge: np.ndarray
    dw_missing: np.ndarray
    canopy_missing: np.ndarray

    def __len__(self) -> int:
        return len(self.biome)

    def take(self, rows: slice) -> _Tiles:
        return _Tiles(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})


def _sample_tiles(rng: np.random.Generator, n: int) -> _Tiles:
    """Draw the image-level variables of ``n`` tiles: place, date, climate and per-tile traits."""
    world = _world()
    biome = rng.integers(0, len(_BIOMES), n)
    counts = np.asarray([b.eco_regions for b in _BIOMES])
    eco = world.members[world.first[biome] + (rng.random(n) * counts[biome]).astype(np.int64)]
    lat, lon = _location(rng, biome, eco)
    year, month, day = _dates(rng, n)
    early = (year < 2018) | ((year == 2018) & (month < 12))
    l2a = rng.random(n) < np.where(early, 0.2, 0.5)
    elevation = np.asarray([b.elevation for b in _BIOMES])[biome] * world.lift[eco] * rng.lognormal(0, 0.3, n)
    elevation = np.clip(elevation, 0, 5500)
    era5, temp_now, rain_now = _climate(rng, biome, eco, lat, month, elevation)
    temp_c, rain_mm = temp_now - _KELVIN, rain_now * 1000
    polar = np.abs(lat) > 60
    return _Tiles(
        biome=biome, eco=eco, lat=lat, lon=lon, year=year, month=month, day=day, l2a=l2a, era5=era5,
        elevation=elevation,
        relief=np.asarray([b.relief for b in _BIOMES])[biome] * rng.lognormal(0, 0.6, n),
        cover=np.log(rng.gamma(6 * np.exp(world.cover[eco])) + 1e-300),
        canopy=np.asarray([b.canopy for b in _BIOMES])[biome] * rng.lognormal(0, 0.2, n),
        greenness=_sigmoid((temp_c - 5) / 3) * _sigmoid((rain_mm - 25) / 12),
        snow=np.clip((-temp_c - 1) / 8, 0, 0.95),
        wetness=1 - np.exp(-rain_now / 0.08),
        water_rough=rng.uniform(-2, 4, n),
        haze=rng.lognormal(0, 0.3, n),
        s1=_s1_orbits(rng, polar),
        clouds=np.where(rng.random(n) < 0.3, rng.uniform(0.005, 0.12, n), 0.0),
        s2_edge=rng.random(n) < 0.03,
        dw_missing=rng.random(n) < 0.03,
        canopy_missing=rng.random(n) < 0.02,
    )


def _ensure_coverage(tiles: _Tiles) -> None:
    """Give every S2 level and S1 channel at least one tile (from 2 tiles on), so no statistic is NaN
    by the luck of a small draw; edits the arrays in place."""
    if len(tiles) < 2:
        return
    if tiles.l2a.all() or not tiles.l2a.any():
        tiles.l2a[-1] = not tiles.l2a[0]
    for orbit in range(2):
        pols = tiles.s1[:, orbit]
        if not (pols == 1).any():
            pols[0] = 1
        if not (pols == 2).any():
            pols[-1] = 2
    tiles.canopy_missing[0] = False


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _location(rng: np.random.Generator, biome: np.ndarray, eco: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Near the eco-region's centre, kept inside the biome's latitude band."""
    world = _world()
    band = np.asarray([b.lat for b in _BIOMES], dtype=np.float64)[biome]
    centre = world.lat[eco]
    lat = np.sign(centre + 1e-9) * np.clip(np.abs(centre + rng.normal(0, 1.5, len(eco))), band[:, 0], band[:, 1])
    lon = (world.lon[eco] + rng.normal(0, 3, len(eco)) + 180) % 360 - 180
    return lat, lon


def _dates(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sentinel-2 dates as the real windows: 2018 stops in November, 2019 starts in December 2018."""
    year = rng.integers(2017, 2021, n)
    month = rng.integers(1, 13, n)
    month = np.where(year == 2018, rng.integers(1, 12, n), month)
    dec18 = (year == 2019) & (rng.random(n) < 1 / 13)
    year, month = np.where(dec18, 2018, year), np.where(dec18, 12, month)
    return year, month, rng.integers(1, 29, n)


def _climate(
    rng: np.random.Generator, biome: np.ndarray, eco: np.ndarray, lat: np.ndarray, month: np.ndarray,
    elevation: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ERA5 (n, 12) in K and m over the 13 months ending with the S2 month; also the current month's
    mean temperature (K) and precipitation (m), which drive phenology, snow and soil wetness."""
    world, n = _world(), len(biome)
    table = {name: np.asarray([getattr(b, name) for b in _BIOMES], dtype=np.float64)[biome]
             for name in ("t_mean", "t_amp", "precip", "p_season", "p_peak")}
    offset = np.abs(lat) - np.asarray([np.mean(b.lat) for b in _BIOMES])[biome]
    t_year = table["t_mean"] + world.dt[eco] - 0.5 * offset - _LAPSE_K_PER_M * elevation
    amp = np.clip(table["t_amp"] + 0.4 * offset, 0.5, None)
    rain_year = table["precip"] * world.wet[eco] * rng.lognormal(0, 0.2, n)
    south = lat < 0
    months = month[:, None] + np.arange(-12, 1)
    warmest = np.where(south, 1, 7)[:, None]
    temp = t_year[:, None] + amp[:, None] * np.cos(2 * np.pi * (months - warmest) / 12)
    temp += rng.normal(0, 1.0, temp.shape)
    wettest = (table["p_peak"] + 6 * south)[:, None]
    cycle = np.clip(1 + table["p_season"][:, None] * np.cos(2 * np.pi * (months - wettest) / 12), 0.03, None)
    rain = rain_year[:, None] / 12 * cycle * rng.lognormal(0, 0.3, temp.shape)
    spread = (3 + 8 * np.exp(-rain_year / 0.4) + 0.2 * amp)[:, None] * rng.lognormal(0, 0.1, temp.shape)
    low, high = temp - spread, temp + spread
    temp, low, high = temp + _KELVIN, low + _KELVIN, high + _KELVIN
    era5 = np.stack([
        temp[:, -2], low[:, -2], high[:, -2], rain[:, -2],
        temp[:, -1], low[:, -1], high[:, -1], rain[:, -1],
        temp.mean(axis=1), low.min(axis=1), high.max(axis=1), rain.sum(axis=1),
    ], axis=1).astype(np.float32)
    return era5, temp[:, -1], rain[:, -1]


def _s1_orbits(rng: np.random.Generator, polar: np.ndarray) -> np.ndarray:
    """Per orbit: 0 missing (12%), else VV/VH, or HH/HV for most polar tiles (as IW acquires there)."""
    n = len(polar)
    hh = rng.random((n, 2)) < np.where(polar, 0.7, 0.03)[:, None]
    missing = rng.random((n, 2)) < 0.12
    return np.where(missing, 0, np.where(hh, 2, 1)).astype(np.int8)


# -- smooth fields ----------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _spline_taps(size: int, cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Cubic B-spline upsampling of ``cells + 3`` control points to ``size`` pixels, as 4 taps per pixel:
    (size, 4) control-point indices and weights. The fields come out C2-smooth."""
    pos = (np.arange(size) + 0.5) / size * cells
    first = np.floor(pos).astype(np.intp)
    index = first[:, None] + np.arange(4)
    dist = np.abs(pos[:, None] - (index - 1))
    weights = np.where(dist < 1, 2 / 3 - dist**2 + dist**3 / 2, (2 - dist) ** 3 / 6)
    return index, weights.astype(np.float32)


def _upsample(noise: np.ndarray, size: int, cells: int) -> np.ndarray:
    """(..., cells + 3, cells + 3) control points -> (..., size, size), separably with 4 taps. Gathers
    rather than BLAS products: those spin threads and crawl on a shared, oversubscribed machine."""
    index, weights = _spline_taps(size, cells)
    rows = sum(weights[:, k, None] * noise[..., index[:, k], :] for k in range(4))
    return sum(weights[:, k] * rows[..., index[:, k]] for k in range(4))


def _fields(
    rng: np.random.Generator, shape: tuple[int, ...], size: int, octaves: tuple[tuple[int, float], ...]
) -> np.ndarray:
    """Smooth random fields (*shape, size, size), zero mean and unit std per field.

    Each octave is ``(cells per 640 m, weight)``: low-resolution noise upsampled with a cubic B-spline,
    so physical smoothness is the same at 64 and 128 px."""
    out = np.zeros((*shape, size, size), dtype=np.float32)
    for cells_640m, weight in octaves:
        cells = max(1, round(cells_640m * size / 64))
        noise = rng.standard_normal((*shape, cells + 3, cells + 3), dtype=np.float32)
        out += weight * _upsample(noise, size, cells)
    out -= out.mean(axis=(-2, -1), keepdims=True)
    out /= out.std(axis=(-2, -1), keepdims=True) + 1e-6
    return out


def _top_share(field: np.ndarray, share: np.ndarray) -> np.ndarray:
    """Per tile, the pixels holding the highest ``share`` of ``field`` (n, H, W) -> bool mask."""
    n = field.shape[0]
    flat = np.sort(field.reshape(n, -1), axis=1)
    flat = np.concatenate([flat, np.full((n, 1), np.inf, dtype=flat.dtype)], axis=1)
    pixels = flat.shape[1] - 1
    threshold = flat[np.arange(n), pixels - np.round(share * pixels).astype(np.int64)]
    return field >= threshold[:, None, None]


def _blur(x: np.ndarray, passes: int) -> np.ndarray:
    """Separable [1, 2, 1] / 4 smoothing over the last two axes, ``passes`` times, edges repeated."""
    for _ in range(passes):
        for axis in (-2, -1):
            pad = np.concatenate([np.take(x, [0], axis), x, np.take(x, [-1], axis)], axis=axis)
            n = x.shape[axis]
            x = (np.take(pad, range(n), axis) + 2 * x + np.take(pad, range(2, n + 2), axis)) / 4
    return x


# -- pixel modalities -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Terrain:
    elevation: np.ndarray  # (n, H, W) m
    relative: np.ndarray  # within-tile elevation anomaly, unit std
    east: np.ndarray  # dz/dx, rise per metre eastwards
    north: np.ndarray  # dz/dy, rise per metre northwards
    slope: np.ndarray  # degrees


def _terrain(rng: np.random.Generator, tiles: _Tiles, size: int) -> _Terrain:
    relative = _fields(rng, (len(tiles),), size, ((1, 1.0), (3, 0.35), (8, 0.1)))
    elevation = tiles.elevation[:, None, None] + tiles.relief[:, None, None] * relative
    down, east = np.gradient(elevation, PIXEL_M, axis=(1, 2))
    slope = np.degrees(np.arctan(np.hypot(east, down)))
    return _Terrain(elevation, relative, east, -down, slope)


def _land_cover(rng: np.random.Generator, tiles: _Tiles, terrain: _Terrain, size: int) -> np.ndarray:
    """Class index map (n, H, W): argmax of per-tile log-weights, smooth fields and terrain preferences."""
    classes = len(_COVERS)
    score = 1.6 * _fields(rng, (len(tiles), classes), size, ((4, 1.0), (10, 0.4)))
    score += tiles.cover[:, :, None, None].astype(np.float32)
    score -= _column("lowland", _COVERS)[None, :, None, None] * terrain.relative[:, None]
    score += _column("steep", _COVERS)[None, :, None, None] * (terrain.slope[:, None] / 15)
    return score.argmax(axis=1).astype(np.intp)


def _dynamic_world(rng: np.random.Generator, tiles: _Tiles, cover: np.ndarray, size: int) -> np.ndarray:
    codes = np.asarray(DYNAMIC_WORLD_CODES, dtype=np.uint8)
    confused = _top_share(_fields(rng, (len(tiles),), size, ((6, 1.0), (16, 0.5))), np.full(len(tiles), 0.12))
    index = np.where(confused, np.asarray([c.dw_alt for c in _COVERS])[cover],
                     np.asarray([c.dw for c in _COVERS])[cover])
    out = codes[index]
    out[tiles.dw_missing] = 0
    return out[:, None]


@dataclass(frozen=True)
class _Optical:
    sentinel2: np.ndarray
    cloudmask: np.ndarray
    cloudprod: np.ndarray
    scl: np.ndarray


def _sun(tiles: _Tiles) -> tuple[np.ndarray, np.ndarray]:
    """Sun zenith and azimuth (radians) at the ~10:30 overpass, from latitude and date."""
    doy = 30.4 * (tiles.month - 1) + tiles.day
    declination = 23.44 * np.sin(2 * np.pi * (284 + doy) / 365)
    zenith = np.clip(np.abs(tiles.lat - declination) + 8, 5, 80)
    azimuth = np.where(tiles.lat >= declination, 150.0, 30.0)
    return np.radians(zenith), np.radians(azimuth)


def _illumination(tiles: _Tiles, terrain: _Terrain) -> np.ndarray:
    """Cosine of the local incidence angle relative to flat ground: 1 on the flat, <1 facing away."""
    zenith, azimuth = (a[:, None, None] for a in _sun(tiles))
    dot = np.cos(zenith) - np.sin(zenith) * (terrain.east * np.sin(azimuth) + terrain.north * np.cos(azimuth))
    return np.clip(dot / np.sqrt(1 + terrain.east**2 + terrain.north**2) / np.cos(zenith), 0, 1.6)


def _surface(rng: np.random.Generator, tiles: _Tiles, cover: np.ndarray, snow: np.ndarray) -> np.ndarray:
    """Surface reflectance (n, 13, H, W): class spectra with phenology and a per-tile jitter."""
    n = len(tiles)
    green = _with_b10([c.reflectance for c in _COVERS])
    drift = (1 - tiles.greenness)[:, None] * _column("phenology", _COVERS)[None]
    spectra = green[None] + drift[..., None].astype(np.float32) * (_with_b10(_DRY_SOIL) - green)[None]
    spectra *= 1 + 0.04 * rng.standard_normal(spectra.shape, dtype=np.float32)
    index = np.where(snow, _SNOW, cover)
    return np.ascontiguousarray(np.moveaxis(spectra[np.arange(n)[:, None, None], index], -1, 1))


def _sentinel2(
    rng: np.random.Generator, tiles: _Tiles, cover: np.ndarray, terrain: _Terrain, size: int
) -> _Optical:
    n = len(tiles)
    snow = _top_share(_fields(rng, (n,), size, ((3, 1.0), (8, 0.5))), tiles.snow) & (cover != _TREE)
    refl = _surface(rng, tiles, cover, snow)
    texture = _fields(rng, (n,), size, ((16, 1.0),))
    shade = _illumination(tiles, terrain)
    refl *= ((1 + 0.08 * texture) * (0.3 + 0.7 * shade))[:, None]
    for bands, passes in ((_BANDS_20M, 1), (_BANDS_60M, 3)):
        index = [SENTINEL2_BANDS.index(b) for b in bands]
        refl[:, index] = _blur(refl[:, index], passes)
    refl *= 1 + 0.03 * rng.standard_normal((n, len(SENTINEL2_BANDS), 1, 1), dtype=np.float32)
    refl += (0.003 + 0.02 * refl) * rng.standard_normal(refl.shape, dtype=np.float32)
    l1c = ~tiles.l2a
    refl[l1c] = refl[l1c] * _with_b10(_L1C_GAIN)[:, None, None] + (
        tiles.haze[l1c, None, None, None] * _with_b10(_L1C_PATH, 0.002)[:, None, None])
    alpha = _cloud_opacity(rng, tiles, size)
    refl += alpha[:, None] * (_with_b10(_CLOUD, 0.06)[:, None, None] - refl)
    edge = _swath_edge(rng, tiles, size)
    s2 = np.clip(np.round(refl * 10000), 1, 65535).astype(np.uint16)
    s2[tiles.l2a, _B10] = 0
    s2 = np.where(edge[:, None], np.uint16(0), s2)
    scl = np.asarray([c.scl for c in _COVERS], dtype=np.uint8)[cover]
    scl[snow] = 11
    scl[shade < 0.3] = 2
    return _Optical(s2, *_cloud_products(tiles, alpha, edge, scl))


def _cloud_opacity(rng: np.random.Generator, tiles: _Tiles, size: int) -> np.ndarray:
    field = _fields(rng, (len(tiles),), size, ((3, 1.0), (8, 0.5), (20, 0.2)))
    cloudy = _top_share(field, tiles.clouds)
    edge = np.where(cloudy, field, np.inf).min(axis=(1, 2), keepdims=True)
    return np.where(cloudy, np.clip(0.3 + 1.2 * (field - edge), 0, 1), 0).astype(np.float32)


def _swath_edge(rng: np.random.Generator, tiles: _Tiles, size: int) -> np.ndarray:
    """No-data half-planes (5-50% of the tile) on the few tiles that lie on a swath edge."""
    n = len(tiles)
    angle = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    reach = rng.uniform(0, 0.45 * size, n)[:, None, None]
    grid = np.arange(size) - (size - 1) / 2
    across = grid[None, None, :] * np.cos(angle) + grid[None, :, None] * np.sin(angle)
    return (across > reach) & tiles.s2_edge[:, None, None]


def _no_data(name: str) -> float:
    """The registry's no-data value of a modality that has one."""
    value = MODALITIES[name].no_data
    assert value is not None, name
    return value


def _cloud_products(
    tiles: _Tiles, alpha: np.ndarray, edge: np.ndarray, scl: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """QA60 (both levels), MSK_CLDPRB and SCL (L2A only; L1C gets their no-data codes)."""
    qa60 = np.where(alpha >= 0.5, 1024, np.where(alpha > 0, 2048, 0)).astype(np.uint16)
    prob = np.where(alpha > 0, np.round(40 + 60 * alpha), 0).astype(np.uint16)
    scl = np.where(alpha > 0.7, 9, np.where(alpha > 0.4, 8, np.where(alpha > 0, 10, scl))).astype(np.uint8)
    for array in (qa60, prob, scl):
        array[edge] = 0
    prob[~tiles.l2a] = _no_data("sentinel2_cloudprod")
    scl[~tiles.l2a] = _no_data("sentinel2_scl")
    return qa60[:, None], prob[:, None], scl[:, None]


def _sentinel1(
    rng: np.random.Generator, tiles: _Tiles, cover: np.ndarray, terrain: _Terrain, size: int
) -> np.ndarray:
    """Backscatter in dB (n, 8, H, W) in registry channel order; -inf for channels not acquired."""
    n = len(tiles)
    base = {pol: _column(pol, _COVERS)[cover] for pol in ("vv", "vh")}
    base["vv"] = base["vv"] + np.where(cover == _WATER, tiles.water_rough[:, None, None], 0).astype(np.float32)
    moist = (tiles.wetness[:, None, None] * _column("wet", _COVERS)[cover]).astype(np.float32)
    facing = np.degrees(np.arctan(terrain.east)).astype(np.float32)
    texture = _fields(rng, (n,), size, ((16, 1.0),))
    channels = MODALITIES["sentinel1"].bands
    out = np.empty((n, len(channels), size, size), dtype=np.float32)
    for i, channel in enumerate(channels):
        orbit, pol = channel.split("_")
        value = base["vv" if pol[0] == pol[1] else "vh"] + moist + texture
        # Slopes facing the sensor (west of target when ascending) are brighter; H-pol runs ~1 dB up.
        value += (_S1_SLOPE_DB if orbit == "asc" else -_S1_SLOPE_DB) * facing + (1.0 if pol[0] == "H" else 0.0)
        out[:, i] = value + rng.standard_normal((n, size, size), dtype=np.float32)
        acquired = [pol in (_S1_POLARISATIONS[p] or ()) for p in tiles.s1[:, 0 if orbit == "asc" else 1]]
        out[~np.asarray(acquired, dtype=bool), i] = MODALITIES["sentinel1"].no_data
    return out


def _canopy(rng: np.random.Generator, tiles: _Tiles, cover: np.ndarray, size: int) -> np.ndarray:
    """ETH canopy height and its std, int8 metres; -1 (no data) over water and on missing tiles."""
    n = len(tiles)
    field = _fields(rng, (n,), size, ((10, 1.0), (24, 0.5)))
    height = tiles.canopy[:, None, None] * _column("height", _COVERS)[cover] * (0.8 + 0.2 * field)
    height = _blur(np.maximum(height + rng.normal(0.2, 0.5, height.shape), 0), 1)
    std = 2 + 0.25 * height + np.abs(rng.normal(0, 0.7, height.shape))
    out = np.clip(np.round(np.stack([height, std], axis=1)), 0, 127).astype(np.int8)
    missing = (cover == _WATER) | tiles.canopy_missing[:, None, None]
    return np.where(missing[:, None], np.int8(_no_data("canopy_height_eth")), out)


def _render(rng: np.random.Generator, tiles: _Tiles, size: int) -> dict[str, np.ndarray]:
    """All pixel modalities of a block of tiles, in their on-disk dtypes."""
    terrain = _terrain(rng, tiles, size)
    cover = _land_cover(rng, tiles, terrain, size)
    optical = _sentinel2(rng, tiles, cover, terrain, size)
    aster = np.stack([np.clip(np.round(terrain.elevation), -400, 8800), np.round(terrain.slope)], axis=1)
    return {
        "sentinel2": optical.sentinel2,
        "sentinel2_cloudmask": optical.cloudmask,
        "sentinel2_cloudprod": optical.cloudprod,
        "sentinel2_scl": optical.scl,
        "sentinel1": _sentinel1(rng, tiles, cover, terrain, size),
        "aster": aster.astype(np.int16),
        "dynamic_world": _dynamic_world(rng, tiles, cover, size),
        "canopy_height_eth": _canopy(rng, tiles, cover, size),
        "esa_worldcover": np.asarray(ESA_WORLDCOVER_CODES, dtype=np.uint8)[cover][:, None],
    }


def _image_level(tiles: _Tiles) -> dict[str, np.ndarray]:
    """The vector modalities of all tiles, in their on-disk dtypes."""
    def sin_cos(radians: np.ndarray) -> np.ndarray:
        return np.stack([np.sin(radians), np.cos(radians)], axis=1).astype(np.float32)

    def one_hot(index: np.ndarray, name: str) -> np.ndarray:
        modality = MODALITIES[name]
        return np.eye(len(modality.bands), dtype=modality.disk_dtype)[index]

    return {
        "era5": tiles.era5,
        "lat": sin_cos(np.radians(tiles.lat)),
        "lon": sin_cos(np.radians(tiles.lon)),
        "month": sin_cos(2 * np.pi * tiles.month / 12),
        "biome": one_hot(tiles.biome, "biome"),
        "eco_region": one_hot(tiles.eco, "eco_region"),
    }


# -- statistics -------------------------------------------------------------------------------------


class _Moments:
    """Per-channel sums over valid pixels, for the reference's mean/std/min/max of a pixel modality."""

    def __init__(self, channels: int) -> None:
        self.total = np.zeros(channels)
        self.squares = np.zeros(channels)
        self.count = np.zeros(channels)
        self.low = np.full(channels, np.inf)
        self.high = np.full(channels, -np.inf)

    def add(self, block: np.ndarray, no_data: float | None) -> None:
        values = block.astype(np.float64)
        valid = np.ones_like(values, dtype=bool) if no_data is None else values != no_data
        kept = np.where(valid, values, 0.0)
        axes = (0, 2, 3)
        self.total += kept.sum(axis=axes)
        self.squares += (kept * kept).sum(axis=axes)
        self.count += valid.sum(axis=axes)
        if block.shape[0]:
            self.low = np.minimum(self.low, np.where(valid, values, np.inf).min(axis=axes))
            self.high = np.maximum(self.high, np.where(valid, values, -np.inf).max(axis=axes))

    def result(self) -> dict[str, list[float]]:
        """Population mean/std; NaN mean and std, +inf min and -inf max where nothing was valid."""
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = self.total / self.count
            std = np.sqrt(np.maximum(self.squares / self.count - mean**2, 0))
        return _stats_entry(mean, std, self.low, self.high)


def _stats_entry(*columns: np.ndarray) -> dict[str, list[float]]:
    return {key: [float(v) for v in column] for key, column in zip(("mean", "std", "min", "max"), columns,
                                                                     strict=True)}


def _vector_stats(values: np.ndarray) -> dict[str, list[float]]:
    """NaN-aware mean/std/min/max over tiles of an image-level modality."""
    values = values.astype(np.float64)
    count = np.count_nonzero(~np.isnan(values), axis=0)
    mean = np.nansum(values, axis=0) / count
    std = np.sqrt(np.nansum((values - mean) ** 2, axis=0) / count)
    return _stats_entry(mean, std, np.nanmin(values, axis=0), np.nanmax(values, axis=0))


class _BandStats:
    """Accumulates the pixel statistics of the band_stats file while blocks are written."""

    PER_LEVEL = ("sentinel2", "sentinel2_cloudmask", "sentinel2_cloudprod")
    PLAIN = ("sentinel1", "aster", "canopy_height_eth")

    def __init__(self) -> None:
        self.moments = {
            key: _Moments(len(MODALITIES[name].bands))
            for name in (*self.PER_LEVEL, *self.PLAIN)
            for key in ((f"{name}_l2a", f"{name}_l1c") if name in self.PER_LEVEL else (name,))
        }

    def add(self, block: dict[str, np.ndarray], l2a: np.ndarray) -> None:
        for name in self.PER_LEVEL:
            no_data = MODALITIES[name].no_data
            self.moments[f"{name}_l2a"].add(block[name][l2a], no_data)
            self.moments[f"{name}_l1c"].add(block[name][~l2a], no_data)
        for name in self.PLAIN:
            self.moments[name].add(block[name], MODALITIES[name].no_data)

    def result(self, image_level: dict[str, np.ndarray]) -> dict[str, dict[str, list[float]]]:
        """All entries, keyed (and ordered) as the reference writes them: by h5 dataset name."""
        entries = {key: m.result() for key, m in self.moments.items()}
        entries.update({name: _vector_stats(image_level[name]) for name in ("era5", "lat", "lon", "month")})
        return dict(sorted(entries.items()))


# -- folder -----------------------------------------------------------------------------------------


def _tile_ids(n: int, seed: int) -> list[str]:
    return [f"synth{seed}_{i:07d}" for i in range(n)]


def _tile_info(tiles: _Tiles, ids: list[str]) -> dict[str, dict[str, Any]]:
    """tile_info entries as the real pipeline writes them (docs/method.md, MMEarth data)."""
    info = {}
    for i, tile_id in enumerate(ids):
        year, month = int(tiles.year[i]), int(tiles.month[i])
        prev = f"{year - 1}12" if month == 1 else f"{year}{month - 1:02d}"
        era5 = [float(v) for v in tiles.era5[i]]
        lat, lon = float(tiles.lat[i]), float(tiles.lon[i])
        orbits = [_S1_POLARISATIONS[p] for p in tiles.s1[i]]
        info[tile_id] = {
            "S2_DATE": f"{year}-{month:02d}-{int(tiles.day[i]):02d}",
            "S2_type": "l2a" if tiles.l2a[i] else "l1c",
            "CRS": f"EPSG:{(32600 if lat >= 0 else 32700) + int((lon + 180) // 6) % 60 + 1}",
            "lat": lat,
            "lon": lon,
            "biome": int(tiles.biome[i]),
            "eco_region": int(tiles.eco[i]),
            "NO_DATA": False,
            "BANDS": {
                "sentinel2": _GEE_S2_BANDS["l2a" if tiles.l2a[i] else "l1c"],
                "sentinel1_asc": list(orbits[0]) if orbits[0] else None,
                "sentinel1_desc": list(orbits[1]) if orbits[1] else None,
                "aster": ["b1", "slope"],
                "era5": [f"{m}_{q}" for m in (prev, f"{year}{month:02d}") for q in _ERA5_QUANTITIES]
                + list(_ERA5_YEAR_NAMES),
                "dynamic_world": None if tiles.dw_missing[i] else ["label"],
                "canopy_height_eth": None if tiles.canopy_missing[i] else ["height", "std"],
                "esa_worldcover": ["Map"],
            },
            "era5": {"month1": era5[0:4], "month2": era5[4:8], "year": era5[8:12]},
        }
    return info


def _splits(rng: np.random.Generator, n: int) -> dict[str, list[int]]:
    """80/10/10 of shuffled rows (each list sorted, so a split reads the h5 in order)."""
    order = rng.permutation(n)
    held_out = n // 10
    parts = {"train": order[: n - 2 * held_out], "val": order[n - 2 * held_out: n - held_out],
             "test": order[n - held_out:]}
    return {split: sorted(int(i) for i in rows) for split, rows in parts.items()}


def _create_datasets(h5: h5py.File, n: int, size: int) -> None:
    """Every registry modality, gzip-compressed with one tile per chunk, plus the metadata table."""
    for name, modality in MODALITIES.items():
        per_tile = (len(modality.bands), size, size) if modality.level == "pixel" else (len(modality.bands),)
        h5.create_dataset(name, shape=(n, *per_tile), dtype=modality.disk_dtype, chunks=(1, *per_tile),
                          compression="gzip")
    h5.create_dataset("metadata", shape=(n,), dtype=METADATA_DTYPE, chunks=(1,), compression="gzip")


def _write_folder(folder: Path, n: int, size: int, seed: int, progress: bool) -> None:
    stem = f"data_synth_v001_{size}"
    tiles = _sample_tiles(np.random.default_rng([seed, 0]), n)
    _ensure_coverage(tiles)
    ids = _tile_ids(n, seed)
    image_level = _image_level(tiles)
    stats = _BandStats()
    block = max(1, BLOCK_TILES_64 * 64**2 // size**2)
    with h5py.File(folder / f"{stem}.h5", "w") as h5, tqdm(total=n, unit="tile", disable=not progress) as bar:
        _create_datasets(h5, n, size)
        h5["metadata"][:] = np.array(list(zip(ids, np.where(tiles.l2a, "l2a", "l1c"), strict=True)),
                                     dtype=METADATA_DTYPE)
        for name, values in image_level.items():
            h5[name][:] = values
        for start in range(0, n, block):
            rows = slice(start, min(start + block, n))
            pixels = _render(np.random.default_rng([seed, 1, start]), tiles.take(rows), size)
            for name, values in pixels.items():
                h5[name][rows] = values
            stats.add(pixels, tiles.l2a[rows])
            bar.update(rows.stop - rows.start)
    _write_json(folder / f"{stem}_band_stats.json", stats.result(image_level))
    _write_json(folder / f"{stem}_tile_info.json", _tile_info(tiles, ids))
    _write_json(folder / f"{stem}_splits.json", _splits(np.random.default_rng([seed, 2]), n))


def _write_json(path: Path, content: Any) -> None:
    """Plain json.dump, as the reference: NaN and Infinity stay as JavaScript literals."""
    with open(path, "w") as f:
        json.dump(content, f)


def _check_arguments(tiles: int, size: int, seed: int) -> None:
    if isinstance(tiles, bool) or not isinstance(tiles, (int, np.integer)) or tiles < 1:
        raise ValueError(f"tiles must be an integer >= 1, got {tiles!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)} (MMEarth64 / MMEarth), got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")


def file_names(size: int) -> list[str]:
    """The names of the files a synthetic folder of ``size`` px tiles holds."""
    return [f"data_synth_v001_{size}{suffix}" for suffix in FILE_SUFFIXES]


_OWN_NAMES = frozenset(name for size in SIZES for name in file_names(size))


def estimate_bytes(tiles: int, size: int) -> int:
    """About how many bytes a folder of ``tiles`` tiles of ``size`` px takes on disk (an upper estimate)."""
    per_tile = METADATA_DTYPE.itemsize + sum(
        len(m.bands) * (size * size if m.level == "pixel" else 1) * np.dtype(m.disk_dtype).itemsize
        for m in MODALITIES.values()
    )
    return int(tiles * (per_tile * _H5_COMPRESSION_BOUND + _JSON_BYTES_PER_TILE))


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _check_space(out: Path, tiles: int, size: int) -> None:
    """Refuse before writing when the disk cannot hold the folder (the old one stays until the new is done)."""
    needed = estimate_bytes(tiles, size)
    where = _existing_ancestor(out.parent)
    free = shutil.disk_usage(where).free
    if needed > free:
        raise ValueError(
            f"{out}: {tiles} synthetic tiles of {size} px need about {format_bytes(needed)}, "
            f"{format_bytes(free)} free on {where}"
        )


def format_bytes(count: float) -> str:
    """``count`` bytes in the largest binary unit that keeps the figure >= 1 (``12.3 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _check_target(out: Path, overwrite: bool) -> list[Path]:
    """The entries of ``out`` that writing will replace: none unless ``overwrite``, and then only files
    this module writes. Anything else (a subfolder, a link, any other name) refuses, naming it."""
    if out.is_symlink():
        raise FileExistsError(f"{out} is a symbolic link; give the folder it points to")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if not out.exists():
        return []
    entries = sorted(out.iterdir())
    if entries and not overwrite:
        raise FileExistsError(f"{out} is not empty ({len(entries)} entries); pass overwrite=True to replace it")
    foreign = [e for e in entries if e.name not in _OWN_NAMES or e.is_symlink() or not e.is_file()]
    if foreign:
        raise FileExistsError(
            f"refusing to overwrite {out}: {foreign[0].name!r} was not written by mpmae synth (only its files "
            f"data_synth_v001_<size>{{{','.join(FILE_SUFFIXES)}}} are replaced); move it elsewhere first"
        )
    return entries


def _remove_own(folder: Path, names: list[str]) -> None:
    """Delete ``names`` (files this module wrote) and then the folder, which must then be empty."""
    for name in names:
        (folder / name).unlink(missing_ok=True)
    folder.rmdir()


def _publish(staged: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder into place. ``out`` is checked again (it may have changed while tiles were
    generated); an old folder is set aside first and only its synth files are removed, last."""
    replaced = [p.name for p in _check_target(out, overwrite)]
    if not out.exists():
        staged.rename(out)
        return
    old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
    out.rename(old)
    try:
        staged.rename(out)
    except BaseException:
        old.rename(out)
        raise
    try:
        _remove_own(old, replaced)
    except OSError:
        raise FileExistsError(
            f"wrote {out}; the folder it replaced was kept as {old}: it gained entries mpmae synth did not write"
        ) from None


def write_synthetic_mmearth(
    out_dir: Path | str, tiles: int, size: int = 64, seed: int = 0, overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``tiles`` synthetic tiles of ``size`` px as an MMEarth v001 folder; return the folder.

    The folder holds ``data_synth_v001_<size>{.h5,_splits.json,_tile_info.json,_band_stats.json}``. It is
    built in a hidden sibling folder and renamed into place when complete, so an interrupted run never
    leaves a folder that looks valid. The output is a deterministic function of ``(tiles, size, seed)``.

    ``overwrite`` replaces a folder that holds only these files (of either size); any other entry refuses
    with ``FileExistsError`` naming it, so a real MMEarth folder or a user's files are never deleted. A
    disk without room for about :func:`estimate_bytes` refuses with ``ValueError`` before anything is written.
    """
    _check_arguments(tiles, size, seed)
    out = Path(out_dir)
    _check_target(out, overwrite)
    _check_space(out, int(tiles), size)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    staged.mkdir()
    try:
        _write_folder(staged, int(tiles), size, int(seed), progress)
        _publish(staged, out, overwrite)
    except BaseException:
        with contextlib.suppress(OSError):  # never hide the error that stopped the run
            _remove_own(staged, file_names(size))
        raise
    return out
