"""The encoder export: what evaluation needs of a pretraining checkpoint and nothing else, and the encoder
rebuilt from it (or from a checkpoint, or taken in memory).

An export folder holds ``encoder.pt`` (a plain tensor state dict, loadable by ``torch.load`` without mpmae)
and ``model_card.json`` (architecture, input bands, normalisation, the run config).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import mpmae.storage as storage
from mpmae.atomic import atomic_write_json
from mpmae.checkpoint import (
    COMPLETE_FILE,
    STATE_FILE,
    CheckpointError,
    atomic_save,
    find_checkpoint,
    load_file,
    load_weights,
    newest_stored_checkpoint,
    reporting_full_disk,
    stored_checkpoint_names,
    stored_incomplete_reason,
)
from mpmae.modalities import SENTINEL2_INPUT_BANDS, resolve_selection
from mpmae.models.convnextv2 import ConvNeXtV2

ENCODER_FILE = "encoder.pt"
CARD_FILE = "model_card.json"
#: A model card is a few KiB (the run config included); more is not one.
_CARD_MAX_BYTES = 1024 * 1024


def load_encoder(
    source: str | Path | ConvNeXtV2, drop_path_rate: float = 0.0
) -> tuple[ConvNeXtV2, dict[str, Any] | None]:
    """A features-only encoder and its model card (None for an in-memory encoder).

    ``source`` is an export folder or its URI (``encoder.pt`` is loaded strictly: no missing or unexpected
    key) or an encoder, which is deep-copied so that fine-tuning never changes the caller's weights.
    The drop-path rates rise linearly to ``drop_path_rate`` over the blocks, as in the constructor.
    """
    if isinstance(source, ConvNeXtV2):
        if not source.features_only:
            raise ValueError("expected a features_only encoder (the pretraining encoder or an export)")
        encoder = copy.deepcopy(source)
        encoder.set_drop_path(drop_path_rate)
        return encoder, None
    if storage.is_uri(source):
        with fetched(source, "encoder") as local:
            return load_encoder(local, drop_path_rate)
    folder = Path(source)
    card = read_card(folder / CARD_FILE)
    arch = card["architecture"]
    try:
        encoder = ConvNeXtV2(
            len(card["bands"]), arch["arch"], arch["patch_size"], drop_path_rate=drop_path_rate,
            architecture=arch.get("conventions", "default"), features_only=True, stem=arch.get("stem", "modified"),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{folder / CARD_FILE}: its architecture cannot be built ({err})") from None
    load_weights(encoder, load_file(folder / ENCODER_FILE), folder / ENCODER_FILE)
    return encoder, card


def read_card(path: Path) -> dict[str, Any]:
    """An export's model card, checked for what rebuilding the encoder needs; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; an encoder export is {ENCODER_FILE} with its {CARD_FILE}, "
                                "which says how to rebuild the encoder")
    with open(path, "rb") as handle:
        text = handle.read(_CARD_MAX_BYTES + 1)
    if len(text) > _CARD_MAX_BYTES:
        raise CheckpointError(f"{path}: not a model card (over {_CARD_MAX_BYTES} bytes)")
    try:
        card = json.loads(text)
    except ValueError as err:
        raise CheckpointError(f"{path}: not a model card (invalid JSON: {err})") from None
    arch = card.get("architecture") if isinstance(card, dict) else None
    if not isinstance(arch, dict) or not {"arch", "patch_size"} <= set(arch):
        raise CheckpointError(f"{path}: not a model card (no 'architecture' with 'arch' and 'patch_size')")
    if not isinstance(card.get("bands"), list) or not card["bands"]:
        raise CheckpointError(f"{path}: not a model card (no list of 'bands')")
    return card


def encoder_from(
    source: str | Path | None, drop_path_rate: float = 0.0, arch: str = "atto", patch_size: int = 8
) -> tuple[ConvNeXtV2, dict[str, Any]]:
    """An encoder and its model card from an export folder, a training checkpoint or run folder (each a
    local path or a URI), or (``source=None``) a randomly initialised ``arch`` encoder on the 12 default input bands."""
    if source is None:
        encoder = ConvNeXtV2(len(SENTINEL2_INPUT_BANDS), arch, patch_size, drop_path_rate=drop_path_rate,
                             features_only=True)
        card: dict[str, Any] = {"architecture": {"arch": arch, "patch_size": patch_size, "stem": "modified"},
                "bands": list(SENTINEL2_INPUT_BANDS), "patch_size": patch_size, "random_init": True}
        return encoder, card
    if storage.is_uri(source):
        with fetched(source, "encoder") as local:
            return encoder_from(local, drop_path_rate, arch, patch_size)
    folder = Path(source)
    if (folder / CARD_FILE).is_file() or (folder / ENCODER_FILE).is_file():  # an export, never a checkpoint
        encoder, export_card = load_encoder(source, drop_path_rate)
        assert export_card is not None
        return encoder, export_card
    file, payload = find_checkpoint(source)
    card = model_card(payload, file)
    arch_card = card["architecture"]
    encoder = ConvNeXtV2(len(card["bands"]), arch_card["arch"], arch_card["patch_size"], drop_path_rate=drop_path_rate,
                         features_only=True, stem=arch_card["stem"])
    load_weights(encoder, encoder_weights(payload, file), file)
    return encoder, card


