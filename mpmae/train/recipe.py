"""The optimisation recipe of spec 4: AdamW parameter groups and the per-iteration lr schedule."""

from __future__ import annotations

import math

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
