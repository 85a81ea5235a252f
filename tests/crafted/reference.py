"""Checkpoint files of the original MMEarth project (vishalned/MMEarth-train, ``helpers.save_model``): its
layout written from state dicts the tests hold, its dense encoder weights in MinkowskiEngine form, and one
that runs a command when unpickled."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from tests.crafted.checkpoints import RunsCommand, touch_command


def to_minkowski(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The inverse of the dense remap (docs/method.md, Pretraining recipe): what a MinkowskiEngine checkpoint stores."""
    parts = key.split(".")
    module, name = ".".join(parts[:-1]), parts[-1]
    depthwise = module.endswith(("dwconv", "stem.0"))
    is_conv = module.endswith(("dwconv", "stem.0", "initial_conv.0", "stem_orig.0")) or (
        "downsample_layers" in module and parts[-2] == "1"
    )
    if is_conv and name == "weight":
        k = value.shape[-1]
        kernel = value.transpose(2, 3).reshape(value.shape[0], value.shape[1], k * k).permute(2, 1, 0)
        return f"{module}.kernel", kernel[:, 0] if depthwise else kernel
    if is_conv and name == "bias":
        return key, value.reshape(1, -1)
    if name in ("gamma", "beta"):
        return key, value.reshape(1, -1)
    is_ln = parts[-2] in ("norm",) or module.endswith(("initial_conv.1", "stem.1", "stem_orig.1")) or (
        "downsample_layers" in module and parts[-2] == "0"
    )
    if is_ln:
        return f"{module}.ln.{name}", value
    if parts[-2] in ("pwconv1", "pwconv2"):
        return f"{module}.linear.{name}", value
    raise AssertionError(key)


def minkowski_encoder(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A dense reference state dict with its ``encoder.*`` weights as a sparse (MinkowskiEngine) FCMAE stores them."""
    out = {}
    for key, value in state.items():
        if key.startswith(("encoder.norm.", "encoder.head.")):
            continue  # the sparse encoder has no final norm or head
        if key.startswith("encoder."):
            k, v = to_minkowski(key.removeprefix("encoder."), value)
            out["encoder." + k] = v
        else:
            out[key] = value
    return out


def reference_checkpoint(path: Path, state: dict[str, torch.Tensor], args: argparse.Namespace | None,
                         **extra: Any) -> Path:
    """``path``: what the reference's ``save_model`` writes at the end of a 200-epoch run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "params": [0, 1]}]},
               "epoch": 199, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
               "args": args, **extra}
    torch.save(payload, path)
    return path


def code_running_reference_checkpoint(path: Path, state: dict[str, torch.Tensor], marker: Path) -> Path:
    """A reference checkpoint whose ``args`` hold an object that runs a command (creating ``marker``) when loaded."""
    return reference_checkpoint(path, state, argparse.Namespace(model="convnextv2_atto",
                                                                hook=RunsCommand(touch_command(marker))))
