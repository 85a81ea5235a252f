"""Whole-folder validation and a summary of an MMEarth folder (`mpmae inspect`).

Opening a dataset validates what one split needs; inspection goes further and checks every split, that
every tile id of the file has a tile_info entry, and reads a sample of tiles through the same preprocessing
as training to report the share of no-data per modality.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mpmae.data.mmearth import SPLITS, MMEarthDataset, MMEarthFiles, MMEarthFormatError, h5_dataset, open_h5
from mpmae.modalities import MODALITIES, get_modality


@dataclass
class FolderSummary:
    """What `mpmae inspect` reports about a valid folder."""

    root: Path
    num_tiles: int
    image_size: int | None
    tiles_per_split: dict[str, int]
    s2_levels: dict[str, int]
    modalities: dict[str, tuple[tuple[int, ...], str]]
    no_data_share: dict[str, float]
    sampled_tiles: int
    unknown_datasets: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The summary as printable lines."""
        out = [
            f"MMEarth folder {self.root}",
            f"  tiles: {self.num_tiles} ({self.image_size} px)",
            "  splits: " + ", ".join(f"{k} {v}" for k, v in self.tiles_per_split.items()),
            "  sentinel2 levels: " + ", ".join(f"{k} {v}" for k, v in sorted(self.s2_levels.items())),
            f"  modalities (no-data share over {self.sampled_tiles} sampled tiles):",
        ]
        for name, (shape, dtype) in self.modalities.items():
            out.append(f"    {name:<20} {str(shape):<22} {dtype:<8} no-data {self.no_data_share[name]:6.1%}")
        if self.unknown_datasets:
            out.append(f"  datasets not in the registry (ignored): {self.unknown_datasets}")
        return out


def inspect_folder(root: Path | str, sample: int = 256) -> FolderSummary:
    """Validate a whole MMEarth folder and summarise it; raises ``MMEarthFormatError`` on bad input."""
    files = MMEarthFiles.discover(root)
    with open_h5(files.h5) as h5:
        present = [name for name in MODALITIES if name in h5]
        unknown = sorted(k for k in h5 if k not in MODALITIES and k != "metadata")
        opened = {name: h5_dataset(h5, name) for name in present}
        shapes = {name: (ds.shape, str(ds.dtype)) for name, ds in opened.items()}
    if not present:
        raise MMEarthFormatError(f"{files.h5}: holds none of the registry's modalities {sorted(MODALITIES)}")
    datasets = {split: MMEarthDataset(root, split, present) for split in SPLITS}
    train = datasets["train"]
    levels = _s2_levels(train, files)
    largest = max(datasets.values(), key=len)
    positions = np.unique(np.linspace(0, len(largest) - 1, min(sample, len(largest))).astype(np.int64))
    return FolderSummary(
        root=Path(root),
        num_tiles=train.num_tiles,
        image_size=train.image_size,
        tiles_per_split={split: len(ds) for split, ds in datasets.items()},
        s2_levels=dict(levels),
        modalities=shapes,
        no_data_share=_no_data_share(largest, positions),
        sampled_tiles=len(positions),
        unknown_datasets=unknown,
    )


def _s2_levels(dataset: MMEarthDataset, files: MMEarthFiles, block: int = 65536) -> Counter[str]:
    """Tiles per processing level over every tile id of the file, read a block at a time (bounded
    memory); every id must have a tile_info entry."""
    levels: Counter[str] = Counter()
    missing: list[str] = []
    count = 0
    for start in range(0, dataset.num_tiles, block):
        for tile_id in dataset.tile_ids(np.arange(start, min(start + block, dataset.num_tiles))):
            info = dataset.tile_info.get(tile_id)
            if isinstance(info, dict):
                levels[str(info.get("S2_type", "missing")).lower()] += 1
                continue
            count += 1
            if len(missing) < 3:
                missing.append(tile_id)
    if count:
        raise MMEarthFormatError(
            f"{files.tile_info}: no entry for {count} tile id(s) of {files.h5.name}, e.g. {missing}"
        )
    return levels


def _no_data_share(dataset: MMEarthDataset, positions: np.ndarray, block: int = 64) -> dict[str, float]:
    """Fraction of values that preprocessing marks missing (NaN, or -1 for labels), per modality."""
    missing: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for start in range(0, len(positions), block):
        batch = dataset.read_batch(positions[start : start + block])
        for name in dataset.selection:
            values = batch[name]
            if get_modality(name).encoding == "one_hot":
                invalid = values.sum(axis=1) != 1
            elif values.dtype.kind == "f":
                invalid = np.isnan(values)
            else:
                invalid = values < 0
            missing[name] += int(invalid.sum())
            total[name] += invalid.size
    return {name: missing[name] / max(total[name], 1) for name in dataset.selection}
