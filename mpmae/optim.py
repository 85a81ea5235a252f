"""The optimisation recipe of spec 4: AdamW parameter groups and the per-iteration lr schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mpmae.config import OptimConfig


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norm parameters, biases, 1-D parameters, GRN gamma/beta and the mask token are not decayed.

    The reference decays GRN gamma/beta and the mask token during pretraining but not during
    fine-tuning (spec 7, item 17); we treat them as the norm and embedding parameters they are, always.
    """
    return param.ndim <= 1 or name.endswith(".bias") or ".grn." in name or name.endswith("mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights and everything :func:`no_weight_decay` exempts."""
    decay, exempt = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (exempt if no_weight_decay(name, param) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` at the recipe's peak lr (the schedule sets it every step)."""
    return torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=optim.betas)


def learning_rate(epoch: float, optim: OptimConfig) -> float:
    """lr at fractional ``epoch``: linear warmup to ``optim.lr``, then half-cosine to ``optim.min_lr``."""
    if epoch < optim.warmup_epochs:
        return optim.lr * epoch / optim.warmup_epochs
    span = max(optim.epochs - optim.warmup_epochs, 1e-12)
    progress = min((epoch - optim.warmup_epochs) / span, 1.0)
    return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


INPUT_END = ("initial_conv", "stem", "stem_orig")


def layer_id(name: str, depths: Sequence[int], encoder_prefix: str = "encoder.") -> int:
    """The layer-decay id of a parameter; names outside ``encoder_prefix`` are head/decoder (top id)."""
    top = sum(depths) + 1
    if not name.startswith(encoder_prefix):
        return top
    parts = name[len(encoder_prefix):].split(".")
    if parts[0] in INPUT_END:
        return 0
    if parts[0] == "stages":
        stage, block = int(parts[1]), int(parts[2])
        return sum(depths[:stage]) + block + 1
    if parts[0] == "downsample_layers":
        return sum(depths[: int(parts[1]) + 1]) + 1
    return top


def layer_decay_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    depths: Sequence[int],
    *,
    weight_decay: float,
    layer_decay: float,
    encoder_prefix: str = "encoder.",
) -> list[dict]:
    """AdamW groups, one per (layer id, decayed or not), each with ``lr_scale`` and ``layer_id``.

    Norm parameters, biases, other 1-D parameters and GRN gamma/beta get no weight decay.
    Parameters that do not require grad are left out.
    """
    top = sum(depths) + 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named_parameters:
        if not param.requires_grad:
            continue
        lid = layer_id(name, depths, encoder_prefix)
        decayed = not no_weight_decay(name, param)
        group = groups.setdefault((lid, decayed), {
            "params": [], "weight_decay": weight_decay if decayed else 0.0,
            "lr_scale": layer_decay ** (top - lid), "layer_id": lid,
        })
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


@dataclass(frozen=True)
class WarmupCosine:
    """Per-iteration lr: linear warmup from 0, then half-cosine from ``lr`` to ``min_lr`` at ``total_steps``."""

    lr: float
    min_lr: float
    total_steps: int
    warmup_steps: int = 0

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * lr_scale``; groups added later (U-Net phase 2) follow at once."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
