"""Training throughput of one MPMAE step (forward, backward, AdamW), fp32, on the CPU, eager and compiled.

Measures atto at 56 px / patch 8 and 112 px / patch 16 with all 12 pretext tasks, as the pretraining worker
steps it (channels-last convolutions, the recipe's AdamW groups, ``forward_backward``), each configuration
and mode in a fresh process so that its peak RSS is its own. Samples/s comes from the median and from the
best step time, with the 1-minute load average before and after: other processes share the cores, and a
2-thread OpenMP step slows down badly when one of its threads is descheduled.

``--compile`` adds the same step under ``torch.compile`` (``run.compile``); its first step, which traces and
builds the C++ kernels, is reported apart as ``compile_s``. That figure depends on Inductor's on-disk cache
(``TORCHINDUCTOR_CACHE_DIR``): the first run on a machine pays every kernel's build, later ones mostly load.
``--quick`` takes batch 4 and a few steps, a smoke run. The last line is one JSON object of every figure.

    .venv/bin/python bench/model_step.py [--compile] [--quick] [--batch 16] [--steps 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from typing import Any

import torch

from mpmae.config import ModelConfig, OptimConfig
from mpmae.modalities import MODALITIES, resolve_selection
from mpmae.models import MPMAE
from mpmae.optim import build_optimizer
from mpmae.runtime.run import channels_last, compiled
from mpmae.train.step import forward_backward

CONFIGS = ((56, 8), (112, 16))
QUICK = {"batch": 4, "steps": 3, "warmup": 1}


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


def measure(side: int, patch: int, compile_model: bool, args: argparse.Namespace) -> dict[str, float]:
    """First-step, median and best time of ``args.steps`` timed steps after ``args.warmup`` untimed ones; peak RSS."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MPMAE(ModelConfig(arch=args.arch, patch_size=patch, decoder=args.decoder))
    if args.channels_last:
        model = channels_last(model)
    model = compiled(model, compile_model)
    model.train()
    optimizer = build_optimizer(model, OptimConfig())
    batch = synthetic_batch(args.batch, side)
    cpu = torch.device("cpu")

    def step() -> torch.Tensor:
        output = forward_backward(model, batch, 1, cpu, bf16=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return output.loss.detach()

    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss}")
    timed = times[args.warmup:]
    return {"first_s": times[0], "median_s": statistics.median(timed), "best_s": min(timed),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(side: int, patch: int, compile_model: bool, args: argparse.Namespace, queue: mp.Queue) -> None:
    queue.put(measure(side, patch, compile_model, args))


def in_fresh_process(side: int, patch: int, compile_model: bool, args: argparse.Namespace) -> dict[str, float]:
    """:func:`measure` in a spawned process: its peak RSS and Inductor's in-memory caches are its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(side, patch, compile_model, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def summary(results: dict[str, dict[str, dict[str, float]]], args: argparse.Namespace) -> dict[str, Any]:
    """The JSON line: per configuration and mode (None where not run), plus the run's settings."""
    modes = ("eager", "compile")

    def table(value: Any) -> dict[str, dict[str, float | None]]:
        return {cfg: {m: (value(r[m]) if m in r else None) for m in modes} for cfg, r in results.items()}

    return {
        "samples_per_s": table(lambda r: args.batch / r["median_s"]),
        "step_s": table(lambda r: r["median_s"]),
        "compile_s": {cfg: (r["compile"]["first_s"] - r["compile"]["median_s"] if "compile" in r else None)
                      for cfg, r in results.items()},
        "peak_rss_mib": table(lambda r: r["peak_rss_mib"]),
        "batch": args.batch, "threads": args.threads, "steps": args.steps, "arch": args.arch,
        "quick": args.quick, "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="atto")
    parser.add_argument("--decoder", default="shared", choices=["shared", "per_task"])
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true", help="also measure the step under torch.compile")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: {QUICK}")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    modes = (False, True) if args.compile else (False,)
    print(f"torch {torch.__version__}, threads {args.threads}, batch {args.batch}, arch {args.arch}, "
          f"decoder {args.decoder}, channels_last {args.channels_last}, all_mod (12 tasks), fp32, CPU")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for side, patch in CONFIGS:
        for compile_model in modes:
            load_before = os.getloadavg()[0]
            result = in_fresh_process(side, patch, compile_model, args)
            mode = "compile" if compile_model else "eager"
            results.setdefault(f"{side}/{patch}", {})[mode] = result
            built = f", first step {result['first_s']:.1f} s" if compile_model else ""
            print(f"{side:>3} px / patch {patch:>2} {mode:<7}: {args.batch / result['median_s']:6.2f} samples/s "
                  f"median ({result['median_s']:.2f} s/step), {args.batch / result['best_s']:6.2f} best, "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB{built}, "
                  f"load {load_before:.2f} -> {os.getloadavg()[0]:.2f}")
    print(json.dumps(summary(results, args)))


if __name__ == "__main__":
    main()
