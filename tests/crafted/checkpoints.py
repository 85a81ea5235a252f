"""Hostile and broken checkpoint files: each function writes one into a folder a test gives it.

The hostile one is an ordinary ``torch.save`` of a dict holding an object whose ``__reduce__`` calls
``os.system``: unpickled with ``weights_only=False`` (as mpmae did), it runs a shell command that creates
``marker``. A test asserts the marker never appears. The broken ones are what a full disk, a wrong
argument or bit rot leave: a cut-short ``state.pt``, a text file, an HDF5 file, an export without its card.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
from pathlib import Path

import h5py
import numpy as np
import torch

from mpmae.config import DataConfig, PretrainConfig, to_dict
from mpmae.models.convnextv2 import ConvNeXtV2


class RunsCommand:
    """Unpickles as ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def touch_command(marker: Path) -> str:
    """The shell command the hostile files run: create ``marker``."""
    return f"touch {shlex.quote(str(marker))}"


def code_running_state(folder: Path, marker: Path, name: str = "state.pt") -> Path:
    """``folder/name``: a checkpoint-looking dict (every key mpmae checks) whose loading runs a command."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"model": {"encoder.w": torch.zeros(1)}, "config": {}, "epoch": 1, "step": 1,
               "history": [{"epoch": 0, "loss": RunsCommand(touch_command(marker))}]}
    torch.save(payload, folder / name)
    return folder / name


def code_running_export(folder: Path, marker: Path) -> Path:
    """An export folder with a valid model card whose ``encoder.pt`` runs a command when loaded."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_card.json").write_text(json.dumps(
        {"architecture": {"arch": "atto", "patch_size": 8, "stem": "modified"}, "bands": ["B2"] * 12}))
    torch.save({"stem.0.weight": RunsCommand(touch_command(marker))}, folder / "encoder.pt")
    return folder


@functools.cache
def _default_encoder() -> dict[str, torch.Tensor]:
    """The weights of the default config's encoder (atto, patch 8, 12 bands), under ``encoder.``."""
    return {f"encoder.{k}": v for k, v in ConvNeXtV2(12, "atto", 8, features_only=True).state_dict().items()}


def small_state(folder: Path, epoch: int = 1) -> Path:
    """A loadable ``state.pt`` with the keys mpmae checks and a default run config (the encoder's weights
    only: for readers' choices and exports, not for restoring)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = to_dict(PretrainConfig(data=DataConfig(path="unused")))
    payload = {"model": _default_encoder(), "config": config, "epoch": epoch, "step": 4 * epoch,
               "history": [{"epoch": e, "epochs_done": e + 1, "probe_score": 0.1 * e} for e in range(epoch)]}
    torch.save(payload, folder / "state.pt")
    return folder / "state.pt"


def truncated(file: Path, keep: float = 0.5) -> Path:
    """Cut ``file`` to ``keep`` of its bytes, as a write stopped by a full disk leaves it."""
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])
    return file


def mark_complete_as_written(folder: Path) -> Path:
    """The ``complete.json`` mpmae writes for ``folder/state.pt`` as it is now (cut it afterwards for a
    marker that records more bytes than arrived)."""
    marker = folder / "complete.json"
    size = (folder / "state.pt").stat().st_size
    marker.write_text(json.dumps({"format": "mpmae-checkpoint/1", "files": {"state.pt": size}}))
    return marker


def text_file(path: Path) -> Path:
    """A text file where a checkpoint was expected."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("epoch: 3\nloss: 0.25\n")
    return path


def h5_file(path: Path) -> Path:
    """An HDF5 file (an MMEarth data file, say) where a checkpoint was expected."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5["sentinel2"] = np.zeros((2, 3), dtype=np.float32)
    return path


def export_without_card(folder: Path) -> Path:
    """An export folder with a valid ``encoder.pt`` and no ``model_card.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ConvNeXtV2(12, "atto", 8, features_only=True).state_dict(), folder / "encoder.pt")
    return folder
