"""Ray's overhead on training: the same model and step in a plain loop vs a one-worker TorchTrainer.

Every side runs atto at 56 px / patch 8 with all 12 tasks, batch 16, 2 torch threads, on the same synthetic
folder, and reports its last epoch (the first pays start-up, FFCV's compilation and warm-up). The plain loop
does in one process what a worker does: read raw rows (``MMEarthDataset.read_raw``), crop, normalise, step.
The TorchTrainer runs twice, fed by Ray Data over Parquet shards (the cluster default) and by FFCV shards;
its figures are what the worker reports (``samples_per_s``, ``data_wait_s``), the epoch's steps only.

    .venv/bin/python bench/train_throughput.py [--quick] [--tiles 400] [--epochs 3]

The last line is one JSON object: ``{"samples_per_s": {"plain", "ray-data", "ffcv"}, "overhead": {"ray-data",
"ffcv"}, "data_wait_s": {...}, ...}`` with overhead = 1 - rate / plain rate; ``steady_overhead`` leaves out
each epoch's wait for its first batch (``feed_startup_s``: Ray Data starting its read tasks), a fixed cost
per epoch that weighs on these 20-step epochs and not on a real one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mpmae.config import PretrainConfig, load_config
from mpmae.data.loaders import aligned_random_crop, raw_tensors
from mpmae.data.mmearth import MMEarthDataset
from mpmae.data.shards import write_shards
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.models import MPMAE
from mpmae.optim import build_optimizer
from mpmae.runtime.run import channels_last
from mpmae.train.step import StepGuard, forward_backward

BATCH = 16
THREADS = 2


def _config(data: Path, storage: Path, epochs: int, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
        f"data.path={data}", f"run.storage_path={storage}", f"optim.batch_size={BATCH}",
        f"optim.epochs={epochs}", "run.num_workers=1", f"run.cpus_per_worker={THREADS}", "probe.task=null",
        *overrides,
    ])


def plain_loop(config: PretrainConfig, folder: Path) -> float:
    """Samples/s of the last epoch of an in-process loop doing what a worker does."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    dataset = MMEarthDataset(folder, "train", config.model.targets)
    model = channels_last(MPMAE(config.model))
    optimizer = build_optimizer(model, config.optim)
    guard = StepGuard(config.run.max_nonfinite_steps)
    generator = torch.Generator().manual_seed(0)
    rate = 0.0
    for _ in range(config.optim.epochs):
        order = np.random.permutation(len(dataset))
        start = time.perf_counter()
        steps = len(order) // BATCH
        for step in range(steps):
            raw = raw_tensors(dataset.read_raw(order[step * BATCH:(step + 1) * BATCH]))
            raw.pop("id")
            batch = dataset.normalizer(aligned_random_crop(raw, config.data.crop_size, generator))
            output = forward_backward(model, batch, 1, torch.device("cpu"), bf16=False)
            guard.step(model, optimizer, None, output)
        rate = steps * BATCH / (time.perf_counter() - start)
    return rate


def torch_trainer(configs: dict[str, PretrainConfig]) -> dict[str, dict[str, float]]:
    """``samples_per_s`` and ``data_wait_s`` of the last epoch as each single-worker TorchTrainer reports them."""
    import ray

    from mpmae.runtime.instance import ensure_ray
    from mpmae.train.trainer import pretrain

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ensure_ray(object_store_memory=400 * 1024**2, log_to_driver=False)
    try:
        out = {}
        for label, config in configs.items():
            metrics = pretrain(config).metrics
            out[label] = {key: float(metrics[key]) for key in ("samples_per_s", "data_wait_s", "feed_startup_s")}
        return out
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="100 tiles, 2 epochs: a smoke run")
    args = parser.parse_args()
    tiles, epochs = (100, 2) if args.quick else (args.tiles, args.epochs)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_mmearth(Path(tmp) / "data", tiles=tiles, seed=0)
        for format in ("parquet", "ffcv"):
            write_shards(data, Path(tmp) / format, format=format, tiles_per_shard=tiles, progress=False,
                         parallel=False)
        runs = Path(tmp) / "runs"
        base = _config(data, runs, epochs, "run.name=plain")
        plain = plain_loop(base, data)
        trainer = torch_trainer({
            "ray-data": _config(Path(tmp) / "parquet", runs, epochs, "data.format=parquet", "run.name=ray-data"),
            "ffcv": _config(Path(tmp) / "ffcv", runs, epochs, "data.format=ffcv", "run.name=ffcv"),
        })
    print(f"atto 56/8 all tasks, batch {BATCH}, {THREADS} threads, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}, {tiles} tiles, last of {epochs} epochs")
    print(f"{'plain in-process loop':<33}: {plain:7.2f} samples/s")
    for label, figures in trainer.items():
        print(f"{'TorchTrainer, 1 worker, ' + label:<33}: {figures['samples_per_s']:7.2f} samples/s, data wait "
              f"{figures['data_wait_s']:5.2f} s/epoch, overhead {100 * (1 - figures['samples_per_s'] / plain):5.1f} %")
    rows = int(0.8 * tiles) // BATCH * BATCH  # an epoch's samples (the train split, whole batches)
    steady = {k: rows / (rows / v["samples_per_s"] - v["feed_startup_s"]) for k, v in trainer.items()}
    for label, rate in steady.items():
        print(f"  {label} without the feed's per-epoch start-up ({trainer[label]['feed_startup_s']:.2f} s): "
              f"{rate:.2f} samples/s, overhead {100 * (1 - rate / plain):.1f} %")
    print(json.dumps({
        "samples_per_s": {"plain": plain, **{k: v["samples_per_s"] for k, v in trainer.items()}},
        "overhead": {k: 1 - v["samples_per_s"] / plain for k, v in trainer.items()},
        "steady_overhead": {k: 1 - rate / plain for k, rate in steady.items()},
        "feed_startup_s": {k: v["feed_startup_s"] for k, v in trainer.items()},
        "data_wait_s": {k: v["data_wait_s"] for k, v in trainer.items()},
        "batch": BATCH, "threads": THREADS, "tiles": tiles, "epochs": epochs, "quick": args.quick,
        "load_1min": os.getloadavg()[0],
    }))


if __name__ == "__main__":
    main()