def export_encoder(checkpoint: Path | str, out: Path | str) -> Path | str:
    """Write the encoder's plain state dict and a JSON model card into ``out`` (refusing to overwrite).

    ``checkpoint`` (a checkpoint folder or file, or a run folder) and ``out`` may each be a URI. Into a
    store the card is uploaded last, so that its presence means the export is whole. Returns ``out``
    (a Path when local).
    """
    target = str(out)
    storage.check_reachable(target, "out")
    existing = [storage.join(target, name) for name in (ENCODER_FILE, CARD_FILE)
                if storage.exists(storage.join(target, name))]
    if existing:
        raise FileExistsError(f"{existing[0]} already exists; choose another output folder")
    with fetched(checkpoint, "checkpoint") as local:
        file, payload = find_checkpoint(local)
        encoder = encoder_weights(payload, file)
        card = model_card(payload, file)
    with storage.output_folder(target, last=[CARD_FILE]) as folder:
        atomic_save(encoder, folder / ENCODER_FILE)
        with reporting_full_disk(folder / CARD_FILE, "writing it"):
            atomic_write_json(folder / CARD_FILE, card)
    return target if storage.is_uri(target) else Path(out)


def encoder_weights(payload: Mapping[str, Any], file: Path | str) -> dict[str, torch.Tensor]:
    """The ``encoder.*`` tensors of a checkpoint's model, without the prefix."""
    prefix = "encoder."
    model = payload["model"]
    if not isinstance(model, dict):
        raise CheckpointError(f"{file}: its 'model' is a {type(model).__name__}, not a dict of tensors")
    encoder = {k[len(prefix):]: v.clone() for k, v in model.items()
               if isinstance(k, str) and k.startswith(prefix) and isinstance(v, torch.Tensor)}
    if not encoder:
        raise CheckpointError(f"{file}: the checkpoint's model holds no encoder weights")
    return encoder


def model_card(payload: Mapping[str, Any], file: Path | str = STATE_FILE) -> dict[str, Any]:
    """What a fine-tuning run needs to rebuild and feed the encoder (``file``: the checkpoint, for errors)."""
    try:
        return _model_card(payload)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: its run config does not describe a model ({type(err).__name__}: "
                              f"{str(err)[:120]})") from None


def _model_card(payload: Mapping[str, Any]) -> dict[str, Any]:
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


# -- sources in an object store ------------------------------------------------------------------------


def _stored_source(source: str, key: str) -> tuple[str, list[str] | None, str | None]:
    """The folder of ``source`` (a URI) to download, which of its files (None: all), and the file to
    yield (None: the folder): an export's two files, a checkpoint folder or its ``state.pt``, or a run
    folder's newest complete checkpoint."""
    if storage.is_file(source):  # a file: state.pt (judged by its folder's marker) or any other one
        folder, name = storage.parent_of(source), storage.name_of(source)
        if name != STATE_FILE:
            return folder, [name], name
        reason = stored_incomplete_reason(folder)
        if reason is not None:
            raise CheckpointError(reason)
        return folder, [STATE_FILE, COMPLETE_FILE], name
    files = storage.file_sizes(source)
    if CARD_FILE in files or ENCODER_FILE in files:
        return source, [name for name in (ENCODER_FILE, CARD_FILE) if name in files], None
    if STATE_FILE in files or COMPLETE_FILE in files:
        reason = stored_incomplete_reason(source)
        if reason is not None:
            raise CheckpointError(reason)
        return source, None, None
    names = stored_checkpoint_names(source)
    newest = newest_stored_checkpoint(source) if names else None
    if newest is not None:
        return newest, None, None
    if names:
        raise CheckpointError(f"{source}: none of its {len(names)} checkpoints is complete (the newest: "
                              f"{storage.join(source, names[0])}; see the warnings above)")
    storage.check_reachable(source, key)  # nothing there: a missing bucket says so, naming ``key``
    raise FileNotFoundError(f"{source}: no {STATE_FILE}, encoder export or checkpoint folder (expected an mpmae "
                            "checkpoint folder, a run folder or an encoder export)")


@contextmanager
def fetched(source: str | Path, key: str = "source") -> Iterator[Path]:
    """A local path holding what ``source`` names: ``source`` itself when local; for a URI, a temporary
    download of the export, checkpoint folder (or its ``state.pt``) or run folder's newest complete
    checkpoint. Errors raised in the block name the URI, not the temporary folder; a missing bucket or
    refused credentials are a :class:`~mpmae.storage.StorageError` naming ``key``."""
    if not storage.is_uri(source):
        yield Path(source)
        return
    folder, names, file = _stored_source(str(source), key)
    with storage.local_folder(folder, names) as local:
        try:
            yield local if file is None else local / file
        except (CheckpointError, FileNotFoundError) as err:
            raise type(err)(storage.renamed(err, local, folder)) from None
