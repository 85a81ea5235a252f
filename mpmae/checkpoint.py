"""Training checkpoints: atomic, complete state, safe to load, and the plan for resuming from them.

A checkpoint folder holds ``state.pt``: model, optimizer, scheduler and scaler state, epoch, global
step, the run's config, the data position, the normalisation statistics the model was trained with and
the per-epoch metrics so far (so that loss curves need nothing but the checkpoint), then ``complete.json``,
written last, with the size of every file: a folder whose copy into storage was cut short (a full disk)
is never taken for a checkpoint. The encoder export made from a checkpoint is :mod:`mpmae.export`'s.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so that no
code runs from a file planted in shared storage. Whatever is not a tensor (config, history, data position)
is a plain value; :func:`atomic_save` refuses anything else, so every checkpoint written loads that way.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import re
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mpmae.storage as storage
from mpmae.atomic import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
COMPLETE_FILE = "complete.json"
CHECKPOINT_FORMAT = "mpmae-checkpoint/1"
#: What ``state.pt`` must hold, and everything it may hold.
STATE_REQUIRED = ("model", "config", "epoch", "step")
STATE_KEYS = frozenset({*STATE_REQUIRED, "optimizer", "scheduler", "scaler", "skipped_steps", "history",
                        "data_position", "norm_stats", "resumes"})
#: A marker is a few hundred bytes; more is not one of ours.
_MARKER_MAX_BYTES = 64 * 1024
#: ``epoch-E`` after E whole epochs, ``epoch-E-step-S`` at step S inside the next one; ``.K``: a retaken name.
_CHECKPOINT_NAME = re.compile(r"epoch-(\d+)(?:-step-(\d+))?(?:\.(\d+))?")
#: Exact types (numpy's float64 is a float subclass, and weights_only refuses it).
_PLAIN = frozenset({str, int, float, bool, type(None), torch.Size, torch.dtype, torch.device})
_ZIP_MAGIC, _HDF5_MAGIC = b"PK\x03\x04", b"\x89HDF\r\n\x1a\n"


class CheckpointError(ValueError):
    """A checkpoint, state or encoder file that cannot be used; the message names the file and why."""


class StorageFullError(OSError):
    """No space left on device while writing ``filename`` (``errno.ENOSPC``; the CLI prints one line)."""


@dataclass
class TrainState:
    """Where training stands: the next epoch to run, the batches of it already done (a checkpoint taken
    inside an epoch), the optimizer steps taken so far."""

    epoch: int = 0
    step: int = 0
    skipped_steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    batch: int = 0
    #: Each time the run resumed: from which step, epoch and batch, with how many workers.
    resumes: list[dict[str, int]] = field(default_factory=list)


# -- writing ------------------------------------------------------------------------------------------------


@contextmanager
def reporting_full_disk(path: Path | str, doing: str) -> Iterator[None]:
    """Name ``path`` in a full disk's error (``ENOSPC`` while ``doing``): a write through a file object
    names no file, and a copy by Ray's pyarrow names none either."""
    try:
        yield
    except OSError as err:
        if err.errno != errno.ENOSPC or isinstance(err, StorageFullError):
            raise
        raise StorageFullError(errno.ENOSPC, f"No space left on device while {doing}", str(path)) from None


def check_plain(value: Any, where: str, allowed: Collection[type] = ()) -> None:
    """Refuse what ``torch.load(weights_only=True)`` would refuse, naming where it sits in ``where``;
    instances of ``allowed`` (data holders such as ``argparse.Namespace``) pass if their attributes do."""
    if type(value) in _PLAIN or isinstance(value, torch.Tensor):
        return
    if type(value) in allowed:
        if hasattr(value, "__dict__"):
            check_plain(vars(value), where, allowed)
    elif type(value) in (dict, OrderedDict):
        for key, item in value.items():
            if not isinstance(key, str | int):
                raise TypeError(f"{where}: key {key!r} is not a str or int")
            check_plain(item, f"{where}[{key!r}]", allowed)
    elif type(value) in (list, tuple):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]", allowed)
    else:
        raise TypeError(f"{where}: a {type(value).__name__} is neither a tensor nor a plain value "
                        "(a checkpoint must load with weights_only=True)")


