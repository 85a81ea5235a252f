"""Training throughput of one MPMAE step (forward, backward, AdamW), fp32, on the CPU.

Prints samples/s and peak resident memory for atto at 56 px / patch 8 and 112 px / patch 16 with all 12
pretext tasks, each configuration in a fresh process so that its peak RSS is its own. Samples/s comes from
the median and from the best step time, with the 1-minute load average before and after: other processes
share the cores, and a 2-thread OpenMP step slows down badly when one of its threads is descheduled.

    .venv/bin/python bench/model_step.py [--batch 16] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import time

import torch

from mpmae.config import ModelConfig
from mpmae.modalities import MODALITIES, resolve_selection
from mpmae.models import MPMAE

CONFIGS = ((56, 8), (112, 16))


def synthetic_batch(n: int, side: int, selection: str = "all_mod") -> dict[str, torch.Tensor]:
    """Random tensors in the data layer's batch format (dtypes, shapes, -1 ignore labels)."""
    batch = {}
    for name, bands in resolve_selection(selection).items():
        m = MODALITIES[name]
        if m.encoding == "one_hot":
            batch[name] = torch.eye(m.num_classes, dtype=torch.long)[torch.randint(m.num_classes, (n,))]
        elif m.encoding == "label_map":
            batch[name] = torch.randint(-1, m.num_classes, (n, 1, side, side))
        elif m.level == "pixel":
            batch[name] = torch.randn(n, len(bands), side, side)
        else:
            batch[name] = torch.randn(n, len(bands))
    return batch


def measure(side: int, patch: int, args: argparse.Namespace) -> dict[str, float]:
    """Median and best time of ``args.steps`` timed steps after ``args.warmup`` untimed ones, peak RSS."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MPMAE(ModelConfig(arch=args.arch, patch_size=patch, decoder=args.decoder))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    batch = synthetic_batch(args.batch, side)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        out = model(batch)
        out.loss.backward()
        opt.step()
        return out.loss

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"median_s": statistics.median(times), "best_s": min(times), "peak_rss_mib": peak_mib}


def _child(side: int, patch: int, args: argparse.Namespace, queue: mp.Queue) -> None:
    queue.put(measure(side, patch, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="atto")
    parser.add_argument("--decoder", default="shared", choices=["shared", "per_task"])
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, arch {args.arch}, "
          f"decoder {args.decoder}, channels_last {args.channels_last}, all_mod (12 tasks), fp32, CPU")
    for side, patch in CONFIGS:
        load_before = os.getloadavg()[0]
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(side, patch, args, queue))
        proc.start()
        result = queue.get()
        proc.join()
        print(f"{side:>3} px / patch {patch:>2}: {args.batch / result['median_s']:6.2f} samples/s median "
              f"({result['median_s']:.2f} s/step), {args.batch / result['best_s']:6.2f} best, "
              f"peak RSS {result['peak_rss_mib']:.0f} MiB, load {load_before:.2f} -> {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
