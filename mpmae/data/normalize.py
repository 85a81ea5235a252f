"""Raw file values to model-ready values: the one normalisation of MMEarth modalities.

Every feed ships the file's own dtypes (uint16 Sentinel-2, uint8 label maps, ...) and a per-tile flag for the
Sentinel-2 processing level (:data:`S2_LEVEL_KEY`); :class:`Normalizer` turns such a *raw batch* into the
canonical batch where the batch is, on the GPU when there is one: fewer bytes cross the object store and the
host-to-device copy, and the CPUs only read. It computes what the reference loader does (docs/method.md:
no-data to NaN, then z-score in float64 cast to float32; label codes to class indices, -1 as ignore), bit
for bit, on any device. Its numpy twin :meth:`Normalizer.numpy` serves the CPU readers
(:meth:`MMEarthDataset.read_batch <mpmae.data.mmearth.MMEarthDataset.read_batch>`), which the golden tests hold;
the tests hold the torch path equal to it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from mpmae.modalities import Modality, Selection, class_lookup, get_modality

#: Key of the per-tile bool "Sentinel-2 is L2A" (else L1C) in a raw batch: the level picks the statistics.
S2_LEVEL_KEY = "s2_l2a"
#: Sentinel-2 processing levels and the band-statistics key of each.
S2_LEVEL_STATS = {"l1c": "sentinel2_l1c", "l2a": "sentinel2_l2a"}

RawBatch = dict[str, Any]


class BandStatsError(ValueError):
    """Band statistics are missing or unusable for the selected bands."""


def select_stats(where: str, band_stats: Mapping[str, Any], key: str, modality: Modality,
                 bands: Iterable[str]) -> dict[str, list[float]]:
    """Mean and std of ``bands`` from entry ``key`` of a band-statistics file, checked: one finite value per
    band of the modality, std > 0 for the selected ones. ``where`` names the file in errors."""
    if key not in band_stats:
        raise BandStatsError(f"{where}: missing band statistics {key!r} for modality {modality.name!r}")
    entry = band_stats[key]
    arrays = {}
    for field in ("mean", "std"):
        values = entry.get(field) if isinstance(entry, Mapping) else None
        if not _is_number_list(values, len(modality.bands)):
            raise BandStatsError(
                f"{where}: {key}.{field} must list {len(modality.bands)} values "
                f"(bands {list(modality.bands)}), found {_describe(values)}"
            )
        arrays[field] = np.asarray(values, dtype=np.float64)
    bands = list(bands)
    index = modality.band_indices(bands)
    mean, std = arrays["mean"][index], arrays["std"][index]
    missing = [b for b, m, s in zip(bands, mean, std, strict=True) if not (np.isfinite(m) and np.isfinite(s))]
    if missing:
        raise BandStatsError(f"{where}: {key} has no finite mean/std for selected band(s) {missing}; deselect them")
    flat = [(b, float(s)) for b, s in zip(bands, std, strict=True) if s <= 0]
    if flat:
        band, value = flat[0]
        raise BandStatsError(
            f"{where}: {key}.std is {value} for band {band!r} (z-scoring divides by it: it must be > 0); "
            f"fix the statistics or deselect the band"
        )
    return {"mean": mean.tolist(), "std": std.tolist()}


class Normalizer:
    """Raw batch -> canonical batch for one selection and its band statistics.

    ``stats`` maps a statistics key (``sentinel1``, ``sentinel2_l2a``, ...) to the ``mean`` and ``std`` of the
    selected bands, as :func:`select_stats` returns them; Sentinel-2 needs at least one of its two levels (a
    tile of a level without statistics takes the other's, as the reference does). Build it from a band
    statistics file with :meth:`from_band_stats`; :meth:`to_dict` / :meth:`from_dict` carry it to workers and
    into shard metadata as plain JSON.
    """

    def __init__(self, selection: Selection, stats: Mapping[str, Mapping[str, list[float]]]) -> None:
        self.selection = {name: tuple(bands) for name, bands in selection.items()}
        self.stats = {key: {f: [float(v) for v in entry[f]] for f in ("mean", "std")} for key, entry in stats.items()}
        for name in self.selection:
            keys = self._stats_keys(get_modality(name))
            if keys and not any(k in self.stats for k in keys):
                raise BandStatsError(f"no band statistics for modality {name!r} (expected {' or '.join(keys)})")
        self._tables: dict[tuple[str, torch.device], torch.Tensor] = {}

    @staticmethod
    def _stats_keys(modality: Modality) -> list[str]:
        if modality.encoding != "zscore":
            return []
        if modality.name == "sentinel2":
            return list(S2_LEVEL_STATS.values())
        assert modality.stats_key is not None
        return [modality.stats_key]

    @classmethod
    def from_band_stats(cls, selection: Selection, band_stats: Mapping[str, Any], where: str,
                        s2_levels: Iterable[str] = tuple(S2_LEVEL_STATS)) -> Normalizer:
        """From a band-statistics file's content (``where`` names it in errors); Sentinel-2 statistics are
        required for the processing levels in ``s2_levels`` only (those the data hold)."""
        stats: dict[str, dict[str, list[float]]] = {}
        for name, bands in selection.items():
            modality = get_modality(name)
            keys = [S2_LEVEL_STATS[level] for level in s2_levels] if name == "sentinel2" else cls._stats_keys(modality)
            for key in keys:
                stats[key] = select_stats(where, band_stats, key, modality, bands)
        return cls(selection, stats)

    def subset(self, names: Iterable[str]) -> Normalizer:
        """The normalisation of some of the selected modalities (a feed that reads fewer columns)."""
        return Normalizer({name: self.selection[name] for name in names}, self.stats)

    def to_dict(self) -> dict[str, Any]:
        return {"selection": {n: list(b) for n, b in self.selection.items()}, "stats": self.stats}

    @classmethod
    def from_dict(cls, content: Mapping[str, Any]) -> Normalizer:
        return cls({n: tuple(b) for n, b in content["selection"].items()}, content["stats"])

    # -- applying ---------------------------------------------------------------------------------

    def __call__(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """The canonical batch of a raw batch of tensors (any device): float32 continuous values with NaN for
        no data, int64 labels with -1 as ignore, in selection order; ``id`` passes through, last."""
        out: dict[str, Any] = {}
        for name in self.selection:
            if name not in raw:
                raise KeyError(f"raw batch lacks modality {name!r} (it holds {sorted(raw)})")
            levels = self._levels(raw) if name == "sentinel2" else None
            out[name] = self._normalise(get_modality(name), torch.as_tensor(raw[name]), levels)
        if "id" in raw:
            out["id"] = raw["id"]
        return out

    def numpy(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`__call__` for a raw batch of numpy arrays, in numpy: the same values, and no torch thread pool
        in the CPU loaders (an OpenMP pool does not survive the fork of a loader process)."""
        out: dict[str, Any] = {}
        for name in self.selection:
            modality, values = get_modality(name), np.asarray(raw[name])
            if modality.encoding == "label_map":
                out[name] = class_lookup(modality, values.dtype)[values]
            elif modality.encoding == "one_hot":
                out[name] = values.astype(np.int64)
            elif modality.encoding == "raw":
                out[name] = np.where(values == modality.no_data, -1, values.astype(np.int64))
            else:
                l1c, l2a = self._s2_keys() if name == "sentinel2" else (modality.stats_key, modality.stats_key)
                assert l1c is not None and l2a is not None
                shape = (1, -1) + (1,) * (values.ndim - 2)
                mean, std = (np.asarray(self.stats[l1c][f]).reshape(shape) for f in ("mean", "std"))
                if name == "sentinel2":
                    pick = np.asarray(self._levels(raw), dtype=bool).reshape((-1,) + (1,) * (values.ndim - 1))
                    mean = np.where(pick, np.asarray(self.stats[l2a]["mean"]).reshape(shape), mean)
                    std = np.where(pick, np.asarray(self.stats[l2a]["std"]).reshape(shape), std)
                scored = ((values.astype(np.float64) - mean) / std).astype(np.float32)
                if modality.no_data is not None:
                    scored[values == modality.no_data] = np.nan
                out[name] = scored
        if "id" in raw:
            out["id"] = raw["id"]
        return out

    def _normalise(self, modality: Modality, raw: torch.Tensor, l2a: Any) -> torch.Tensor:
        if modality.encoding == "label_map":
            return self._table(modality, raw)[raw.long()]
        if modality.encoding == "one_hot":
            return raw.to(torch.int64, copy=True)  # never the loader's (read-only or reused) buffer
        if modality.encoding == "raw":
            assert modality.no_data is not None
            return raw.long().masked_fill(raw.eq(modality.no_data), -1)
        values = raw.double()  # the reference z-scores float32 values with float64 statistics
        mean, std = self._zscore_stats(modality, raw.device, values.ndim, l2a)
        out = ((values - mean) / std).float()
        if modality.no_data is not None:
            out.masked_fill_(values == modality.no_data, float("nan"))
        return out

    def _zscore_stats(self, modality: Modality, device: torch.device, ndim: int,
                      l2a: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std shaped (1 or N, C, 1, ...) on ``device``; Sentinel-2's picked per tile by its level."""
        if modality.name != "sentinel2":
            assert modality.stats_key is not None
            return self._stat(modality.stats_key, device, ndim)
        l1c_key, l2a_key = self._s2_keys()
        pick = torch.as_tensor(l2a, device=device).bool().reshape((-1,) + (1,) * (ndim - 1))
        l1c_mean, l1c_std = self._stat(l1c_key, device, ndim)
        l2a_mean, l2a_std = self._stat(l2a_key, device, ndim)
        return torch.where(pick, l2a_mean, l1c_mean), torch.where(pick, l2a_std, l1c_std)

    def _s2_keys(self) -> tuple[str, str]:
        """The statistics of L1C and of L2A tiles: a level without its own takes the other's."""
        l1c = "sentinel2_l1c" if "sentinel2_l1c" in self.stats else "sentinel2_l2a"
        return l1c, "sentinel2_l2a" if "sentinel2_l2a" in self.stats else l1c

    @staticmethod
    def _levels(raw: Mapping[str, Any]) -> Any:
        """The per-tile L2A flags of a raw batch with Sentinel-2, as the batch holds them (array or tensor)."""
        if S2_LEVEL_KEY not in raw:
            raise KeyError(f"a raw batch with sentinel2 needs {S2_LEVEL_KEY!r} (the tiles' processing levels)")
        return raw[S2_LEVEL_KEY]

    def _stat(self, key: str, device: torch.device, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of statistics ``key`` on ``device``, shaped (1, C, 1, ...) for ``ndim``-d batches."""
        shape = (1, -1) + (1,) * (ndim - 2)
        mean = self._cached(f"mean:{key}", device, lambda: torch.tensor(self.stats[key]["mean"], dtype=torch.float64))
        std = self._cached(f"std:{key}", device, lambda: torch.tensor(self.stats[key]["std"], dtype=torch.float64))
        return mean.reshape(shape), std.reshape(shape)

    def _table(self, modality: Modality, raw: torch.Tensor) -> torch.Tensor:
        """The code -> class table of a label map, on the raw batch's device."""
        dtype = np.dtype(str(raw.dtype).removeprefix("torch."))
        return self._cached(f"{modality.name}:{dtype.str}", raw.device,
                            lambda: torch.from_numpy(class_lookup(modality, dtype)))

    def _cached(self, name: str, device: torch.device, make: Any) -> torch.Tensor:
        """Small constant tensors, made once per device (no host-to-device copy per batch)."""
        if (name, device) not in self._tables:
            self._tables[name, device] = make().to(device)
        return self._tables[name, device]


def _is_number_list(values: object, length: int) -> bool:
    """A list of ``length`` plain numbers (JSON NaN and Infinity included; booleans not)."""
    return (
        isinstance(values, list)
        and len(values) == length
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    )


def _describe(value: object) -> str:
    """A bounded description of a JSON value for an error message (never the repr of a large object)."""
    if isinstance(value, (list, dict)):
        return f"a {type(value).__name__} of {len(value)} item(s)"
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"