def atomic_save(obj: Any, path: Path, allowed: Collection[type] = ()) -> None:
    """``torch.save``, atomically: a crash or a full disk never leaves a half-written file.

    Only tensors and plain values are accepted, and instances of ``allowed`` (which a reader then has to
    allow too, see :func:`load_file`). The file is written through a Python file object, so a full disk
    raises ``OSError(ENOSPC)`` (torch's own writer reports only "unexpected pos").
    """
    check_plain(obj, path.name, allowed)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)

    with reporting_full_disk(path, "writing it"):
        atomic_write(path, write)


def mark_complete(folder: Path, files: Sequence[str], **facts: Any) -> Path:
    """Write ``complete.json`` (last, so that its presence means the rest is whole): each file's size."""
    sizes = {name: (folder / name).stat().st_size for name in files}
    marker = folder / COMPLETE_FILE
    with reporting_full_disk(marker, "writing it"):
        atomic_write_json(marker, {"format": CHECKPOINT_FORMAT, **facts, "files": sizes})
    return marker


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config: Mapping[str, Any],
    norm_stats: Mapping[str, Any],
    lr: float,
    reason: str = "epoch",
) -> Path:
    """Write the complete training state into ``folder`` (created if needed), then its marker, which also
    says why the checkpoint was taken (``epoch``, ``steps`` or ``preemption``)."""
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
        "resumes": list(state.resumes),
        "data_position": {"epoch": state.epoch, "batch": state.batch},
        "config": dict(config),
        "norm_stats": dict(norm_stats),
    }
    atomic_save(payload, folder / STATE_FILE)
    mark_complete(folder, [STATE_FILE], epoch=state.epoch, step=state.step, batch=state.batch, reason=reason)
    return folder / STATE_FILE


def checkpoint_name(epoch: int, taken: Collection[str] = (), step: int | None = None) -> str:
    """``epoch-NNNN`` after NNNN whole epochs, ``epoch-NNNN-step-SSSSSSSS`` at step S inside the next epoch;
    ``.K`` appended when a folder of that name is already in storage (a resume that fell back past a
    broken checkpoint must neither overwrite it nor share its name in Ray's record)."""
    name = candidate = f"epoch-{epoch:04d}" + ("" if step is None else f"-step-{step:08d}")
    again = 0
    while candidate in taken:
        again += 1
        candidate = f"{name}.{again}"
    return candidate


# -- reading ------------------------------------------------------------------------------------------------


def _file_kind(file: Path) -> str:
    """What a file that torch could not load looks like, for the error message (never its content)."""
    with open(file, "rb") as handle:
        head = handle.read(8)
    if not head:
        return "the file is empty"
    if head.startswith(_HDF5_MAGIC):
        return "it is an HDF5 file"
    if not head.startswith(_ZIP_MAGIC):
        return "it is not a zip archive, as torch.save writes"
    return ""


def _short_reason(err: BaseException) -> str:
    """The informative line of a torch error (which runs to paragraphs of advice), first sentence only."""
    skip = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in str(err).splitlines()]
    useful = [line for line in lines if line and not line.startswith(skip)]
    reason = (useful or [type(err).__name__])[0].split(". ")[0].rstrip(".")
    return reason if len(reason) <= 160 else reason[:157] + "..."


def load_file(file: Path | str, allowed: Collection[type] = ()) -> Any:
    """The content of a file written by ``torch.save``, loaded with ``weights_only=True`` (no code runs).

    ``allowed``: classes the file may hold beyond tensors and plain containers, each a plain data holder
    (``argparse.Namespace``, a path); any other class is refused with an error naming the file and it.
    """
    file = Path(file)
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            names = ", ".join(f"{c.__module__}.{c.__qualname__}" for c in allowed)
            kinds = f"a tensor, plain container or one of {names}" if allowed else "a tensor or plain container"
            raise CheckpointError(f"{file}: refused to load: it tries to load {found.group(1)!r}, which is not "
                                  f"{kinds} (loading it could run code: a foreign file, or tampered with)") from None
        reason = _file_kind(file) or _short_reason(err)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise CheckpointError(f"{file}: cannot be read ({err.strerror or err})") from None
    except Exception as err:  # noqa: BLE001 - any failure of torch's reader on foreign bytes means the same
        reason = _file_kind(file) or _short_reason(err)
    raise CheckpointError(f"{file}: not an mpmae checkpoint (corrupt or not written by torch.save: {reason})")


