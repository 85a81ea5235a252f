"""One training iteration, shared by Ray Train workers, the Tune probe and the benchmarks.

Host syncs are kept to one per optimizer step (the gradient norm decides whether the step is finite);
per-task losses are accumulated on the device and read once per report.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import Tensor, nn

from mpmae.models.mpmae import MPMAE, MPMAEOutput


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had non-finite gradients."""


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU when asked; full precision elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class LossMeter:
    """Sums of the total and per-task losses on the device, read once per report."""

    total: Tensor | None = None
    tasks: dict[str, Tensor] = field(default_factory=dict)
    count: int = 0

    def add(self, output: MPMAEOutput) -> None:
        loss = output.loss.detach().float()
        self.total = loss if self.total is None else self.total + loss
        for name, value in output.task_losses.items():
            value = value.detach().float()
            self.tasks[name] = self.tasks[name] + value if name in self.tasks else value
        self.count += 1

    def means(self) -> dict[str, float]:
        """Mean losses since the last reset (one host sync)."""
        if self.total is None:
            return {}
        names = list(self.tasks)
        values = (torch.stack([self.total, *self.tasks.values()]) / self.count).tolist()
        return {"loss": values[0], **{f"loss/{n}": v for n, v in zip(names, values[1:], strict=True)}}


def forward_backward(model: nn.Module, batch: Mapping[str, Tensor], accum_steps: int,
                     device: torch.device, bf16: bool) -> MPMAEOutput:
    """Forward under autocast and backward of ``loss / accum_steps``; the gradients accumulate."""
    with autocast(device, bf16):
        output: MPMAEOutput = model(batch)
    (output.loss / accum_steps).backward()
    return output


class StepGuard:
    """Skips optimizer steps whose gradients are not finite and stops after too many in a row."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.skipped = 0

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer, clip_grad: float | None,
             last_output: MPMAEOutput) -> bool:
        """Clip, check and apply the accumulated gradients; True when the step was taken."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else float("inf"))
        finite = bool(torch.isfinite(norm))
        if finite:
            optimizer.step()
            self.consecutive = 0
        else:
            self.skipped += 1
            self.consecutive += 1
            if self.consecutive > self.max_consecutive:
                raise NonFiniteLossError(
                    f"{self.consecutive} optimizer steps in a row had non-finite gradients; "
                    f"non-finite task losses in the last batch: {non_finite_tasks(last_output) or 'none'}"
                )
        optimizer.zero_grad(set_to_none=True)
        return finite


def non_finite_tasks(output: MPMAEOutput) -> list[str]:
    """Names of the tasks whose loss is NaN or infinite."""
    names = list(output.task_losses)
    flags = torch.isfinite(torch.stack([output.task_losses[n].detach().float() for n in names])).tolist()
    return [n for n, ok in zip(names, flags, strict=True) if not ok]


def unwrap(model: nn.Module) -> MPMAE:
    """The MPMAE inside a DistributedDataParallel wrapper (or the model itself)."""
    return cast(MPMAE, getattr(model, "module", model))
