"""One prepared check for a GPU machine (16 CPUs, one H100 or H200, no internet): at most 8 minutes, and the
last line printed is one JSON object of every figure.

(a) The model step as the pretraining worker takes it (bf16 autocast, channels-last convolutions, forward,
backward, fused AdamW) at batch 256, eager and under torch.compile, for atto at 56 px / patch 8 and tiny at
112 px / patch 16 with all 12 pretext tasks: samples/s, and peak GPU memory (``max_memory_allocated``).
(b) A one-node Ray Train run of ``configs/demo.yaml`` (one GPU worker) fed by Ray Data from Parquet shards of
a synthetic 64 px MMEarth folder: samples/s and data wait of its last epoch (the first pays compilation and
warm-up), the data wait's share of that epoch (goal < 5 %), the GPU utilisation that ``nvidia-smi`` shows
every 0.5 s while the run lasts, and what one MMEarth64 epoch (1.2 M tiles) takes at that rate (goal <= 5 min).

``--quick`` runs the same on the CPU in under 2 minutes (batch 4, 64 tiles, one epoch, fp32, no compile
unless ``--compile``; GPU fields null), so that CI keeps the script working. A part that fails leaves its
error in the JSON, the others still run, and the exit status is 1.

    .venv/bin/python bench/gpu.py [--quick] [--compile | --no-compile] [--tiles 6400] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from model_step import synthetic_batch  # bench/model_step.py: this script's folder is first on sys.path

from mpmae.config import ModelConfig, OptimConfig, PretrainConfig, load_config
from mpmae.models import MPMAE
from mpmae.optim import build_optimizer
from mpmae.runtime.run import channels_last, compiled
from mpmae.train.step import forward_backward

REPO = Path(__file__).resolve().parents[1]
MMEARTH64_TILES = 1.2e6
#: (arch, crop side, patch size) of the model-step measurements; the Ray run is demo.yaml's atto 56/8.
STEP_CONFIGS = (("atto", 56, 8), ("tiny", 112, 16))
GOALS = {"data_wait_share": 0.05, "mmearth64_epoch_min": 5.0}
START = time.perf_counter()


@dataclass(frozen=True)
class Plan:
    """What one invocation measures, and how hard."""

    device: str
    batch: int
    steps: int
    warmup: int
    compile_modes: tuple[bool, ...]
    tiles: int
    epochs: int
    cpus_per_worker: int
    bf16: bool
    object_store_mib: int
    #: Seconds after the start past which no part starts (the machine's time is limited); None: no limit.
    deadline_s: float | None
    quick: bool


def make_plan(args: argparse.Namespace) -> Plan:
    """The quick CPU smoke run, or the GPU measurement (which needs CUDA: without it, a clear error)."""
    if args.quick:
        return Plan("cpu", batch=4, steps=3, warmup=1, compile_modes=(False, True) if args.compile else (False,),
                    tiles=64, epochs=1, cpus_per_worker=1, bf16=False, object_store_mib=400, deadline_s=None,
                    quick=True)
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device; run with --quick for the CPU smoke run")
    return Plan("cuda", batch=args.batch, steps=args.steps, warmup=3,
                compile_modes=(False,) if args.compile is False else (False, True), tiles=args.tiles,
                epochs=args.epochs, cpus_per_worker=max(1, (os.cpu_count() or 2) // 2), bf16=True,
                object_store_mib=4096, deadline_s=args.deadline_s, quick=False)


def log(message: str) -> None:
    """A progress line with the time since start: should the machine's time run out, the tail says where."""
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


@dataclass
class Parts:
    """Runs the script's parts one by one, so that the JSON line always comes: a part that fails leaves its
    error and the others still run; a part not started ``deadline_s`` after the start is skipped."""

    deadline_s: float | None
    errors: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)

    def run(self, part: str, measure: Callable[[], Any]) -> Any:
        """``measure()``, or None when it failed or was skipped."""
        if self.deadline_s is not None and time.perf_counter() - START > self.deadline_s:
            self.skipped.append(part)
            log(f"{part} skipped: past the deadline of {self.deadline_s:g} s")
            return None
        try:
            return measure()
        except Exception as err:
            traceback.print_exc()
            self.errors[part] = f"{type(err).__name__}: {err}"[:500]
            log(f"{part} failed: {self.errors[part]}")
            return None


# -- (a) the model step ---------------------------------------------------------------------------------------