def check_keys(content: Any, file: Path | str, required: Sequence[str], allowed: Collection[str]) -> dict[str, Any]:
    """``content`` if it is a dict with every ``required`` key and none outside ``allowed``."""
    if not isinstance(content, dict):
        raise CheckpointError(f"{file}: not an mpmae checkpoint (it holds a {type(content).__name__}, not a dict)")
    missing = [k for k in required if k not in content]
    if missing:
        raise CheckpointError(f"{file}: not an mpmae checkpoint (missing key {missing[0]!r})")
    unexpected = sorted(str(k) for k in content if k not in allowed)
    if unexpected:
        raise CheckpointError(f"{file}: not an mpmae checkpoint (unexpected key {unexpected[0]!r})")
    return content


def load_weights(module: nn.Module, weights: Any, file: Path | str) -> None:
    """``module.load_state_dict(weights)`` strictly, an error naming ``file`` and the first key that differs."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{file}: the weights are not a dict of tensors")
    expected = module.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        key, what = (missing[0], "missing") if missing else (unexpected[0], "unexpected")
        raise CheckpointError(f"{file}: {what} weight {key!r} ({len(missing)} missing, {len(unexpected)} "
                              f"unexpected for a {type(module).__name__})")
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:  # shapes: one line per mismatch; the first is enough
        lines = [line.strip() for line in str(err).splitlines() if "size mismatch" in line]
        raise CheckpointError(f"{file}: {(lines or [_short_reason(err)])[0]}") from None


def incomplete_reason(folder: Path) -> str | None:
    """Why a checkpoint folder is not whole according to its marker, or None (whole, or written before
    markers existed: such a folder is judged by whether its ``state.pt`` loads)."""
    marker = folder / COMPLETE_FILE
    if not marker.exists():
        return None
    try:
        with open(marker, "rb") as handle:
            record = json.loads(handle.read(_MARKER_MAX_BYTES + 1)[:_MARKER_MAX_BYTES])
        sizes = record["files"]
        if not isinstance(sizes, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        return f"{marker}: unreadable (its write was cut short)"
    for name, size in sizes.items():
        part = folder / Path(str(name)).name
        actual = part.stat().st_size if part.is_file() else 0
        if actual != size:
            return f"{part}: incomplete ({actual} of the {size} bytes {COMPLETE_FILE} records; the write was cut short)"
    return None


def checkpoint_folders(run: Path) -> list[Path]:
    """The ``epoch-*`` checkpoint folders of a run folder, newest first."""
    found = [(m, p) for p in run.iterdir() if p.is_dir() and (m := _CHECKPOINT_NAME.fullmatch(p.name))]
    found.sort(key=lambda mp: _order(mp[0]), reverse=True)
    return [p for _, p in found]


def _order(match: re.Match[str]) -> tuple[int, int, int]:
    """Checkpoints in training order: epochs done, then the step inside the next epoch, then retakes."""
    return int(match.group(1)), int(match.group(2) or 0), int(match.group(3) or 0)


def _load_state_file(file: Path) -> dict[str, Any]:
    reason = incomplete_reason(file.parent)
    if reason is not None:
        raise CheckpointError(reason)
    return check_keys(load_file(file), file, STATE_REQUIRED, STATE_KEYS)


def newest_checkpoint(run: Path | str) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of a run folder that is complete and loads, and its payload; None if there is none.

    Each newer one passed over is logged as a warning naming its file and why.
    """
    skipped = []
    for folder in checkpoint_folders(Path(run)):
        try:
            found = folder / STATE_FILE, _load_state_file(folder / STATE_FILE)
        except (CheckpointError, FileNotFoundError) as err:
            skipped.append(str(err))
            continue
        for reason in skipped:
            log.warning("skipping a checkpoint: %s; using %s", reason, folder)
        return found
    for reason in skipped:
        log.warning("skipping a checkpoint: %s", reason)
    return None


def find_checkpoint(path: Path | str) -> tuple[Path, dict[str, Any]]:
    """The ``state.pt`` and payload of a checkpoint folder or file, or of a run folder's newest complete
    checkpoint; a clear error naming the file otherwise."""
    path = Path(path)
    if path.is_dir() and not (path / STATE_FILE).exists() and not (path / COMPLETE_FILE).exists():
        folders = checkpoint_folders(path)
        found = newest_checkpoint(path) if folders else None
        if found is not None:
            return found
        if folders:
            raise CheckpointError(f"{path}: none of its {len(folders)} checkpoints is complete and loadable "
                                  f"(the newest: {folders[0] / STATE_FILE}; see the warnings above)")
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"{path}: no {STATE_FILE} (expected an mpmae checkpoint folder or file, or a run folder)"
        )
    return file, _load_state_file(file)


