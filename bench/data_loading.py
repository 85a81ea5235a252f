"""Samples/s and peak memory of every data path, on one core, for two dataset sizes.

    .venv/bin/python bench/data_loading.py [--tiles 1250 2500] [--batch-size 64] [--workdir DIR]

For each size it generates a synthetic 64 px MMEarth folder (reused if present), converts the train split
(80 % of the tiles) to Parquet and FFCV shards, then runs each path in a fresh subprocess pinned to one CPU
(Ray started with ``num_cpus=1`` and a 512 MiB object store, FFCV with one worker, torch with one
thread):

- ``h5-item``: ``MMEarthDataset[i]`` per tile, collated with torch's ``default_collate``
- ``h5-batch``: ``MMEarthDataset.read_batch`` on consecutive positions
- ``ray-h5``: Ray Data over the folder (``MMEarthDatasource``)
- ``ray-parquet``: Ray Data over the Parquet shards
- ``ffcv``: the FFCV loader over the ``.beton`` shards

Each path runs two epochs over the train split, delivering canonical batches (torch tensors). It prints
the second epoch's samples/s (steady state), the first epoch's wall time (with Ray's worker start-up
and FFCV's per-shard compilation) and the peak RSS summed over the process tree (the driver plus every
process it started, Ray's included; shared pages count once per process, so this is an upper bound).
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

PATHS = ("h5-item", "h5-batch", "ray-h5", "ray-parquet", "ffcv")
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

    from mpmae.data import MMEarthDataset
    from mpmae.data.loaders import to_batch

    dataset = MMEarthDataset(folder)

    def epoch() -> Iterable[dict]:
        for start in range(0, len(dataset), batch_size):
            yield to_batch(dataset.read_batch(np.arange(start, min(start + batch_size, len(dataset)))))

    return epoch


def _ray(source: Path, batch_size: int) -> Callable[[], Iterable[dict]]:
    import ray

    from mpmae.data.loaders import iter_ray_batches, ray_dataset

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=1, object_store_memory=512 * 1024**2, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.DataContext.get_current().print_on_execution_start = False
    dataset = ray_dataset(source)
    return lambda: iter_ray_batches(dataset, batch_size)


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
            "ray-h5": lambda: _ray(folder, batch_size),
            "ray-parquet": lambda: _ray(folder.parent / f"{folder.name}-parquet", batch_size),
            "ffcv": lambda: _ffcv(folder.parent / f"{folder.name}-ffcv", batch_size),
        }[path]
        epoch = make()
        times, samples = [], 0
        for _ in range(2):
            samples = sum(len(batch["id"]) for batch in epoch())
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
    return {"path": path, "samples": samples, "first_epoch_s": times[0], "samples_per_s": samples / times[1],
            "peak_rss_mib": rss.peak / 2**20}


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
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.folder, args.batch_size)))
        return

    folders = [prepare(args.workdir, tiles) for tiles in args.tiles]
    print(f"load before: {load_line()}")
    print(f"{'path':<12} {'train tiles':>11} {'samples/s':>10} {'x h5-item':>9} {'1st epoch s':>11} "
          f"{'peak RSS MiB':>12}")
    for folder in folders:
        baseline = None
        for path in args.paths:
            r = run_path(path, folder, args.batch_size)
            baseline = r["samples_per_s"] if path == "h5-item" else baseline
            ratio = f"{r['samples_per_s'] / baseline:9.1f}" if baseline else f"{'-':>9}"
            print(f"{path:<12} {r['samples']:>11} {r['samples_per_s']:>10.0f} {ratio} "
                  f"{r['first_epoch_s']:>11.1f} {r['peak_rss_mib']:>12.0f}", flush=True)
    print(f"load after: {load_line()}")


if __name__ == "__main__":
    main()
