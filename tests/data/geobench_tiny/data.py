#!/usr/bin/env python3
"""Write a tiny GEO-Bench v1.0 m-bigearthnet task folder (torchgeo's ``tests/data/<name>/data.py`` habit).

The folder has the layout and file formats of one written by geobench 1.0.0's own writer (as the external
``geobench_mini`` folder of real patches, see tests/external), so the reader's unit tests need no downloads:

- ``<root>/classification_v1.0/m-bigearthnet/id_NNNN.hdf5``: one float32 (120, 120) dataset per Sentinel-2
  band, named like ``08A - Vegetation Red Edge``; attribute ``pickle`` holds ``str(pickle.dumps(metadata))``
  where metadata is ``{"label": int64 array of 43 values 0/1, <band name>: {..., "band_info": Sentinel2},
  "bands_order": [...]}``;
- ``task_specs.pkl``: a pickled ``geobench.task.TaskSpecifications`` (``patch_size`` (120, 120), 12
  ``geobench.dataset.Sentinel2`` band infos, a ``geobench.label.MultiLabelClassification`` of 43 classes);
- ``band_stats.json``: per-band statistics over all samples (mean, std, min, max, median, percentiles);
- ``default_partition.json``: ``train``/``valid``/``test`` sample names.

The ``geobench.*`` classes are throwaway stand-ins placed in ``sys.modules`` only while pickling, so the
geobench package is not needed. The side is the task's own (120 px, checked by the reader against
``patch_size``); only the number of samples is small. Pixels are integer-valued reflectances (as the real
uint16 values cast to float32) with a different level per band; labels are multi-hot, at least one class
per sample and no two train samples alike. The output is a deterministic function of the arguments.

Run as a script: ``python tests/data/geobench_tiny/data.py OUT [--train 4 --valid 1 --test 1 --seed 0]``
writes ``OUT/classification_v1.0/m-bigearthnet``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

TASK = "m-bigearthnet"
BENCHMARK = "classification_v1.0"
SIDE = 120
NUM_CLASSES = 43
#: GEO-Bench band name, alternative names, native resolution (m), central wavelength (um).
BANDS = (
    ("01 - Coastal aerosol", ("1", "01"), 60, 0.443),
    ("02 - Blue", ("2", "02", "blue"), 10, 0.49),
    ("03 - Green", ("3", "03", "green"), 10, 0.56),
    ("04 - Red", ("4", "04", "red"), 10, 0.665),
    ("05 - Vegetation Red Edge", ("5", "05"), 20, 0.705),
    ("06 - Vegetation Red Edge", ("6", "06"), 20, 0.74),
    ("07 - Vegetation Red Edge", ("7", "07"), 20, 0.783),
    ("08 - NIR", ("8", "08", "NIR"), 10, 0.842),
    ("08A - Vegetation Red Edge", ("8A", "08A"), 20, 0.865),
    ("09 - Water vapour", ("9", "09"), 60, 0.945),
    ("11 - SWIR", ("11",), 20, 1.61),
    ("12 - SWIR", ("12",), 20, 2.19),
)
BAND_NAMES = tuple(name for name, *_ in BANDS)
_PERCENTILES = {"percentile_0_1": 0.1, "percentile_1": 1, "percentile_5": 5, "percentile_95": 95,
                "percentile_99": 99, "percentile_99_9": 99.9}


#: The geobench classes a task folder's pickles name, by module.
TASK_CLASSES = {"geobench.dataset": ("Sentinel2",), "geobench.label": ("MultiLabelClassification",),
                "geobench.task": ("TaskSpecifications",)}


@contextlib.contextmanager
def geobench_stand_ins(layout: Mapping[str, Sequence[str]] = TASK_CLASSES) -> Iterator[dict[str, type]]:
    """Throwaway ``geobench.*`` modules holding empty classes of ``layout``'s names, in ``sys.modules`` while
    the block runs (restored after), so that the ordinary pickler writes those globals."""
    names = ("geobench", *layout)
    saved = {name: sys.modules.get(name) for name in names}
    classes: dict[str, type] = {}
    sys.modules["geobench"] = types.ModuleType("geobench")
    for module_name, class_names in layout.items():
        module = types.ModuleType(module_name)
        for class_name in class_names:
            cls = type(class_name, (), {"__module__": module_name, "__qualname__": class_name})
            setattr(module, class_name, cls)
            classes[class_name] = cls
        sys.modules[module_name] = module
    try:
        yield classes
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old


def _new(cls: type, **attrs: object) -> object:
    obj = cls()
    obj.__dict__.update(attrs)
    return obj


def _band_info(classes: dict[str, type], index: int) -> object:
    name, alt_names, resolution, wavelength = BANDS[index]
    return _new(classes["Sentinel2"], name=name, alt_names=alt_names, spatial_resolution=resolution,
                wavelength=wavelength)


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct multi-hot rows of 43 values, each with 1 to 4 classes."""
    rows: list[np.ndarray] = []
    seen: set[bytes] = set()
    while len(rows) < n:
        row = np.zeros(NUM_CLASSES, np.int64)
        row[rng.choice(NUM_CLASSES, size=int(rng.integers(1, 5)), replace=False)] = 1
        if row.tobytes() not in seen:
            seen.add(row.tobytes())
            rows.append(row)
    return np.stack(rows)