def model_step(arch: str, side: int, patch: int, compile_model: bool, plan: Plan) -> dict[str, Any]:
    """Samples/s of ``plan.steps`` timed steps after ``plan.warmup`` (compilation there), peak GPU memory."""
    device = torch.device(plan.device)
    torch._dynamo.reset()  # each configuration compiled for its own shapes, as a worker's model, and timed alone
    torch.manual_seed(0)
    model = compiled(channels_last(MPMAE(ModelConfig(arch=arch, patch_size=patch))), compile_model).to(device)
    model.train()
    optimizer = build_optimizer(model, OptimConfig())  # fused on CUDA, as in the worker
    batch = {k: v.to(device) for k, v in synthetic_batch(plan.batch, side).items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def steps(count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            output = forward_backward(model, batch, 1, device, plan.bf16)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(output.loss):  # also waits for the device
            raise RuntimeError(f"non-finite loss {float(output.loss)}")
        return time.perf_counter() - start

    warmup_s = steps(plan.warmup)
    elapsed = steps(plan.steps)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"samples_per_s": plan.batch * plan.steps / elapsed, "step_s": elapsed / plan.steps,
            "warmup_s": warmup_s, "peak_gpu_mib": peak}


def model_steps(plan: Plan, configs: Sequence[tuple[str, int, int]], parts: Parts) -> dict[str, dict[str, Any]]:
    """Each configuration, eager and (when planned) compiled; None where not run."""
    results: dict[str, dict[str, Any]] = {}
    for arch, side, patch in configs:
        key = f"{arch} {side}/{patch}"
        for compile_model in (False, True):
            mode = "compile" if compile_model else "eager"
            if compile_model not in plan.compile_modes:
                results.setdefault(key, {})[mode] = None
                continue
            measure = partial(model_step, arch, side, patch, compile_model, plan)
            result = parts.run(f"model_step {key} {mode}", measure)
            results.setdefault(key, {})[mode] = result
            if result is not None:
                peak = "" if result["peak_gpu_mib"] is None else f", peak GPU memory {result['peak_gpu_mib']:.0f} MiB"
                log(f"model step {key} {mode}: {result['samples_per_s']:.0f} samples/s, "
                    f"warm-up {result['warmup_s']:.1f} s{peak}")
            if plan.device == "cuda":
                torch.cuda.empty_cache()
    return results


# -- (b) the Ray Train run -------------------------------------------------------------------------------------


class GpuSampler:
    """``nvidia-smi``'s GPU utilisation every ``every_s`` seconds in a thread while the block runs."""

    def __init__(self, enabled: bool, every_s: float = 0.5) -> None:
        self.command = shutil.which("nvidia-smi") if enabled else None
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> GpuSampler:
        if self.command is not None:
            self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _poll(self) -> None:
        assert self.command is not None
        while not self._stop.wait(self.every_s):
            done = subprocess.run([self.command, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=10, check=False)
            if done.returncode == 0 and done.stdout.strip():
                self.samples.append(float(done.stdout.split()[0]))  # the first GPU: the only one here

    def summary(self) -> dict[str, float | int] | None:
        """Mean over the whole run and over its busy window (first to last sample above 0 %), max; None
        without nvidia-smi. The busy window leaves out Ray's start-up and the data writing before it."""
        if self.command is None or not self.samples:
            return None
        busy = [i for i, s in enumerate(self.samples) if s > 0]
        window = self.samples[busy[0]:busy[-1] + 1] if busy else [0.0]
        return {"mean": statistics.fmean(self.samples), "busy_mean": statistics.fmean(window),
                "max": max(self.samples), "samples": len(self.samples)}


def ray_run(plan: Plan, compile_model: bool, folder: Path) -> dict[str, Any]:
    """Write the data, start a local Ray instance of this process's own, pretrain, report the last epoch."""
    import ray

    from mpmae.data.shards import write_shards
    from mpmae.data.synth import write_synthetic_mmearth
    from mpmae.runtime.instance import ensure_ray
    from mpmae.train.trainer import describe_data, pretrain

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    data = write_synthetic_mmearth(folder / "mmearth", tiles=plan.tiles, size=64, seed=0)
    log(f"synthetic MMEarth folder of {plan.tiles} tiles written")
    ensure_ray(object_store_memory=plan.object_store_mib * 2**20, log_to_driver=False)
    try:
        write_shards(data, folder / "parquet", "parquet", tiles_per_shard=max(16, plan.tiles // 32), progress=False)
        log("Parquet shards written")
        config = load_config(PretrainConfig, REPO / "configs" / "demo.yaml", [
            f"data.path={folder / 'parquet'}", "data.format=parquet", f"run.storage_path={folder / 'runs'}",
            "run.name=gpu-bench", f"run.use_gpu={str(plan.device == 'cuda').lower()}", "run.num_workers=1",
            f"run.cpus_per_worker={plan.cpus_per_worker}", f"run.bf16={str(plan.bf16).lower()}",
            f"run.compile={str(compile_model).lower()}", f"optim.batch_size={plan.batch}",
            f"optim.epochs={plan.epochs}", "optim.warmup_epochs=0",
        ])
        rows = describe_data(config).rows
        with GpuSampler(enabled=plan.device == "cuda") as sampler:
            start = time.perf_counter()
            metrics = pretrain(config).metrics or {}
            wall = time.perf_counter() - start
    finally:
        ray.shutdown()
    samples_per_s, data_wait = float(metrics["samples_per_s"]), float(metrics["data_wait_s"])
    epoch_s = rows // plan.batch * plan.batch / samples_per_s  # the worker drops the last partial batch
    return {"samples_per_s": samples_per_s, "data_wait_s": data_wait, "epoch_s": epoch_s,
            "data_wait_share": data_wait / epoch_s, "gpu_util_pct": sampler.summary(), "rows": rows,
            "epochs": plan.epochs, "compile": compile_model, "run_wall_s": wall}


def epoch_minutes(samples_per_s: float) -> float:
    """Minutes of one MMEarth64 epoch at ``samples_per_s``."""
    return MMEARTH64_TILES / samples_per_s / 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the CPU smoke run (CI)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile too (default: on GPU yes, with --quick no)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20, help="timed model steps per configuration")
    parser.add_argument("--tiles", type=int, default=6400, help="synthetic tiles of the Ray run (80 %% train)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--deadline-s", type=float, default=300.0,
                        help="start no part later than this (the last, tiny compiled, can take 2-3 minutes)")
    args = parser.parse_args()
    plan = make_plan(args)
    log(f"torch {torch.__version__}, {plan.device}"
        f"{f' ({torch.cuda.get_device_name()})' if plan.device == 'cuda' else ''}, {os.cpu_count()} CPUs: {plan}")
    parts = Parts(plan.deadline_s)
    # atto, then the Ray run (atto too: Inductor's cache has its kernels by then), then the larger tiny last
    steps = model_steps(plan, STEP_CONFIGS[:1], parts)
    with tempfile.TemporaryDirectory(prefix="mpmae-gpu-bench-") as tmp:
        run = parts.run("ray_run", partial(ray_run, plan, True in plan.compile_modes, Path(tmp)))
    if run is not None:
        log(f"Ray run: {run['samples_per_s']:.0f} samples/s, data wait {run['data_wait_s']:.2f} s "
            f"({100 * run['data_wait_share']:.1f} % of {run['epoch_s']:.1f} s), GPU {run['gpu_util_pct']}")
    steps.update(model_steps(plan, STEP_CONFIGS[1:], parts))
    atto = steps.get("atto 56/8", {})
    projected = {f"model_step_{mode}": None if r is None else epoch_minutes(r["samples_per_s"])
                 for mode, r in atto.items()}
    projected["ray_run"] = None if run is None else epoch_minutes(run["samples_per_s"])
    print(json.dumps({
        "device": plan.device, "gpu": torch.cuda.get_device_name() if plan.device == "cuda" else None,
        "torch": torch.__version__, "plan": asdict(plan), "model_step": steps, "ray_run": run,
        "mmearth64_epoch_min": projected,
        "goals_met": None if run is None else {
            "data_wait_share": run["data_wait_share"] < GOALS["data_wait_share"],
            "mmearth64_epoch_min": epoch_minutes(run["samples_per_s"]) <= GOALS["mmearth64_epoch_min"]},
        "dev_shm_gib": shutil.disk_usage("/dev/shm").total / 2**30 if os.path.isdir("/dev/shm") else None,
        "errors": parts.errors, "skipped": parts.skipped, "wall_s": time.perf_counter() - START,
    }))
    sys.exit(1 if parts.errors else 0)


if __name__ == "__main__":
    main()
