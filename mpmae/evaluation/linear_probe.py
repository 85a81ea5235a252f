"""Linear probing: frozen encoder, features computed once per split, a linear head trained on the cache.

The encoder runs in ``eval()`` mode under ``no_grad`` (no drop-path, unlike the reference, docs/method.md, D14),
once per split; every epoch of the head then costs a few matrix products, so a Tune trial can afford a
full probe. Features are the classifier's input (last stage, global average pool, LayerNorm without
affine: the reference's untrained final norm), not further standardised, so a trained head plugs into
`mpmae.models.Classifier` as is (linear-probe-then-fine-tune).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import cast

import torch
from torch import Tensor, nn

from mpmae.evaluation.split_metrics import make_metric
from mpmae.evaluation.task_losses import make_loss
from mpmae.models.classifier import new_head
from mpmae.models.convnextv2 import ConvNeXtV2
from mpmae.optim import WarmupCosine, apply_lr, param_groups
from mpmae.tasks import TaskKind

#: A split: all images and labels as two tensors, or any iterable of (images, labels) batches.
Split = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]


def batches(split: Split, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The (images, labels) batches of a split, slicing a tensor pair into ``batch_size`` chunks."""
    if isinstance(split, tuple) and len(split) == 2 and isinstance(split[0], Tensor) and isinstance(split[1], Tensor):
        x, y = split[0], split[1]
        yield from zip(x.split(batch_size), y.split(batch_size), strict=True)
    else:
        yield from cast(Iterable[tuple[Tensor, Tensor]], split)


@torch.no_grad()
def extract_features(
    encoder: ConvNeXtV2, split: Split, *, batch_size: int = 256, device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor]:
    """Features (N, dims[-1]) and labels of a split on ``device``; the encoder's mode is restored after."""
    was_training = encoder.training
    encoder.to(device).eval()
    try:
        pairs = [(encoder.forward_head(encoder.forward_features(x.to(device)), pre_logits=True), y.to(device))
                 for x, y in batches(split, batch_size)]
    finally:
        encoder.train(was_training)
    features, labels = zip(*pairs, strict=True)
    return torch.cat(features), torch.cat(labels)


def train_head(
    features: Tensor,
    labels: Tensor,
    *,
    kind: TaskKind,
    num_classes: int,
    epochs: int = 100,
    lr: float = 8e-4,
    min_lr: float = 1e-6,
    weight_decay: float = 0.3,
    batch_size: int = 1024,
    smoothing: float = 0.2,
    seed: int = 0,
) -> nn.Linear:
    """A linear head trained on cached features: AdamW (bias not decayed), per-step cosine, seeded shuffles."""
    generator = torch.Generator().manual_seed(seed)
    head = new_head(features.shape[1], num_classes, generator).to(features.device)
    optimizer = torch.optim.AdamW(param_groups(head, weight_decay), lr=lr)
    schedule = WarmupCosine(lr, min_lr, epochs * math.ceil(len(features) / batch_size))
    loss_fn = make_loss(kind, smoothing)
    step = 0
    for _ in range(epochs):
        for index in torch.randperm(len(features), generator=generator).to(features.device).split(batch_size):
            apply_lr(optimizer, schedule(step))
            loss = loss_fn(head(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return head


@torch.no_grad()
def score_head(head: nn.Module, features: Tensor, labels: Tensor, *, kind: TaskKind, num_classes: int) -> float:
    """The task metric of a head over all cached features of a split."""
    metric = make_metric(kind, num_classes)
    metric.update(head(features), labels)
    return metric.compute()


def linear_probe(
    encoder: ConvNeXtV2,
    train: Split,
    val: Split,
    *,
    kind: TaskKind,
    num_classes: int,
    epochs: int = 100,
    lr: float = 8e-4,
    weight_decay: float = 0.3,
    batch_size: int = 1024,
    smoothing: float = 0.2,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> float:
    """Val metric (micro F1 or accuracy) of a linear head trained on the frozen encoder's train features.

    Defaults are the reference's atto probe recipe (lr 8e-4 at batch 1024, wd 0.3, smoothing
    0.2, 100 epochs). Segmentation is probed by the U-Net with a frozen encoder instead.
    """
    if kind == "segmentation":
        raise ValueError("linear_probe handles classification; probe segmentation with a frozen-encoder U-Net")
    train_x, train_y = extract_features(encoder, train, device=device)
    val_x, val_y = extract_features(encoder, val, device=device)
    head = train_head(train_x, train_y, kind=kind, num_classes=num_classes, epochs=epochs, lr=lr,
                      weight_decay=weight_decay, batch_size=batch_size, smoothing=smoothing, seed=seed)
    return score_head(head, val_x, val_y, kind=kind, num_classes=num_classes)
