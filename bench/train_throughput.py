"""Ray's overhead on training: the same model and step in a plain loop vs a one-worker TorchTrainer.

Both sides run atto at 56 px / patch 8 with all 12 tasks, batch 16, 2 torch threads, on the same
synthetic folder, and time their second epoch (the first pays start-up and warm-up). The plain loop reads
with ``MMEarthDataset.read_batch``; the TorchTrainer runs twice: fed by Ray Data over the folder (the
default) and by FFCV shards, which separates Ray Train's own overhead from the data pipeline's.

    .venv/bin/python bench/train_throughput.py [--tiles 400] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mpmae.config import PretrainConfig, load_config
from mpmae.data.loaders import aligned_random_crop, to_batch
from mpmae.data.mmearth import MMEarthDataset
from mpmae.data.shards import write_shards
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.models import MPMAE
from mpmae.optim import build_optimizer
from mpmae.train.step import StepGuard, forward_backward

BATCH = 16
THREADS = 2


def _config(data: Path, storage: Path, epochs: int, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, Path(__file__).resolve().parents[1] / "configs" / "demo.yaml", [
        f"data.path={data}", f"run.storage_path={storage}", f"optim.batch_size={BATCH}",
        f"optim.epochs={epochs}", "run.num_workers=1", f"run.cpus_per_worker={THREADS}", *overrides,
    ])


def plain_loop(config: PretrainConfig) -> float:
    """Samples/s of the last epoch of an in-process loop over read_batch."""
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    dataset = MMEarthDataset(config.data.path, "train", config.model.targets)
    model = MPMAE(config.model)
    optimizer = build_optimizer(model, config.optim)
    guard = StepGuard(config.run.max_nonfinite_steps)
    generator = torch.Generator().manual_seed(0)
    rate = 0.0
    for _ in range(config.optim.epochs):
        order = np.random.permutation(len(dataset))
        start = time.perf_counter()
        steps = len(order) // BATCH
        for step in range(steps):
            batch = to_batch(dataset.read_batch(order[step * BATCH:(step + 1) * BATCH]))
            batch = aligned_random_crop({k: v for k, v in batch.items() if k != "id"}, 56, generator)
            output = forward_backward(model, batch, 1, torch.device("cpu"), bf16=False)
            guard.step(model, optimizer, None, output)
        rate = steps * BATCH / (time.perf_counter() - start)
    return rate


def torch_trainer(*configs: PretrainConfig) -> list[tuple[float, float]]:
    """(samples/s, data-wait seconds) of the last epoch as each single-worker TorchTrainer reports it."""
    import ray

    from mpmae.runtime.instance import ensure_ray
    from mpmae.train.trainer import pretrain

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ensure_ray(object_store_memory=400 * 1024**2, log_to_driver=False)
    try:
        metrics = [pretrain(config).metrics for config in configs]
        return [(float(m["samples_per_s"]), float(m["data_wait_s"])) for m in metrics]
    finally:
        ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiles", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic_mmearth(Path(tmp) / "data", tiles=args.tiles, seed=0)
        write_shards(data, Path(tmp) / "ffcv", format="ffcv", tiles_per_shard=args.tiles, progress=False)
        runs = Path(tmp) / "runs"
        config = _config(data, runs, args.epochs, "run.name=ray-data")
        plain = plain_loop(config)
        rates = torch_trainer(config, _config(Path(tmp) / "ffcv", runs, args.epochs, "data.format=ffcv",
                                              "run.name=ffcv"))
    print(f"atto 56/8 all tasks, batch {BATCH}, {THREADS} threads, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"plain in-process loop (read_batch)   : {plain:7.2f} samples/s")
    for label, (rate, wait) in zip(("TorchTrainer, 1 worker, Ray Data", "TorchTrainer, 1 worker, FFCV"), rates,
                                   strict=True):
        print(f"{label:<37}: {rate:7.2f} samples/s, data wait {wait:5.1f} s/epoch, "
              f"overhead {100 * (1 - rate / plain):5.1f} %")


if __name__ == "__main__":
    main()
