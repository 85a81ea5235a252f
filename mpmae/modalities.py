"""The modality registry: the one place that knows MMEarth's modality names.

Every HDF5 dataset of an MMEarth v001 file is described here once: its bands in file order, its on-disk
no-data code, whether it is a pixel map or an image-level vector, its pretext task and its class count.
The data layer, the model heads and the losses all read from this table, so a class count or a band order
is never written twice (docs/method.md, MMEarth data and Pretext tasks and losses).

Sentinel-2 bands keep the file order (B8A before B8) everywhere, pretraining and fine-tuning alike: this
is the project's one canonical band order (docs/method.md, D1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Level = Literal["pixel", "image"]
Task = Literal["regression", "segmentation", "classification"]

#: How a modality's raw values become model-ready values.
#: ``zscore``: continuous, no-data to NaN, then per-band z-score; ``label_map``: raw class codes to
#: indices 0..K-1 with -1 for no-data; ``one_hot``: an image-level one-hot class vector kept as int64;
#: ``raw``: auxiliary quality masks, kept as int64 with -1 for no-data.
Encoding = Literal["zscore", "label_map", "one_hot", "raw"]


@dataclass(frozen=True)
class Modality:
    """One HDF5 dataset of an MMEarth v001 file and how to turn it into a training target."""

    name: str
    bands: tuple[str, ...]
    disk_dtype: str
    level: Level
    encoding: Encoding
    task: Task | None = None
    no_data: float | None = None
    class_codes: tuple[int, ...] | None = None
    num_classes: int | None = None
    stats_key: str | None = None

    @property
    def is_label(self) -> bool:
        """True for modalities delivered as int64 (class maps, one-hot vectors, quality masks)."""
        return self.encoding != "zscore"

    def band_indices(self, bands: Sequence[str]) -> list[int]:
        """File positions of ``bands``; raises ``ValueError`` listing the valid names."""
        unknown = [b for b in bands if b not in self.bands]
        if unknown:
            raise ValueError(
                f"unknown band(s) {unknown} for modality {self.name!r}; valid bands: {list(self.bands)}"
            )
        return [self.bands.index(b) for b in bands]

    def output_channels(self, bands: Sequence[str]) -> int:
        """Channels a prediction head needs: classes for label tasks, bands for regression."""
        if self.task in ("segmentation", "classification"):
            assert self.num_classes is not None
            return self.num_classes
        return len(bands)


def _indexed(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}_{i}" for i in range(count))


_ERA5_QUANTITIES = ("temperature_2m", "temperature_2m_min", "temperature_2m_max", "total_precipitation_sum")

SENTINEL2_BANDS = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8A", "B8", "B9", "B10", "B11", "B12")
#: The default Sentinel-2 input: all bands but the cirrus band B10, in file order.
SENTINEL2_INPUT_BANDS = tuple(b for b in SENTINEL2_BANDS if b != "B10")
#: The reference's "rgb" input, which is really blue, green, red.
SENTINEL2_BGR_BANDS = ("B2", "B3", "B4")

ESA_WORLDCOVER_CODES = (10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 100)
DYNAMIC_WORLD_CODES = tuple(range(1, 10))

MODALITIES: dict[str, Modality] = {
    m.name: m
    for m in (
        Modality("sentinel2", SENTINEL2_BANDS, "uint16", "pixel", "zscore", "regression",
                 no_data=0, stats_key="sentinel2"),
        Modality("sentinel2_cloudmask", ("QA60",), "uint16", "pixel", "raw", no_data=65535),
        Modality("sentinel2_cloudprod", ("MSK_CLDPRB",), "uint16", "pixel", "raw", no_data=65535),
        Modality("sentinel2_scl", ("SCL",), "uint8", "pixel", "raw", no_data=255),
        Modality("sentinel1",
                 ("asc_VV", "asc_VH", "asc_HH", "asc_HV", "desc_VV", "desc_VH", "desc_HH", "desc_HV"),
                 "float32", "pixel", "zscore", "regression", no_data=float("-inf"), stats_key="sentinel1"),
        Modality("aster", ("elevation", "slope"), "int16", "pixel", "zscore", "regression",
                 stats_key="aster"),
        Modality("era5",
                 tuple(f"{period}_{q}" for period in ("prev", "curr", "year") for q in _ERA5_QUANTITIES),
                 "float32", "image", "zscore", "regression", stats_key="era5"),
        Modality("dynamic_world", ("label",), "uint8", "pixel", "label_map", "segmentation",
                 no_data=0, class_codes=DYNAMIC_WORLD_CODES, num_classes=9),
        # Missing canopy height is written as 255 cast into int8, i.e. -1 (an impossible height).
        Modality("canopy_height_eth", ("height", "std"), "int8", "pixel", "zscore", "regression",
                 no_data=-1, stats_key="canopy_height_eth"),
        Modality("esa_worldcover", ("Map",), "uint8", "pixel", "label_map", "segmentation",
                 no_data=255, class_codes=ESA_WORLDCOVER_CODES, num_classes=11),
        Modality("lat", ("sin", "cos"), "float32", "image", "zscore", "regression",
                 no_data=float("-inf"), stats_key="lat"),
        Modality("lon", ("sin", "cos"), "float32", "image", "zscore", "regression",
                 no_data=float("-inf"), stats_key="lon"),
        Modality("month", ("sin", "cos"), "float32", "image", "zscore", "regression",
                 no_data=float("-inf"), stats_key="month"),
        Modality("biome", _indexed("biome", 14), "uint8", "image", "one_hot", "classification",
                 num_classes=14),
        Modality("eco_region", _indexed("eco_region", 846), "uint16", "image", "one_hot", "classification",
                 num_classes=846),
    )
}

#: Pretext tasks in the reference's order (OUT_MODALITIES); losses and logs follow this order.
TASK_ORDER = (
    "sentinel2", "sentinel1", "aster", "era5", "dynamic_world", "canopy_height_eth",
    "lat", "lon", "biome", "eco_region", "month", "esa_worldcover",
)
IMAGE_TASKS = tuple(m for m in TASK_ORDER if MODALITIES[m].level == "image")
PIXEL_TASKS = tuple(m for m in TASK_ORDER if MODALITIES[m].level == "pixel")

#: A selection maps each chosen modality to its chosen bands, in file order.
Selection = dict[str, tuple[str, ...]]
#: What a user may write for a modality selection: a preset name, modality names, or modality -> bands
#: (None: all bands); :func:`resolve_selection` turns it into a :data:`Selection`.
ModalitySpec = str | Sequence[str] | Mapping[str, Sequence[str] | None]


def _full(names: Sequence[str]) -> Selection:
    return {n: SENTINEL2_INPUT_BANDS if n == "sentinel2" else MODALITIES[n].bands for n in names}


PRESETS: dict[str, Selection] = {
    "S2": _full(["sentinel2"]),
    "rgb": {"sentinel2": SENTINEL2_BGR_BANDS},
    "img_mod": _full(["sentinel2", *IMAGE_TASKS]),
    "pix_mod": _full(PIXEL_TASKS),
    "all_mod": _full(TASK_ORDER),
}


def get_modality(name: str) -> Modality:
    """The registry entry for ``name``; raises ``ValueError`` listing the valid names."""
    try:
        return MODALITIES[name]
    except KeyError:
        raise ValueError(f"unknown modality {name!r}; valid modalities: {sorted(MODALITIES)}") from None


def resolve_selection(spec: ModalitySpec) -> Selection:
    """Turn a preset name, a list of modality names or a ``{modality: bands}`` mapping into a Selection.

    A list (or a mapping value of ``None``) takes every band, except Sentinel-2, which defaults to its
    12 input bands. Bands come back in file order whatever order they were given in.
    """
    if isinstance(spec, str):
        if spec in PRESETS:
            return dict(PRESETS[spec])
        if spec not in MODALITIES:
            raise ValueError(
                f"unknown modality preset or name {spec!r}; valid presets: {sorted(PRESETS)}, "
                f"valid modalities: {sorted(MODALITIES)}"
            )
        spec = [spec]
    items = spec.items() if isinstance(spec, Mapping) else ((name, None) for name in spec)
    selection: Selection = {}
    for name, bands in items:
        modality = get_modality(name)
        if bands is None:
            selection[name] = SENTINEL2_INPUT_BANDS if name == "sentinel2" else modality.bands
            continue
        if modality.encoding == "one_hot" and tuple(bands) != modality.bands:
            raise ValueError(f"modality {name!r} is a one-hot vector; its entries cannot be selected")
        if not bands:
            raise ValueError(f"modality {name!r} has an empty band list")
        indices = sorted(set(modality.band_indices(list(bands))))
        selection[name] = tuple(modality.bands[i] for i in indices)
    if not selection:
        raise ValueError("the modality selection is empty")
    return selection


def tasks_of(selection: Selection) -> list[str]:
    """The pretext tasks of a selection, in the reference's task order."""
    return [m for m in TASK_ORDER if m in selection]


def class_lookup(modality: Modality, disk_dtype: np.dtype) -> np.ndarray:
    """A table raw code -> class index (-1 for no-data and unknown codes) for a label map.

    Unknown codes map to -1 rather than surviving as bogus class ids, and the no-data code is mapped
    before the remap, so class 0 (ESA tree cover) is never erased (docs/method.md, D2).
    """
    assert modality.class_codes is not None
    size = int(np.iinfo(disk_dtype).max) + 1
    table = np.full(size, -1, dtype=np.int64)
    table[list(modality.class_codes)] = np.arange(len(modality.class_codes))
    return table
