"""Fine-tuning optimisation: layer-wise lr decay groups and the per-iteration warmup-cosine schedule.

Layer ids, "single" scheme of spec 5.3 with the mis-assignments of spec 7 item 21 fixed
(``L = sum(depths)``; atto: L = 12, ids 0..13):

- ``initial_conv``, ``stem``, ``stem_orig`` (the input end): id 0, the smallest scale ``ld^(L+1)``;
- ``stages.s.b``: ``sum(depths[:s]) + b + 1``, one id per block;
- ``downsample_layers.i``, which sits before stage ``i + 1``: the id of that stage's first block,
  ``sum(depths[:i + 1]) + 1`` (ConvNeXt's rule, where ``downsample_layers.i`` precedes stage ``i``);
- everything else (final norm, head, decoder): ``L + 1``, scale 1.

The lr of a group is the schedule's lr times ``lr_scale = ld^(L + 1 - id)``, min_lr included.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mpmae.train.recipe import no_weight_decay

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


def param_groups(
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
