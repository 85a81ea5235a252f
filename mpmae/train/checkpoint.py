"""Training checkpoints (atomic, complete state) and the encoder export with its model card.

A checkpoint folder holds ``state.pt``: model, optimizer, scheduler and scaler state, epoch, global
step, the run's config, the data position, the normalisation statistics the model was trained with and
the per-epoch metrics so far (so that loss curves need nothing but the checkpoint).
The export is what fine-tuning needs and nothing else: ``encoder.pt`` (a plain tensor state dict,
loadable by ``torch.load`` without mpmae) and ``model_card.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpmae.atomic import atomic_write, atomic_write_json

STATE_FILE = "state.pt"
ENCODER_FILE = "encoder.pt"
CARD_FILE = "model_card.json"


@dataclass
class TrainState:
    """Where training stands: the next epoch to run and the optimizer steps taken so far."""

    epoch: int = 0
    step: int = 0
    skipped_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save``, atomically: a crash never leaves a half-written checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config: Mapping[str, Any],
    norm_stats: Mapping[str, Any],
    lr: float,
) -> Path:
    """Write the complete training state into ``folder`` (created if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"kind": "warmup_cosine", "last_lr": lr},
        "scaler": None,  # bf16 autocast needs no loss scaling
        "epoch": state.epoch,
        "step": state.step,
        "skipped_steps": state.skipped_steps,
        "history": list(state.history),
        "data_position": {"epoch": state.epoch, "batch": 0},
        "config": dict(config),
        "norm_stats": dict(norm_stats),
    }
    atomic_save(payload, folder / STATE_FILE)
    return folder / STATE_FILE


def resolve_checkpoint(path: Path | str) -> Path:
    """The ``state.pt`` of a checkpoint folder, or of the latest ``epoch-*`` checkpoint of a run folder."""
    path = Path(path)
    if path.is_dir() and not (path / STATE_FILE).exists():
        epochs = sorted(p for p in path.glob("epoch-*") if (p / STATE_FILE).is_file())
        if epochs:
            return epochs[-1] / STATE_FILE
    return path / STATE_FILE if path.is_dir() else path


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """The payload of a checkpoint (folder, ``state.pt`` or run folder), with a clear error otherwise."""
    path = Path(path)
    file = resolve_checkpoint(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"{path}: no {STATE_FILE} (expected an mpmae checkpoint folder or file, or a run folder)"
        )
    payload = torch.load(file, map_location="cpu", weights_only=False)
    missing = [k for k in ("model", "config", "epoch", "step") if k not in payload]
    if missing:
        raise ValueError(f"{file}: not an mpmae checkpoint (missing {missing})")
    return payload


def restore(payload: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None) -> TrainState:
    """Load model (strictly) and optimizer state; return where training stands."""
    model.load_state_dict(payload["model"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return TrainState(payload["epoch"], payload["step"], payload["skipped_steps"], payload["history"])


def export_encoder(checkpoint: Path | str, out: Path | str) -> Path:
    """Write the encoder's plain state dict and a JSON model card into ``out`` (refusing to overwrite)."""
    payload = load_checkpoint(checkpoint)
    out = Path(out)
    existing = [out / name for name in (ENCODER_FILE, CARD_FILE) if (out / name).exists()]
    if existing:
        raise FileExistsError(f"{existing[0]} already exists; choose another output folder")
    prefix = "encoder."
    encoder = {k[len(prefix):]: v.clone() for k, v in payload["model"].items() if k.startswith(prefix)}
    if not encoder:
        raise ValueError(f"{checkpoint}: the checkpoint's model holds no encoder weights")
    out.mkdir(parents=True, exist_ok=True)
    atomic_save(encoder, out / ENCODER_FILE)
    atomic_write_json(out / CARD_FILE, model_card(payload))
    return out


def model_card(payload: Mapping[str, Any]) -> dict[str, Any]:
    """What a fine-tuning run needs to rebuild and feed the encoder."""
    from mpmae.modalities import resolve_selection

    config = payload["config"]
    model, data = config["model"], config["data"]
    return {
        "format": "mpmae-encoder/1",
        "architecture": {
            "arch": model["arch"], "patch_size": model["patch_size"],
            "stem": model.get("stem", "modified"), "conventions": "default",
        },
        "input_size": data["crop_size"],
        "patch_size": model["patch_size"],
        "input_modality": "sentinel2",
        "bands": list(resolve_selection(model["targets"])["sentinel2"]),
        "normalisation": payload.get("norm_stats", {}),
        "pretext_tasks": list(resolve_selection(model["targets"])),
        "trained": {"epochs": payload["epoch"], "steps": payload["step"]},
        "run_config": config,
    }
