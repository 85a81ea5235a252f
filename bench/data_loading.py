"""Samples/s and peak memory of every data path, on one core, for two dataset sizes.

    .venv/bin/python bench/data_loading.py [--quick] [--tiles 1250 2500] [--batch-size 64] [--workdir DIR]

For each size it generates a synthetic 64 px MMEarth folder (reused if present), converts the train split
(80 % of the tiles) to Parquet and FFCV shards, then runs each path in a fresh subprocess pinned to one CPU
(Ray started with ``num_cpus=1`` and a 512 MiB object store, FFCV with one worker, torch with one
thread):

- ``h5-item``: ``MMEarthDataset[i]`` per tile, collated with torch's ``default_collate`` (the original
  project's loader, preprocessing included)
- ``h5-batch``: ``MMEarthDataset.read_batch`` on consecutive positions (preprocessing included)
- ``h5-raw``: ``MMEarthDataset.read_raw`` on consecutive positions (the h5 read alone)
- ``ray-h5``: Ray Data over the folder (``MMEarthDatasource``), raw batches
- ``ray-parquet``: Ray Data over the Parquet shards, raw batches
- ``ffcv``: the FFCV loader over the ``.beton`` shards, raw batches

The feeds deliver raw batches (the file's dtypes, torch tensors), as a training worker takes them; it
normalises on its device. What that costs on this CPU is ``normalise_samples_per_s`` (after the 56 px crop,
one thread), for a CPU-only run. Each path runs two epochs over the train split: ``samples_per_s`` is the
second epoch's rate once its first batch is in (the steady state, what an epoch of a large dataset runs
at), ``epoch_samples_per_s`` the whole second epoch's (with Ray's per-epoch start-up, which weighs
on these small epochs), ``first_batch_s`` that start-up. Peak RSS is summed over the process tree (the driver
plus every process it started, Ray's included; shared pages count once per process, an upper bound).
``parquet_decode_samples_per_s`` compares decoding this layout (fixed-size lists of the raw dtype) with
Arrow's tensor-extension columns of float32 values (the previous layout), in process, without Ray.
The last line is one JSON object of every figure. ``--quick``: one size of 320 tiles, batch 16 (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

PATHS = ("h5-item", "h5-batch", "h5-raw", "ray-h5", "ray-parquet", "ffcv")
#: Batches of an epoch left out of its steady-state rate: the first one waits for Ray's read tasks to start.
WARM_BATCHES = 1
TILES_PER_SHARD = 512


# -- child: one path, one core ----------------------------------------------------------------------


class PeakRSS:
    """Samples the summed RSS of this process and all its descendants in a background thread."""

    def __init__(self, interval: float = 0.05) -> None:
        import psutil

        self.root = psutil.Process()
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        total = 0
        for proc in [self.root, *self.root.children(recursive=True)]:
            try:
                total += proc.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())


def _h5_item(folder: Path, batch_size: int) -> Callable[[], Iterable[dict]]:
    from torch.utils.data import default_collate

    from mpmae.data import MMEarthDataset

    dataset = MMEarthDataset(folder)

    def epoch() -> Iterable[dict]:
        for start in range(0, len(dataset), batch_size):
            stop = min(start + batch_size, len(dataset))
            yield default_collate([dataset[i] for i in range(start, stop)])

    return epoch


def _h5_batch(folder: Path, batch_size: int) -> Callable[[], Iterable[dict]]:
    import numpy as np
    import torch

    from mpmae.data import MMEarthDataset

    dataset = MMEarthDataset(folder)

    def epoch() -> Iterable[dict]:
        for start in range(0, len(dataset), batch_size):
            batch = dataset.read_batch(np.arange(start, min(start + batch_size, len(dataset))))
            yield {k: v if k == "id" else torch.from_numpy(v) for k, v in batch.items()}

    return epoch


def _h5_raw(folder: Path, batch_size: int) -> Callable[[], Iterable[dict]]:
    import numpy as np

    from mpmae.data import MMEarthDataset
    from mpmae.data.loaders import raw_tensors

    dataset = MMEarthDataset(folder)

    def epoch() -> Iterable[dict]:
        for start in range(0, len(dataset), batch_size):
            yield raw_tensors(dataset.read_raw(np.arange(start, min(start + batch_size, len(dataset)))))

    return epoch


def _ray(source: Path, batch_size: int) -> Callable[[], Iterable[dict]]:
    import ray

    from mpmae.data.loaders import iter_raw_batches, ray_dataset

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=1, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    dataset = ray_dataset(source)
    return lambda: iter_raw_batches(dataset, batch_size)


def _ffcv(shards: Path, batch_size: int) -> Callable[[], Iterable[dict]]:
    from mpmae.data.loaders import ffcv_loader

    loader = ffcv_loader(shards, batch_size, num_workers=1)
    return lambda: iter(loader)


def run_child(path: str, folder: Path, batch_size: int) -> dict:
    """Two epochs of one path; returns its figures."""
    import torch

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    torch.set_num_threads(1)
    with PeakRSS() as rss:
        start = time.perf_counter()
        make = {
            "h5-item": lambda: _h5_item(folder, batch_size),
            "h5-batch": lambda: _h5_batch(folder, batch_size),
            "h5-raw": lambda: _h5_raw(folder, batch_size),
            "ray-h5": lambda: _ray(folder, batch_size),
            "ray-parquet": lambda: _ray(folder.parent / f"{folder.name}-parquet", batch_size),
            "ffcv": lambda: _ffcv(folder.parent / f"{folder.name}-ffcv", batch_size),
        }[path]
        epoch = make()
        first_epoch_s = 0.0
        for index in range(2):
            marks = [(0, time.perf_counter())]
            for batch in epoch():
                marks.append((marks[-1][0] + len(batch["id"]), time.perf_counter()))
            if index == 0:
                first_epoch_s = marks[-1][1] - start
    (samples, end), (warm, warm_at) = marks[-1], marks[min(WARM_BATCHES, len(marks) - 2)]
    return {"path": path, "samples": samples, "first_epoch_s": first_epoch_s,
            "samples_per_s": (samples - warm) / (end - warm_at), "epoch_samples_per_s": samples / (end - marks[0][1]),
            "first_batch_s": marks[1][1] - marks[0][1], "peak_rss_mib": rss.peak / 2**20}


def normalise_rate(folder: Path, batch_size: int, crop: int = 56) -> float:
    """Samples/s of the worker's crop and normalisation of raw batches on this CPU, one thread."""
    import numpy as np
    import torch

    from mpmae.data import MMEarthDataset
    from mpmae.data.loaders import aligned_random_crop, raw_tensors

    torch.set_num_threads(1)
    dataset = MMEarthDataset(folder)
    raw = raw_tensors(dataset.read_raw(np.arange(min(batch_size, len(dataset)))))
    raw.pop("id")
    generator = torch.Generator().manual_seed(0)
    start, rounds = time.perf_counter(), 10
    for _ in range(rounds):
        dataset.normalizer(aligned_random_crop(raw, crop, generator))
    return rounds * len(raw["sentinel2"]) / (time.perf_counter() - start)