def resolve_checkpoint(path: Path | str) -> Path:
    """The ``state.pt`` of a checkpoint folder, or of the newest complete checkpoint of a run folder."""
    return find_checkpoint(path)[0]


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """The payload of a checkpoint (folder, ``state.pt`` or run folder), with a clear error otherwise."""
    return find_checkpoint(path)[1]


def restore(payload: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer | None,
            file: Path | str = STATE_FILE) -> TrainState:
    """Load model (strictly) and optimizer state; return where training stands."""
    load_weights(model, payload["model"], file)
    if optimizer is not None:
        try:
            optimizer.load_state_dict(payload["optimizer"])
        except (KeyError, ValueError, TypeError) as err:
            raise CheckpointError(f"{file}: the optimizer state does not fit this model ({err})") from None
    position = payload.get("data_position") or {}
    batch = position.get("batch", 0) if position.get("epoch") == payload["epoch"] else 0
    return TrainState(payload["epoch"], payload["step"], payload["skipped_steps"], payload["history"], int(batch),
                      list(payload.get("resumes") or []))


# -- in an object store -------------------------------------------------------------------------------------


def stored_checkpoint_names(run: str) -> list[str]:
    """The ``epoch-*`` checkpoint folder names of a run folder or URI, newest first."""
    found = [(m, name) for name, entry in storage.listing(run).items()
             if entry.type == storage.pafs.FileType.Directory and (m := _CHECKPOINT_NAME.fullmatch(name))]
    found.sort(key=lambda mn: _order(mn[0]), reverse=True)
    return [name for _, name in found]


def stored_incomplete_reason(folder: str) -> str | None:
    """Why a checkpoint folder in a store is not whole: no marker (an object store shows a folder's files as
    each upload ends, so the marker, written last, is what says it is complete), or a size that differs."""
    sizes = storage.file_sizes(folder)
    marker = storage.join(folder, COMPLETE_FILE)
    if COMPLETE_FILE not in sizes:
        return f"{marker}: not found (the upload was cut short)"
    try:
        recorded = json.loads(storage.read_bytes(marker, _MARKER_MAX_BYTES))["files"]
        if not isinstance(recorded, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        return f"{marker}: unreadable (its write was cut short)"
    for name, size in recorded.items():
        if sizes.get(str(name), 0) != size:
            return (f"{storage.join(folder, str(name))}: incomplete ({sizes.get(str(name), 0)} of the {size} bytes "
                    f"{COMPLETE_FILE} records)")
    return None


def newest_stored_checkpoint(run: str) -> str | None:
    """The newest checkpoint folder of a run URI whose files match its marker (newer ones are warned about)."""
    for name in stored_checkpoint_names(run):
        folder = storage.join(run, name)
        reason = stored_incomplete_reason(folder)
        if reason is None:
            return folder
        log.warning("skipping a checkpoint: %s", reason)
    return None


# -- resuming -----------------------------------------------------------------------------------------------


def plan_resume(storage_path: str, name: str) -> dict[str, Any]:
    """Check, in the driver, the checkpoint a restarted run will resume from, before any worker starts.

    Returns ``{"from": folder or None, "taken": names}``: the newest complete, loadable checkpoint of the
    run folder (newer broken ones are skipped with a warning naming the file), and every checkpoint folder
    name already in storage, which a worker never writes again (:func:`checkpoint_name`). Refuses a run
    folder whose checkpoints all fail. In an object store "complete" is judged by the marker (the files
    are not downloaded here); the worker that loads it checks the rest.
    """
    if storage.is_uri(storage_path):
        run_uri = storage.join(storage_path, name)
        names = stored_checkpoint_names(run_uri)
        newest = newest_stored_checkpoint(run_uri) if names else None
        if names and newest is None:
            raise CheckpointError(f"{run_uri}: cannot resume, none of its {len(names)} checkpoints is complete "
                                  f"(the newest: {storage.join(run_uri, names[0])}); choose another run.name")
        return {"from": newest, "taken": sorted(names)}
    run = Path(storage_path) / name
    folders = checkpoint_folders(run) if run.is_dir() else []
    if not folders:
        return {"from": None, "taken": []}
    found = newest_checkpoint(run)
    if found is None:
        raise CheckpointError(f"{run}: cannot resume, none of its {len(folders)} checkpoints is complete and "
                              f"loadable (the newest: {folders[0] / STATE_FILE}; see the warnings above); "
                              "choose another run.name")
    return {"from": str(found[0].parent), "taken": sorted(p.name for p in folders)}
