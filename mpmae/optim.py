"""The optimisation recipe (docs/method.md): AdamW parameter groups, one warmup-cosine lr schedule, one lr setter.

Which parameters skip weight decay and which layer each belongs to is declared by the model, as in timm:
``model.no_weight_decay()`` names the exempt parameters beyond the 1-D ones (norms, biases), and
``model.layer_id(name)`` gives a parameter's layer-decay id. On a ConvNeXt V2 encoder id 0 is the stem,
then every block has its own id, a downsampling layer taking the id of the block after it, and the final
norm and head (or anything outside the encoder: a classifier's head, the U-Net decoder) take the top id
``sum(depths) + 1``; atto's ids run 0..13. A layer's lr is scaled by ``layer_decay ** (top - id)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpmae.config import OptimConfig


def _exempt_names(model: nn.Module) -> set[str]:
    declared = getattr(model, "no_weight_decay", None)
    return set(declared()) if callable(declared) else set()


def param_groups(
    model: nn.Module, weight_decay: float, layer_decay: float | None = None, *, within: nn.Module | None = None
) -> list[dict[str, Any]]:
    """AdamW groups over the parameters of ``model`` that require grad (``within``: only those of a submodule).

    Without ``layer_decay``: two groups, [decayed, exempt] (pretraining). With it: one group per
    (layer id, decayed), sorted, each with ``lr_scale`` and ``layer_id`` (fine-tuning). Exempt: 1-D
    parameters and what ``model.no_weight_decay()`` names. Names are ``model``'s, so the layer ids are
    those of ``model.layer_id`` even for a submodule's parameters.
    """
    exempt_names = _exempt_names(model)
    named = list(model.named_parameters())
    kept = None if within is None else {id(p) for p in within.parameters()}
    trained = [(n, p) for n, p in named if p.requires_grad and (kept is None or id(p) in kept)]

    def decayed(name: str, param: nn.Parameter) -> bool:
        return param.ndim > 1 and name not in exempt_names

    if layer_decay is None:
        decay = [p for n, p in trained if decayed(n, p)]
        exempt = [p for n, p in trained if not decayed(n, p)]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]
    layer_id = getattr(model, "layer_id", None)
    if not callable(layer_id):
        raise TypeError(f"layer decay needs the model's layer ids: {type(model).__name__} has no layer_id(name)")
    top = max(layer_id(n) for n, _ in named)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in trained:
        lid, decay_it = layer_id(name), decayed(name, param)
        group = groups.setdefault((lid, decay_it), {
            "params": [], "weight_decay": weight_decay if decay_it else 0.0,
            "lr_scale": layer_decay ** (top - lid), "layer_id": lid,
        })
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def fused_adamw_ok(params: Iterable[torch.Tensor]) -> bool:
    """Whether AdamW may take its fused path: floating-point parameters, all on CUDA.

    There one kernel updates every parameter, where the default (foreach) path launches several per
    parameter group. On the CPU the default path is kept, so CPU runs step exactly as before.
    """
    params = list(params)
    return bool(params) and all(p.device.type == "cuda" and p.dtype.is_floating_point for p in params)


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the two pretraining :func:`param_groups` at the recipe's peak lr (the schedule sets it every
    step); fused when the model's parameters are on CUDA (:func:`fused_adamw_ok`), so call it after moving them."""
    groups = param_groups(model, optim.weight_decay)
    fused = fused_adamw_ok(p for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, fused=True if fused else None)


def keep_fused(optimizer: torch.optim.Optimizer) -> None:
    """Choose the fused path again for the parameters' device after ``load_state_dict``, which brings back
    the ``fused`` setting of the run that saved the state (a CPU run's checkpoint resumed on a GPU)."""
    for group in optimizer.param_groups:
        group["fused"] = True if fused_adamw_ok(group["params"]) else None


@dataclass(frozen=True)
class WarmupCosine:
    """lr at ``step``: linear warmup from 0, then half-cosine from ``lr`` to ``min_lr`` at ``total_steps``.

    The step unit is the caller's: iterations (fine-tuning, the probe) or fractional epochs (pretraining).
    """

    lr: float
    min_lr: float
    total_steps: float
    warmup_steps: float = 0

    @classmethod
    def for_pretraining(cls, optim: OptimConfig) -> WarmupCosine:
        """The pretraining recipe's schedule, stepped in fractional epochs."""
        return cls(optim.lr, optim.min_lr, optim.epochs, optim.warmup_epochs)

    def __call__(self, step: float) -> float:
        if step < self.warmup_steps:
            return self.lr * step / self.warmup_steps
        progress = min((step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to ``lr * lr_scale``; groups added later (U-Net phase 2) follow at once."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
