"""GEO-Bench evaluation runs on Ray Train, and the quick in-process probe table (`mpmae probe`).

A run trains on the task's train split (each rank a `DistributedSampler` share), evaluates the val
split after every epoch (each rank a disjoint share, counts summed over ranks), reports every epoch, with
a checkpoint from rank 0 every ``checkpoint_every`` epochs, and finally scores the test split with the
weights the config's ``select`` rule picks. The results JSON and the printed table come from the driver.
With tracking on, rank 0 logs each epoch's train and val metrics, the driver the test metrics and
``results.json``. The encoder and the run storage may be URIs (``s3://...``): Ray Train writes the
checkpoints there, the driver ``results.json``.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

import mpmae.storage as storage
from mpmae.checkpoint import atomic_save, check_keys, load_file, mark_complete
from mpmae.config import FinetuneConfig, check_store, from_dict, to_dict
from mpmae.data.geobench import GeoBenchDataset
from mpmae.export import encoder_from
from mpmae.finetune.finetune import Finetuner, evaluate
from mpmae.models import Classifier, UNet
from mpmae.runtime.run import channels_last, quiet_report_logs, report_with_checkpoint
from mpmae.tasks import get_task
from mpmae.tracking import Tracker, open_run

STATE_FILE = "finetune.pt"
STATE_KEYS = ("finetuner", "history", "best", "config")
RESULTS_FILE = "results.json"


def build_finetune_model(config: FinetuneConfig) -> tuple[Classifier | UNet, dict[str, Any]]:
    """Classifier (or U-Net for segmentation) on the configured encoder, and the encoder's model card."""
    task = get_task(config.task)
    encoder, card = encoder_from(config.encoder, config.drop_path, config.arch, config.patch_size)
    model = UNet(encoder, task.num_classes) if task.kind == "segmentation" else Classifier(encoder, task.num_classes)
    return model, card


def _loader(dataset: GeoBenchDataset, batch_size: int, rank: int, world: int, train: bool, seed: int) -> DataLoader:
    if train:
        sampler: DistributedSampler[int] = DistributedSampler(dataset, world, rank, shuffle=True, seed=seed)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    return DataLoader(Subset(dataset, range(rank, len(dataset), world)), batch_size=batch_size)


def finetune_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train entry point of an evaluation run."""
    quiet_report_logs()
    config = from_dict(FinetuneConfig, loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(config.run.seed + rank)
    device = ray.train.torch.get_device()
    model, card = build_finetune_model(config)
    model = channels_last(model)  # DDP's buckets match its gradients
    splits = {s: GeoBenchDataset(config.geobench_dir, config.task, s, partition=config.partition, bands=card["bands"])
              for s in ("train", "val", "test")}
    per_worker = config.batch_size // world
    train = _loader(splits["train"], per_worker, rank, world, True, config.run.seed)
    evals = {s: _loader(splits[s], per_worker, rank, world, False, 0) for s in ("val", "test")}
    task = get_task(config.task)
    finetuner = Finetuner(model, config, task.kind, task.num_classes, len(train), device,
                          wrap=ray.train.torch.prepare_model)
    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"metric": float("-inf"), "epoch": -1, "model": None}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(Path(folder))
        finetuner.load_state_dict(state["finetuner"])
        history, best = state["history"], state["best"]
    fine = finetuner.config
    tracker = Tracker(loop_config.get("tracking")) if rank == 0 else None  # at epoch ends only
    while finetuner.epoch < fine.epochs:
        assert isinstance(train.sampler, DistributedSampler)
        train.sampler.set_epoch(finetuner.epoch)
        row = {f"train_{k}": v for k, v in finetuner.train_epoch(train).items()}
        row.update({f"val_{k}": v for k, v in _evaluate(finetuner, evals["val"]).items()}, epoch=finetuner.epoch - 1)
        history.append(row)
        if tracker is not None:
            tracker.log_metrics(row, row["epoch"] + 1)
        if fine.select == "best_val" and row["val_metric"] > best["metric"]:
            best = {"metric": row["val_metric"], "epoch": row["epoch"],
                    "model": copy.deepcopy(finetuner.model.state_dict())}
        if finetuner.epoch % config.checkpoint_every:
            ray.train.report(row)  # metrics only: a checkpoint every epoch of a long probe is gigabytes
            continue
        _report(row, rank, {"finetuner": finetuner.state_dict(), "history": history, "best": best,
                            "config": loop_config["config"]}, upload_async=config.run.async_upload)
    selected = fine.epochs - 1
    if fine.select == "best_val":
        finetuner.model.load_state_dict(best["model"])
        selected = best["epoch"]
    test = _evaluate(finetuner, evals["test"])
    final = {**history[-1], "test_loss": test["loss"], "test_metric": test["metric"], "selected_epoch": selected,
             "history": history}
    _report(final, rank, {"finetuner": finetuner.state_dict(), "history": history, "best": best,
                          "config": loop_config["config"]}, "final", config.run.async_upload)
    if tracker is not None:
        tracker.close()


def _evaluate(finetuner: Finetuner, loader: DataLoader) -> dict[str, float]:
    return evaluate(finetuner.model, loader, kind=finetuner.kind, num_classes=finetuner.num_classes,
                    ignore_index=finetuner.ignore_index, device=finetuner.device)


def _report(metrics: dict[str, Any], rank: int, state: dict[str, Any], name: str | None = None,
            upload_async: bool = False) -> None:
    """Report an epoch; rank 0 attaches the state (the last one, ``final``, holds the selected weights);
    with ``upload_async`` Ray copies it into storage in the background."""
    report_with_checkpoint(metrics, rank, lambda folder: save_state(folder, state),
                           name or f"epoch-{metrics['epoch'] + 1:04d}", upload_async)


def save_state(folder: Path, state: dict[str, Any]) -> Path:
    """An evaluation run's checkpoint: tensors and plain values only (``best`` included), then its marker."""
    atomic_save(state, folder / STATE_FILE)
    mark_complete(folder, [STATE_FILE], epoch=state["finetuner"]["epoch"])
    return folder / STATE_FILE


