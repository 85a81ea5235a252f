"""One cell of a suite, in this process: an encoder trained and scored on one task, partition, mode and seed.

It runs the evaluation code the single-run commands run: a classification task's linear probe caches the
frozen encoder's features once (``extract_features``, ``train_head``, ``score_head``); everything else trains
through the fine-tuner (a classifier, or for segmentation the U-Net, its encoder frozen throughout in
``linear_probe`` mode), scored on val after every epoch, the last epoch's weights tested. GEO-Bench splits
come from the cell's partition, read with the encoder's bands. ``land_cover`` trains on the first half of the
MMEarth folder's ``val`` tiles, validates on the second half and tests on ``test``, whose tiles the encoder
never saw in pretraining. The test metric comes with a bootstrap interval over the test samples, from each
sample's metric counts: with few seeds, the seeds' interval alone would ignore the test set's sampling error.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mpmae.benchmark.plan import METRIC_NAMES, Cell, finetune_config, recipe, task_kind
from mpmae.config import BenchmarkConfig, to_dict
from mpmae.data.downstream import land_cover_task
from mpmae.data.geobench import GeoBenchDataset
from mpmae.evaluation.linear_probe import extract_features, score_head, train_head
from mpmae.evaluation.split_metrics import SplitMetric, make_metric
from mpmae.evaluation.statistics import bootstrap_metric
from mpmae.export import encoder_from
from mpmae.finetune.finetune import Finetuner, fit
from mpmae.finetune.run import build_finetune_model
from mpmae.models import Classifier, UNet
from mpmae.tasks import LAND_COVER, TaskKind

SPLITS = ("train", "val", "test")
#: A cell's train, val and test sets.
Splits = dict[str, GeoBenchDataset | TensorDataset]


def run_cell(config: BenchmarkConfig, cell: Cell) -> dict[str, Any]:
    """The cell's row of ``results.csv``: val and test metric, the test metric's bootstrap interval, sizes,
    epochs and seconds. Seeded by the cell's seed (a random encoder's weights, the head, the shuffles)."""
    start = time.perf_counter()
    device = _device(config)
    torch.manual_seed(cell.seed)
    kind, classes = task_kind(cell.task)
    metric = make_metric(kind, classes)
    if kind != "segmentation" and cell.mode == "linear_probe":
        val_metric, test_counts, sizes = _probe(config, cell, kind, classes, device)
    else:
        val_metric, test_counts, sizes = _train(config, cell, kind, classes, device)
    score = functools.partial(metric_of, metric)
    low, high = bootstrap_metric(test_counts, score, **to_dict(config.bootstrap))
    return {"encoder": cell.encoder, "task": cell.task, "mode": cell.mode, "partition": cell.partition,
            "seed": cell.seed, "metric": METRIC_NAMES[kind], "val_metric": val_metric,
            "test_metric": score(test_counts.sum(axis=0)), "test_ci_low": low, "test_ci_high": high,
            **{f"{split}_samples": size for split, size in sizes.items()}, "epochs": recipe(config, cell)["epochs"],
            "seconds": round(time.perf_counter() - start, 3), "device": str(device)}


def _device(config: BenchmarkConfig) -> torch.device:
    if not config.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu: this cell's worker sees no CUDA device")
    return torch.device("cuda")


def load_splits(config: BenchmarkConfig, cell: Cell, bands: Sequence[str]) -> Splits:
    """The cell's train, val and test sets, with the encoder's input ``bands``."""
    if cell.task != LAND_COVER:
        return {split: GeoBenchDataset(config.geobench_dir, cell.task, split, partition=cell.partition,
                                       bands=list(bands)) for split in SPLITS}
    if config.data is None:
        raise ValueError(f"data: {LAND_COVER} needs an MMEarth folder")
    x, y = land_cover_task(config.data, "val", config.crop_size, tuple(bands))
    if len(y) < 2:
        raise ValueError(f"data: {config.data}: {len(y)} val tile(s) with a land-cover class; {LAND_COVER} needs "
                         "two or more (the first half trains, the second validates)")
    half = (len(y) + 1) // 2
    return {"train": TensorDataset(x[:half], y[:half]), "val": TensorDataset(x[half:], y[half:]),
            "test": TensorDataset(*land_cover_task(config.data, "test", config.crop_size, tuple(bands)))}


def _loader(config: BenchmarkConfig, dataset: Dataset, batch_size: int, shuffle_seed: int | None = None) -> DataLoader:
    """Batches of a split (shuffled by ``shuffle_seed`` if given), read by the cell's CPUs beyond its first."""
    generator = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=generator is not None, generator=generator,
                      num_workers=max(0, int(config.cpus_per_cell) - 1))


