"""The per-worker pretraining loop that Ray Train runs on every rank.

Each epoch: draw batches (Ray Data shard or this rank's FFCV shards), crop all pixel modalities at one
offset per sample, step the model with the recipe's per-iteration learning rate, then report metrics on
every rank and a checkpoint from rank 0. With a probe configured, reports and checkpoints come every
``probe.every_epochs`` epochs, each with rank 0's probe result. With ``run.checkpoint_every_steps`` a
checkpoint also comes inside an epoch, with the batches done; at a preemption notice the workers
checkpoint at once and wait for Ray Train's restart. Resuming picks up at the checkpoint's epoch and batch,
with the global step count continuing. Step times and epoch values also go to Ray's application metrics
(:mod:`mpmae.telemetry`), which the Grafana dashboards show; rank 0 logs each epoch's metrics to the
experiment tracker (:mod:`mpmae.tracking`), stepped by the global optimizer step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mpmae.checkpoint import (
    TrainState,
    checkpoint_name,
    find_checkpoint,
    restore,
    save_checkpoint,
)
from mpmae.config import PretrainConfig, from_dict
from mpmae.data.loaders import FFCVBatches, aligned_random_crop, ffcv_loader, iter_raw_batches
from mpmae.data.normalize import Normalizer
from mpmae.evaluation.probe_task import SCORE, SCORE_HIGH, SCORE_LOW, ProbeResult, load_probe_task
from mpmae.modalities import resolve_selection
from mpmae.models.mpmae import MPMAE
from mpmae.optim import WarmupCosine, apply_lr, build_optimizer, keep_fused
from mpmae.runtime.run import channels_last, compiled, quiet_report_logs, report_with_checkpoint
from mpmae.telemetry import RunMetrics
from mpmae.tracking import Tracker
from mpmae.train.step import LossMeter, StepGuard, forward_backward, unwrap

log = logging.getLogger(__name__)

#: How long past a preemption notice's deadline the workers wait for Ray's restart before training on.
PREEMPTION_PATIENCE_S = 60.0


def _ffcv_feed(config: PretrainConfig, rank: int, world: int, per_worker: int,
               device: torch.device) -> tuple[FFCVBatches, int]:
    """This rank's FFCV shards, built once a run (FFCV compiles a loader when it first runs), and the batches
    an epoch takes: the smallest count over ranks (DDP needs equal steps)."""
    from mpmae.data.shards import find_shards

    paths = find_shards(config.data.path, config.data.split, "ffcv")[rank::world]
    targets = list(resolve_selection(config.model.targets))
    loader = ffcv_loader(paths, per_worker, shuffle=True, seed=config.run.seed + 1000 * rank, drop_last=True,
                         num_workers=config.data.loader_workers, modalities=targets)
    return loader, _all_reduce_min(len(loader), device)


def _batches(config: PretrainConfig, ffcv: tuple[FFCVBatches, int] | None, rank: int, world: int, epoch: int,
             per_worker: int, rows: int, device: torch.device) -> tuple[Iterator[dict], int]:
    """This rank's raw batches for one epoch and how many to take, equal on every rank.

    Ray Data's streaming split hands each rank the same number of rows; its batches arrive on ``device``.
    """
    if ffcv is not None:
        loader, count = ffcv
        loader.set_epoch(epoch)
        return iter(loader), count
    shard = ray.train.get_dataset_shard("train")
    buffer = config.data.shuffle_buffer_batches * per_worker or None
    batches = iter_raw_batches(shard, per_worker, drop_last=True, local_shuffle_buffer_size=buffer,
                               local_shuffle_seed=config.run.seed + 1000 * epoch + rank,
                               prefetch_batches=config.data.prefetch_batches, device=device)
    return iter(batches), rows // world // per_worker


def _all_reduce_min(value: int, device: torch.device) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def _prepare(raw: Mapping[str, Any], crop: int, generator: torch.Generator, device: torch.device,
             normalizer: Normalizer) -> dict:
    """A raw batch on ``device``, cropped, then normalised there (the GPU's work when there is one)."""
    tensors = {k: v.to(device, non_blocking=True) for k, v in raw.items() if k != "id"}
    return normalizer(aligned_random_crop(tensors, crop, generator=generator))


def _all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average metrics over ranks so that the report describes the whole step, not rank 0's part."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / dist.get_world_size()).tolist(), strict=True))


def _broadcast(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Rank 0's values on every rank, so that all ranks report the same probe result."""
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.broadcast(tensor, src=0)
    return dict(zip(values, tensor.tolist(), strict=True))


@dataclass
class _Checkpointer:
    """Writes this run's checkpoints (epoch ends, every ``run.checkpoint_every_steps`` steps, a preemption
    notice) and keeps the step loop's time spent in them (``checkpoint_stall_s``)."""

    core: torch.nn.Module
    optimizer: torch.optim.Optimizer
    state: TrainState
    loop_config: dict[str, Any]
    rank: int
    telemetry: RunMetrics
    upload_async: bool
    stall_s: float = 0.0
    count: int = 0

    def save(self, metrics: dict[str, Any], lr: float, reason: str) -> None:
        state, plan = self.state, self.loop_config.get("resume")
        metrics = {**metrics, "checkpoint_stall_s": self.stall_s, "checkpoints": self.count}

        def write(folder: Path) -> Path:
            return save_checkpoint(folder, self.core, self.optimizer, state, self.loop_config["config"],
                                   self.loop_config["norm_stats"], lr, reason)

        inside = state.batch > 0  # a checkpoint taken inside an epoch
        name = checkpoint_name(state.epoch, plan["taken"] if plan else (), state.step if inside else None)
        start = time.perf_counter()
        # A checkpoint at a preemption notice must be in storage before the node goes: uploaded at once.
        report_with_checkpoint(metrics, self.rank, write, name, self.upload_async and reason != "preemption")
        stalled = time.perf_counter() - start
        self.stall_s += stalled
        self.count += 1
        self.telemetry.checkpoint(stalled)


def _wait_for_reclaim(info: Any, rank: int) -> None:
    """After the just-in-time checkpoint, step no more: every step from here would be lost with the node.

    Ray Train restarts the run from that checkpoint once the node is gone or the notice's deadline has
    passed; should neither happen (a drain called off), training goes on a minute after the deadline.
    """
    deadline = (info.deadline_ms / 1000 if info.deadline_ms else time.time()) + PREEMPTION_PATIENCE_S
    if rank == 0:
        log.warning("preemption notice for nodes %s (ranks %s): checkpointed at the notice, waiting for the restart",
                    info.preempted_node_ids, info.preempted_ranks)
    while time.time() < deadline:
        time.sleep(1.0)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point; ``loop_config`` holds the PretrainConfig dict, rows and norm stats."""
    quiet_report_logs()
    config = from_dict(PretrainConfig, loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.run.seed + rank)
    torch.set_num_threads(max(1, int(config.run.cpus_per_worker)))  # intra-op threads = the CPUs Ray reserved
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(compiled(channels_last(MPMAE(config.model)), config.run.compile),
                                          parallel_strategy_kwargs={"gradient_as_bucket_view": True})
    core = unwrap(model)
    optimizer = build_optimizer(core, config.optim)
    schedule = WarmupCosine.for_pretraining(config.optim)
    state = TrainState()
    plan = loop_config.get("resume")
    source = resume_source(ray.train.get_checkpoint(), plan)
    if source is not None:
        with source.as_directory() as folder:
            file, payload = find_checkpoint(folder)
            state = restore(payload, core, optimizer, f"{source.path}/{file.name}")
        keep_fused(optimizer)
        state.resumes.append({"step": state.step, "epoch": state.epoch, "batch": state.batch, "workers": world})
        log.info("rank %d resumed at epoch %d, batch %d, step %d", rank, state.epoch, state.batch, state.step)

    probe = load_probe_task(config) if config.probe.task is not None and rank == 0 else None
    # The global batch is the config's whatever the worker count (elastic runs resize): each worker takes
    # its share, so steps per epoch, the lr schedule and a checkpoint's batch position mean the same.
    per_worker = config.optim.batch_size // world
    if rank == 0:
        log.info("%d workers x %d samples x %d accumulation = %d samples per step", world, per_worker,
                 config.optim.accum_steps, per_worker * world * config.optim.accum_steps)
    guard = StepGuard(config.run.max_nonfinite_steps)
    guard.skipped = state.skipped_steps
    telemetry = RunMetrics(loop_config["run_name"], rank, skipped_steps=state.skipped_steps)
    # rank 0 alone tracks, once per epoch: nothing reaches the tracking server from inside the step loop
    tracker = Tracker(loop_config.get("tracking")) if rank == 0 else None
    checkpoints = _Checkpointer(core, optimizer, state, loop_config, rank, telemetry, config.run.async_upload)
    generator = torch.Generator().manual_seed(config.run.seed + rank)
    normalizer = Normalizer.from_dict(loop_config["normalizer"])
    ffcv = _ffcv_feed(config, rank, world, per_worker, device) if config.data.format == "ffcv" else None
    accum, every = config.optim.accum_steps, config.run.checkpoint_every_steps
    for epoch in range(state.epoch, config.optim.epochs):
        model.train()
        meter, data_wait, samples, lr, first_batch_at = LossMeter(), 0.0, 0, 0.0, None
        start = time.perf_counter()
        batches, iters_per_epoch = _batches(config, ffcv, rank, world, epoch, per_worker, loop_config["rows"], device)
        for _ in range(min(state.batch, iters_per_epoch)):  # what the checkpoint had done of this epoch
            next(batches)
        for it in range(state.batch, iters_per_epoch):
            tick = time.perf_counter()
            raw = next(batches)
            first_batch_at = first_batch_at or time.perf_counter()
            batch = _prepare(raw, config.data.crop_size, generator, device, normalizer)
            waited = time.perf_counter() - tick
            data_wait += waited
            if it % accum == 0:
                lr = schedule(epoch + it / iters_per_epoch)
                apply_lr(optimizer, lr)
            output = forward_backward(model, batch, accum, device, config.run.bf16)
            meter.add(output)
            samples += per_worker
            state.batch = it + 1
            telemetry.step(time.perf_counter() - tick, waited)
            if (it + 1) % accum:
                continue
            guard.step(model, optimizer, config.optim.clip_grad, output)
            state.step += 1
            if rank == 0 and state.step % config.run.log_every_steps == 0:
                log.info("epoch %d step %d lr %.3g", epoch, state.step, lr)
            if state.batch == iters_per_epoch:
                continue  # the epoch's own checkpoint follows
            position = {"epoch": epoch, "epochs_done": state.epoch, "step": state.step, "lr": lr}
            if state.step % config.run.preemption_check_steps == 0 and \
                    (notice := ray.train.get_preemption_info()) is not None:
                checkpoints.save(position, lr, "preemption")
                _wait_for_reclaim(notice, rank)
            elif every is not None and state.step % every == 0:
                checkpoints.save(position, lr, "steps")
        if config.data.format != "ffcv":
            for _ in batches:  # finish the streaming split's epoch (drop_last leaves at most a partial batch)
                pass
        elapsed = time.perf_counter() - start
        state.epoch, state.batch, state.skipped_steps = epoch + 1, 0, guard.skipped
        metrics = _all_reduce_mean({
            **meter.means(),
            **{f"log_var/{t}": float(v) for t, v in core.log_vars.items()},
            **{f"weight/{t}": float(torch.exp(-v)) for t, v in core.log_vars.items()},
            "samples_per_s": samples / elapsed * world,
            "data_wait_s": data_wait,
            # the feed's start-up each epoch (Ray Data starts its read tasks): a fixed cost, large on tiny epochs
            "feed_startup_s": (first_batch_at or start) - start,
        }, device)
        metrics.update(epoch=epoch, epochs_done=state.epoch, step=state.step, lr=lr, skipped_steps=guard.skipped,
                       workers=world)
        telemetry.epoch(metrics)
        # with a probe, reports (and checkpoints) come with its score only
        due = config.probe.task is None or config.probe.due(state.epoch, config.optim.epochs)
        if config.probe.task is not None and due:
            result = probe(core.encoder, device) if probe is not None else ProbeResult(0.0, 0.0, 0.0, 0.0)
            metrics.update(_broadcast(result.metrics(), device))
            telemetry.probe(metrics[SCORE])
        state.history.append(metrics)
        if tracker is not None:
            tracker.log_metrics(metrics, state.step)
        if not due:
            continue
        if rank == 0:
            log.info("epoch %d/%d step %d loss %.4f %.1f samples/s%s", epoch + 1, config.optim.epochs, state.step,
                     metrics.get("loss", float("nan")), metrics["samples_per_s"],
                     f" probe {metrics[SCORE]:.4f} [{metrics[SCORE_LOW]:.4f}, {metrics[SCORE_HIGH]:.4f}]"
                     if SCORE in metrics else "")
        checkpoints.save(metrics, lr, "epoch")
    if tracker is not None:
        tracker.close()


def resume_source(reported: ray.train.Checkpoint | None,
                  plan: Mapping[str, Any] | None) -> ray.train.Checkpoint | None:
    """The checkpoint to resume from: Ray's latest when this run wrote it (a restarted worker group), else
    the one the driver checked (:func:`mpmae.checkpoint.plan_resume`).

    A run started again gets Ray's latest from its record in storage, which may be the broken checkpoint
    the driver skipped; every folder already in storage when the driver looked is in ``plan["taken"]``.
    Without a plan (URI storage, no driver check) Ray's latest, as before.
    """
    if plan is None or (reported is not None and Path(reported.path).name not in plan["taken"]):
        return reported
    return ray.train.Checkpoint(plan["from"]) if plan["from"] else None