def load_state(folder: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_state`, loaded without running code from it."""
    return check_keys(load_file(folder / STATE_FILE), folder / STATE_FILE, STATE_KEYS, STATE_KEYS)


def default_run_name(config: FinetuneConfig) -> str:
    source = "random" if config.encoder is None else storage.name_of(config.encoder)
    return f"{'lp' if config.mode == 'linear_probe' else 'ft'}-{config.task}-{source}"


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Run an evaluation on Ray Train and write ``results.json`` into the run folder, a path or a URI
    (never overwritten)."""
    from mpmae.runtime.instance import check_resources, ensure_ray
    from mpmae.runtime.run import fit, train_run_config

    name = config.run.name or default_run_name(config)
    check_store(config.run.storage_path, "run.storage_path")  # a missing bucket: one line, before Ray
    if config.encoder is not None:  # the workers download it
        check_store(config.encoder, "encoder")
    results_path = storage.join(config.run.storage, name, RESULTS_FILE)
    if storage.exists(results_path):
        raise FileExistsError(f"{results_path} already exists; choose another run.name")
    GeoBenchDataset(config.geobench_dir, config.task, "train", partition=config.partition)  # fail early
    spec = open_run(config.tracking, storage.join(config.run.storage, name), name, to_dict(config),
                    tags={"mpmae.kind": config.mode, "mpmae.task": config.task})
    ensure_ray()
    check_resources(config.run, {})  # GEO-Bench loads in the workers
    trainer = ray.train.torch.TorchTrainer(
        finetune_loop,
        train_loop_config={"config": to_dict(config), "tracking": spec},
        scaling_config=ray.train.ScalingConfig(num_workers=config.run.num_workers, use_gpu=config.run.use_gpu,
                                               resources_per_worker={"CPU": config.run.cpus_per_worker}),
        run_config=train_run_config(config.run, name),
    )
    tracker = Tracker(spec, tensorboard=False)
    try:
        metrics = fit(trainer).metrics or {}
    except BaseException as err:
        tracker.finish("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    results = {"task": config.task, "mode": config.mode, "encoder": config.encoder or "random",
               "partition": config.partition, "select": config.select, **metrics}
    text = json.dumps(results, indent=2, default=float)
    # never overwritten: a run that wrote its results meanwhile is refused, naming the file
    storage.write_bytes(results_path, text.encode())
    _track_results(tracker, results, text, config.epochs)
    return results


def _track_results(tracker: Tracker, results: dict[str, Any], text: str, epochs: int) -> None:
    """The selected weights' test metrics at the last epoch (rank 0 logged every epoch's val metrics),
    ``results.json`` attached; the run ended."""
    final = {k: v for k, v in results.items() if k.startswith("test_") or k == "selected_epoch"}
    tracker.log_metrics(final, epochs)
    with tempfile.TemporaryDirectory(prefix="mpmae-results-") as tmp:
        local = Path(tmp) / RESULTS_FILE
        local.write_text(text)
        tracker.log_artifacts([local])
    tracker.finish()