def _pixels(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 12, SIDE, SIDE) integer-valued float32 reflectances: a level per band and sample, plus texture."""
    level = np.linspace(300.0, 3500.0, len(BANDS))[None, :, None, None] * rng.uniform(0.7, 1.3, (n, 1, 1, 1))
    texture = rng.normal(0.0, 150.0, (n, len(BANDS), SIDE, SIDE))
    return np.clip(np.rint(level + texture), 1, 10000).astype(np.float32)


def _stats(values: np.ndarray) -> dict[str, float]:
    flat = values.astype(np.float64).ravel()
    entry = {"max": float(flat.max()), "mean": float(flat.mean()), "median": float(np.median(flat)),
             "min": float(flat.min())}
    entry.update({key: float(np.percentile(flat, q)) for key, q in _PERCENTILES.items()})
    entry["std"] = float(flat.std())
    return entry


def write_geobench_tiny(root: Path | str, train: int = 4, valid: int = 1, test: int = 1, seed: int = 0) -> Path:
    """Write the tiny m-bigearthnet task under ``root`` (a GEO-Bench root); return ``root``.

    Samples are ``id_0000`` ... in split order (train, then valid, then test), as in the shared mini folder.
    """
    if min(train, valid, test) < 0 or train + valid + test < 1:
        raise ValueError(f"split sizes must be >= 0 and not all 0, got {train}, {valid}, {test}")
    root = Path(root)
    folder = root / BENCHMARK / TASK
    folder.mkdir(parents=True)
    n = train + valid + test
    rng = np.random.default_rng([seed, 20240603])
    pixels, labels = _pixels(rng, n), _labels(rng, n)
    names = [f"id_{i:04d}" for i in range(n)]
    with geobench_stand_ins() as classes:
        for i, name in enumerate(names):
            meta: dict[str, object] = {"label": labels[i]}
            with h5py.File(folder / f"{name}.hdf5", "w") as h5:
                for b, band in enumerate(BAND_NAMES):
                    h5.create_dataset(band, data=pixels[i, b])
                    meta[band] = {"date": None, "date_id": None, "spatial_resolution": 10,
                                  "band_info": _band_info(classes, b), "meta_info": None, "transform": None,
                                  "crs": None}
                meta["bands_order"] = list(BAND_NAMES)
                h5.attrs["pickle"] = str(pickle.dumps(meta, protocol=4))
        class_names = [f"class {k:02d}" for k in range(NUM_CLASSES)]
        label_type = _new(classes["MultiLabelClassification"], n_classes=NUM_CLASSES, class_name=class_names)
        specs = _new(classes["TaskSpecifications"], dataset_name=TASK, benchmark_name=BENCHMARK,
                     patch_size=(SIDE, SIDE), n_time_steps=1,
                     bands_info=[_band_info(classes, b) for b in range(len(BANDS))], label_type=label_type,
                     spatial_resolution=10)
        (folder / "task_specs.pkl").write_bytes(pickle.dumps(specs, protocol=4))
    stats = {band: _stats(pixels[:, b]) for b, band in enumerate(BAND_NAMES)}
    stats["label"] = _stats(labels)
    (folder / "band_stats.json").write_text(json.dumps(stats, indent=4, sort_keys=True))
    partition = {"train": names[:train], "valid": names[train:train + valid], "test": names[train + valid:]}
    (folder / "default_partition.json").write_text(json.dumps(partition, indent=2))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="GEO-Bench root to write (the task folder must not exist)")
    parser.add_argument("--train", type=int, default=4)
    parser.add_argument("--valid", type=int, default=1)
    parser.add_argument("--test", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    root = write_geobench_tiny(args.out, args.train, args.valid, args.test, args.seed)
    print(root / BENCHMARK / TASK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