def decode_rates(folder: Path, rounds: int = 3) -> dict[str, float]:
    """Samples/s of decoding one Parquet shard into numpy arrays: the raw fixed-size-list layout vs the
    tensor-extension columns of preprocessed float32/int64 values that shards held before."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mpmae.data import MMEarthDataset
    from mpmae.data.shards import PARQUET_COMPRESSION, table_to_raw

    shard = next(iter(sorted((folder.parent / f"{folder.name}-parquet").glob("train-*.parquet"))))
    dataset = MMEarthDataset(folder)
    batch = dataset.read_batch(np.arange(min(len(dataset), pq.read_metadata(shard).num_rows)))
    batch.pop("id")
    extension = pa.table({name: pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values))
                          for name, values in batch.items()})
    old = folder.parent / f"{folder.name}-tensor-extension.parquet"
    pq.write_table(extension, old, compression=PARQUET_COMPRESSION, use_dictionary=False, row_group_size=64)

    def rate(decode: Callable[[], int]) -> float:
        start = time.perf_counter()
        rows = sum(decode() for _ in range(rounds))
        return rows / (time.perf_counter() - start)

    def tensors() -> int:
        table = pq.read_table(old)
        for name in table.column_names:
            table.column(name).combine_chunks().to_numpy_ndarray()
        return len(table)

    def raw() -> int:
        table = pq.read_table(shard)
        table_to_raw(table)
        return len(table)

    try:
        return {"fixed_size_list_raw": rate(raw), "tensor_extension_float32": rate(tensors)}
    finally:
        old.unlink()


# -- parent: data, then one subprocess per path ------------------------------------------------------


def prepare(workdir: Path, tiles: int) -> Path:
    """The synthetic folder of ``tiles`` tiles and its train-split shards (reused when present)."""
    from mpmae.data.shards import write_shards
    from mpmae.data.synth import write_synthetic_mmearth

    folder = workdir / f"synth64-{tiles}"
    if not folder.is_dir():
        write_synthetic_mmearth(folder, tiles, size=64, progress=True)
    for format in ("parquet", "ffcv"):
        out = workdir / f"{folder.name}-{format}"
        if not any(out.glob("train-*")):
            write_shards(folder, out, format, tiles_per_shard=TILES_PER_SHARD, progress=True)
    return folder


def run_path(path: str, folder: Path, batch_size: int) -> dict:
    command = [sys.executable, __file__, "--child", path, "--folder", str(folder), "--batch-size", str(batch_size)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{path} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_line() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, nargs="+", default=[1250, 2500],
                        help="folder sizes (the train split is 80%% of them)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mpmae-bench"))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--quick", action="store_true", help="one folder of 320 tiles: a smoke run")
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.folder, args.batch_size)), flush=True)
        # FFCV's numba TBB pool can deadlock in interpreter teardown when pinned to one core: the figures are out.
        os._exit(0)

    if args.quick:
        args.tiles, args.batch_size = [320], 16
    folders = [prepare(args.workdir, tiles) for tiles in args.tiles]
    print(f"load before: {load_line()}")
    print(f"{'path':<12} {'train tiles':>11} {'samples/s':>10} {'x h5-item':>9} {'epoch /s':>9} {'1st batch s':>11} "
          f"{'peak RSS MiB':>12}")
    results: dict[str, dict[str, dict]] = {}
    for folder in folders:
        baseline = None
        for path in args.paths:
            r = run_path(path, folder, args.batch_size)
            results.setdefault(str(r["samples"]), {})[path] = r
            baseline = r["samples_per_s"] if path == "h5-item" else baseline
            ratio = f"{r['samples_per_s'] / baseline:9.2f}" if baseline else f"{'-':>9}"
            print(f"{path:<12} {r['samples']:>11} {r['samples_per_s']:>10.0f} {ratio} {r['epoch_samples_per_s']:>9.0f} "
                  f"{r['first_batch_s']:>11.2f} {r['peak_rss_mib']:>12.0f}", flush=True)
    normalise = normalise_rate(folders[-1], args.batch_size)
    decode = decode_rates(folders[-1])
    print(f"crop + normalise on this CPU, one thread: {normalise:.0f} samples/s")
    print("Parquet decode in process: " + ", ".join(f"{k} {v:.0f} samples/s" for k, v in decode.items()))
    print(f"load after: {load_line()}")
    largest = results[max(results, key=int)]
    print(json.dumps({
        "samples_per_s": {path: r["samples_per_s"] for path, r in largest.items()},
        "x_h5_item": {path: r["samples_per_s"] / largest["h5-item"]["samples_per_s"]
                      for path, r in largest.items()} if "h5-item" in largest else {},
        "epoch_samples_per_s": {path: r["epoch_samples_per_s"] for path, r in largest.items()},
        "first_batch_s": {path: r["first_batch_s"] for path, r in largest.items()},
        "peak_rss_mib": {rows: {path: r["peak_rss_mib"] for path, r in by_path.items()}
                         for rows, by_path in results.items()},
        "normalise_samples_per_s": normalise,
        "parquet_decode_samples_per_s": decode,
        "batch_size": args.batch_size, "quick": args.quick,
    }))


if __name__ == "__main__":
    main()