def _sizes(splits: Splits) -> dict[str, int]:
    return {split: len(dataset) for split, dataset in splits.items()}


def _probe(config: BenchmarkConfig, cell: Cell, kind: TaskKind, classes: int,
           device: torch.device) -> tuple[float, np.ndarray, dict[str, int]]:
    """A linear probe on cached features: val metric, per-sample test counts, split sizes."""
    recipe = config.linear_probe
    encoder, card = encoder_from(config.encoders[cell.encoder], 0.0, config.arch, config.patch_size)
    splits = load_splits(config, cell, card["bands"])
    features = {split: extract_features(encoder, _loader(config, data, recipe.batch_size), device=device)
                for split, data in splits.items()}
    head = train_head(*features["train"], kind=kind, num_classes=classes, epochs=config.epochs, lr=recipe.lr,
                      min_lr=recipe.min_lr, weight_decay=recipe.weight_decay, batch_size=recipe.batch_size,
                      smoothing=recipe.smoothing, seed=cell.seed)
    val_metric = score_head(head, *features["val"], kind=kind, num_classes=classes)
    with torch.no_grad():
        counts = sample_counts(make_metric(kind, classes), head(features["test"][0]), features["test"][1])
    return val_metric, counts, _sizes(splits)


def _train(config: BenchmarkConfig, cell: Cell, kind: TaskKind, classes: int,
           device: torch.device) -> tuple[float, np.ndarray, dict[str, int]]:
    """Fine-tuning or a U-Net through the fine-tuner: last epoch's val metric, per-sample test counts, sizes."""
    fine = finetune_config(config, cell)
    model: Classifier | UNet
    if cell.task == LAND_COVER:
        encoder, card = encoder_from(fine.encoder, fine.drop_path, fine.arch, fine.patch_size)
        model = Classifier(encoder, classes)
    else:
        model, card = build_finetune_model(fine)
    splits = load_splits(config, cell, card["bands"])
    train = _loader(config, splits["train"], fine.batch_size, cell.seed)
    finetuner = Finetuner(model, fine, kind, classes, len(train), device)
    history = fit(finetuner, train, _loader(config, splits["val"], fine.batch_size)).history
    test = _loader(config, splits["test"], fine.batch_size)
    return history[-1]["val_metric"], model_counts(finetuner.model, test, make_metric(kind, classes), device), \
        _sizes(splits)


@torch.no_grad()
def model_counts(model: nn.Module, batches: DataLoader, metric: SplitMetric, device: torch.device) -> np.ndarray:
    """Each test sample's metric counts under ``model`` in eval mode (see :func:`sample_counts`)."""
    model.eval()
    return np.concatenate([sample_counts(metric, model(x.to(device)), y.to(device)) for x, y in batches])


def sample_counts(metric: SplitMetric, logits: Tensor, target: Tensor) -> np.ndarray:
    """Each sample's metric counts, (N, *counts shape): their sum is what the metric accumulates over the
    split, so a resample of the samples is scored exactly as a split is."""
    rows = [metric.batch_counts(logits[i:i + 1].detach(), target[i:i + 1]).double() for i in range(len(logits))]
    return torch.stack(rows).cpu().numpy()


def metric_of(metric: SplitMetric, counts: np.ndarray) -> float:
    """The metric of summed counts (``metric``'s accumulated counts are replaced)."""
    metric.counts = torch.from_numpy(np.asarray(counts, dtype=np.float64))
    return metric.compute()
