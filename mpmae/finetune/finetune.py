"""Fine-tuning: one-epoch train and evaluate steps, and a local ``fit`` driver (models: `mpmae.models`).

`Finetuner` holds what a run needs between epochs (model, AdamW with layer-decay groups, epoch and
step counters) and exposes it as ``state_dict()`` for checkpoints. With ``freeze_epochs > 0`` the
encoder is frozen and kept in ``eval()`` mode for those first epochs (the U-Net's phase 1: decoder and
head only); then it is unfrozen and its layer-decay groups, with weight decay, join the optimizer
(phase 2; the reference adds it with weight decay 0 and no layer decay, docs/method.md, D15).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mpmae.config import FinetuneConfig
from mpmae.evaluation.split_metrics import Mean, make_metric
from mpmae.evaluation.task_losses import make_loss
from mpmae.models.classifier import Classifier
from mpmae.models.unet import UNet
from mpmae.optim import WarmupCosine, apply_lr, param_groups
from mpmae.tasks import TaskKind

Batches = Iterable[tuple[Tensor, Tensor]]


class Finetuner:
    """A model with an ``encoder`` attribute (`Classifier`, `mpmae.models.unet.UNet`) and its optimisation.

    ``wrap`` (e.g. Ray Train's ``prepare_model``) turns the model into what runs the batches; it is
    called again when the encoder unfreezes, because DDP fixes its set of trained parameters when built.
    ``self.model`` stays the unwrapped model: parameter names and ``state_dict`` keys carry no prefix.
    ``kind`` and ``num_classes`` are the task's; segmentation trains without label smoothing (the paper's
    U-Net runs), and ``config.frozen_epochs >= config.epochs`` probes an encoder (head or decoder only).
    """

    def __init__(
        self,
        model: Classifier | UNet,
        config: FinetuneConfig,
        kind: TaskKind,
        num_classes: int,
        steps_per_epoch: int,
        device: str | torch.device = "cpu",
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        ignore_index: int | None = None,
    ) -> None:
        if config.select not in ("last", "best_val"):
            raise ValueError(f"select must be 'last' or 'best_val', got {config.select!r}")
        self.model, self.config, self.device = model.to(device), config, torch.device(device)
        self.kind, self.num_classes, self.ignore_index = kind, num_classes, ignore_index
        self.encoder_frozen = config.frozen_epochs > 0
        model.encoder.requires_grad_(not self.encoder_frozen)
        self.wrap = wrap or (lambda module: module)
        self.net = self.wrap(model)
        self.optimizer = torch.optim.AdamW(self._groups(), lr=config.lr, eps=1e-8)
        self.schedule = WarmupCosine(
            config.lr, config.min_lr, config.epochs * steps_per_epoch, config.warmup_epochs * steps_per_epoch
        )
        smoothing = config.smoothing if kind != "segmentation" else 0.0
        self.train_loss = make_loss(kind, smoothing, ignore_index)
        self.epoch = 0
        self.step = 0

    def _groups(self, within: nn.Module | None = None) -> list[dict[str, Any]]:
        """The model's layer-decay groups, of its trained parameters (``within``: of that submodule only)."""
        return param_groups(self.model, self.config.weight_decay, self.config.layer_decay, within=within)

    def unfreeze_encoder(self) -> None:
        """Phase 2: the encoder trains too, its layer-decay groups added to the optimizer."""
        self.model.encoder.requires_grad_(True)
        for group in self._groups(within=self.model.encoder):
            self.optimizer.add_param_group(group)
        self.encoder_frozen = False
        self.net = self.wrap(self.model)

    def train_epoch(self, batches: Batches) -> dict[str, float]:
        """One epoch of per-iteration lr steps; returns mean loss, running metric and the last lr."""
        if self.encoder_frozen and self.epoch >= self.config.frozen_epochs:
            self.unfreeze_encoder()
        self.net.train()
        if self.encoder_frozen:
            self.model.encoder.eval()
        loss_mean, metric = Mean(), make_metric(self.kind, self.num_classes, self.ignore_index)
        for x, y in batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            apply_lr(self.optimizer, self.schedule(self.step))
            logits = self.net(x)
            loss = self.train_loss(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            loss_mean.update(loss, len(x))
            metric.update(logits, y)
        self.epoch += 1
        loss_mean.sync()
        metric.sync()
        mean = loss_mean.compute()
        if not math.isfinite(mean):
            raise FloatingPointError(f"non-finite training loss {mean} in epoch {self.epoch - 1}")
        return {"loss": mean, "metric": metric.compute(), "lr": self.schedule(self.step - 1)}

    def evaluate(self, batches: Batches) -> dict[str, float]:
        return evaluate(self.net, batches, kind=self.kind, num_classes=self.num_classes,
                        ignore_index=self.ignore_index, device=self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "step": self.step, "encoder_frozen": self.encoder_frozen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume; a state saved in phase 2 unfreezes first, so that the optimizer groups match."""
        if self.encoder_frozen and not state["encoder_frozen"]:
            self.unfreeze_encoder()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = state["epoch"], state["step"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Batches,
    *,
    kind: TaskKind,
    num_classes: int,
    ignore_index: int | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Loss (no smoothing) and metric over a whole split, summed over data-parallel ranks."""
    model.eval()
    loss_fn = make_loss(kind, 0.0, ignore_index)
    loss_mean, metric = Mean(), make_metric(kind, num_classes, ignore_index)
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = model(x)
        loss_mean.update(loss_fn(logits, y), len(x))
        metric.update(logits, y)
    loss_mean.sync()
    metric.sync()
    return {"loss": loss_mean.compute(), "metric": metric.compute()}


@dataclass
class FitResult:
    """Per-epoch metrics and the epoch whose weights the model holds after `fit`."""

    history: list[dict[str, float]] = field(default_factory=list)
    selected_epoch: int = -1


def fit(finetuner: Finetuner, train: Batches, val: Batches) -> FitResult:
    """Train from ``finetuner.epoch`` to ``config.epochs``, evaluating on ``val`` after every epoch.

    The model ends with the weights the config's ``select`` rule picks: those of the last epoch, or of
    the first epoch with the best val metric. ``train``/``val`` must be re-iterable (e.g. DataLoaders).
    """
    result, best, best_state = FitResult(), float("-inf"), None
    while finetuner.epoch < finetuner.config.epochs:
        epoch = finetuner.epoch
        row = {f"train_{k}": v for k, v in finetuner.train_epoch(train).items()}
        row.update({f"val_{k}": v for k, v in finetuner.evaluate(val).items()}, epoch=epoch)
        result.history.append(row)
        if finetuner.config.select == "last":
            result.selected_epoch = epoch
        elif row["val_metric"] > best:
            best, result.selected_epoch = row["val_metric"], epoch
            best_state = copy.deepcopy(finetuner.model.state_dict())
    if best_state is not None:
        finetuner.model.load_state_dict(best_state)
    return result
