"""The encoder export: what evaluation needs of a pretraining checkpoint and nothing else, and the encoder
rebuilt from it (or from a checkpoint, a checkpoint of the original MMEarth project, or taken in memory).

An export folder holds ``encoder.pt`` (a plain tensor state dict, loadable by ``torch.load`` without mpmae),
``encoder.pt2`` (a ``torch.export`` program: a float32 (N, C, H, W) batch at the card's input size to the
final feature map, for any N, run by plain torch), ``model.safetensors`` with ``config.json`` (the
architecture, bands in order, normalisation, patch and input size: for code that is not torch's), with the
``mmearth`` layout ``mmearth.pth`` (the original project's checkpoint layout,
:mod:`mpmae.reference_checkpoint`), and ``model_card.json`` (architecture, input bands, normalisation, the
run config), written last. ``mpmae import`` writes the same folder from a checkpoint of the original project.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save
from torch import Tensor, nn

import mpmae.storage as storage
from mpmae.architectures import VARIANTS, ConvNeXtSpec, get_spec
from mpmae.atomic import atomic_write, atomic_write_json
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
from mpmae.reference_checkpoint import (
    ALLOWED_CLASSES,
    ReferenceEncoder,
    is_reference_layout,
    load_reference_checkpoint,
    read_reference_payload,
    reference_payload,
)

ENCODER_FILE = "encoder.pt"
CARD_FILE = "model_card.json"
PROGRAM_FILE = "encoder.pt2"
SAFETENSORS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
MMEARTH_FILE = "mmearth.pth"
CARD_FORMAT = "mpmae-encoder/1"
CONFIG_FORMAT = "mpmae-encoder-config/1"
#: ``mpmae``: our files only; ``mmearth``: also the original project's checkpoint layout.
LAYOUTS = ("mpmae", "mmearth")
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
    encoder = _build_encoder(card, folder / CARD_FILE, drop_path_rate)
    load_weights(encoder, load_file(folder / ENCODER_FILE), folder / ENCODER_FILE)
    return encoder, card


def _build_encoder(card: Mapping[str, Any], where: Path | str, drop_path_rate: float = 0.0) -> ConvNeXtV2:
    """A features-only encoder as a model card describes it, randomly initialised; errors name ``where``."""
    arch = card["architecture"]
    try:
        return ConvNeXtV2(
            len(card["bands"]), _card_spec(arch), arch["patch_size"], drop_path_rate=drop_path_rate,
            architecture=arch.get("conventions", "default"), features_only=True, stem=arch.get("stem", "modified"),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: its architecture cannot be built ({err})") from None


def _card_spec(arch: Mapping[str, Any]) -> str | ConvNeXtSpec:
    """The encoder size of a card's architecture: its depths and dims (any size, e.g. an imported
    checkpoint's), else the variant its ``arch`` names; both given must agree."""
    if "depths" not in arch and "dims" not in arch:
        return str(arch["arch"])
    spec = ConvNeXtSpec(tuple(arch["depths"]), tuple(arch["dims"]))
    if arch.get("arch") is not None and get_spec(arch["arch"]) != spec:
        raise ValueError(f"'arch' {arch['arch']!r} is not depths {spec.depths} and dims {spec.dims}")
    return spec


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
    sized = isinstance(arch, dict) and ("arch" in arch or {"depths", "dims"} <= set(arch))
    if not isinstance(arch, dict) or "patch_size" not in arch or not sized:
        raise CheckpointError(f"{path}: not a model card (no 'architecture' with 'patch_size' and 'arch' or "
                              "'depths' and 'dims')")
    if not isinstance(card.get("bands"), list) or not card["bands"]:
        raise CheckpointError(f"{path}: not a model card (no list of 'bands')")
    return card


def encoder_from(
    source: str | Path | None, drop_path_rate: float = 0.0, arch: str = "atto", patch_size: int = 8
) -> tuple[ConvNeXtV2, dict[str, Any]]:
    """An encoder and its model card from an export folder, a training checkpoint or run folder, a checkpoint
    file of the original MMEarth project (each a local path or a URI; the last read in memory, as
    ``mpmae import`` would), or (``source=None``) a randomly initialised ``arch`` encoder on the 12 default
    input bands."""
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
    if folder.is_file() and folder.name != STATE_FILE:  # perhaps a checkpoint of the original project
        content = load_file(folder, allowed=ALLOWED_CLASSES)
        if is_reference_layout(content):
            return _imported(read_reference_payload(content, folder, drop_path_rate), folder)
    file, payload = find_checkpoint(source)
    card = model_card(payload, file)
    encoder = _build_encoder(card, file, drop_path_rate)
    load_weights(encoder, encoder_weights(payload, file), file)
    return encoder, card


def export_encoder(checkpoint: Path | str, out: Path | str, layout: str = "mpmae") -> Path | str:
    """Write a checkpoint's encoder and its JSON model card into ``out`` (refusing to overwrite): the files
    of the module docstring, ``mmearth.pth`` too with ``layout="mmearth"``.

    ``checkpoint`` (a checkpoint folder or file, or a run folder) and ``out`` may each be a URI. Into a
    store the card is uploaded last, so that its presence means the export is whole. Returns ``out``
    (a Path when local).
    """
    target = _fresh_folder(out, layout)
    with fetched(checkpoint, "checkpoint") as local:
        file, payload = find_checkpoint(local)
        card = model_card(payload, file)
        encoder = _build_encoder(card, file)
        load_weights(encoder, encoder_weights(payload, file), file)
    return _write_export(encoder, card, target, layout)


def import_reference(source: Path | str, out: Path | str) -> Path | str:
    """Write the export of a checkpoint of the original MMEarth project (``source``, a ``.pth`` file, a path
    or a URI) into ``out``, as :func:`export_encoder` does; the architecture comes from the file itself."""
    target = _fresh_folder(out, "mpmae")
    with fetched(source, "FILE") as local:
        if not local.is_file():
            raise FileNotFoundError(f"{local}: {'a folder' if local.is_dir() else 'not found'}; expected a checkpoint "
                                    "file of the original MMEarth project (such as a released checkpoint-199.pth)")
        encoder, card = _imported(load_reference_checkpoint(local), local)
    return _write_export(encoder, card, target, "mpmae")


def _imported(found: ReferenceEncoder, file: Path) -> tuple[ConvNeXtV2, dict[str, Any]]:
    """The encoder of a reference checkpoint and its model card: the card our export stored in it, else one
    made of what the file says; either way with ``imported_from`` naming the file (name and SHA-256)."""
    encoder = found.encoder
    card = dict(found.card) if found.card is not None else {
        "format": CARD_FORMAT,
        "architecture": _architecture(encoder, found.conventions),
        "input_size": found.input_size,
        "patch_size": encoder.patch_size,
        "input_modality": "sentinel2",
        "bands": list(found.bands),
        "normalisation": {},  # the reference's checkpoints do not carry their band statistics
        "pretext_tasks": list(found.pretext_tasks),
        "trained": {"epochs": None if found.epoch is None else found.epoch + 1, "steps": None},
    }
    card["imported_from"] = {"file": file.name, "sha256": _sha256(file), "layout": "mmearth", "loss": found.loss,
                             "args": found.args}
    return encoder, card


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    named = not isinstance(model["arch"], Mapping)  # a hand-built config's ConvNeXtSpec is saved as a dict
    spec = get_spec(model["arch"] if named else ConvNeXtSpec(tuple(model["arch"]["depths"]),
                                                             tuple(model["arch"]["dims"])))
    return {
        "format": CARD_FORMAT,
        "architecture": {
            "arch": model["arch"] if named else None, "depths": list(spec.depths), "dims": list(spec.dims),
            "patch_size": model["patch_size"], "stem": model.get("stem", "modified"),
            "conventions": model.get("architecture", "default"),
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


def _architecture(encoder: ConvNeXtV2, conventions: str) -> dict[str, Any]:
    """A card's architecture of ``encoder``: its size (and the variant of that size, None if none), stem,
    patch size and conventions."""
    spec = ConvNeXtSpec(encoder.depths, encoder.dims)
    return {"arch": next((name for name, known in VARIANTS.items() if known == spec), None),
            "depths": list(spec.depths), "dims": list(spec.dims), "patch_size": encoder.patch_size,
            "stem": encoder.stem_type, "conventions": conventions}


# -- writing an export ---------------------------------------------------------------------------------


def export_files(layout: str = "mpmae") -> tuple[str, ...]:
    """The files of an export in ``layout``, in the order they are written (the card, the marker, last)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout: {layout!r} is not one of {list(LAYOUTS)}")
    return (ENCODER_FILE, PROGRAM_FILE, SAFETENSORS_FILE, CONFIG_FILE,
            *((MMEARTH_FILE,) if layout == "mmearth" else ()), CARD_FILE)


def _fresh_folder(out: Path | str, layout: str) -> str:
    """``out`` as a string, once it is reachable and holds none of the files an export there would write."""
    target = str(out)
    storage.check_reachable(target, "out")
    # the weights and the card first: an earlier export's files, named the same whatever its layout
    for name in sorted(export_files(layout), key=lambda n: n not in (ENCODER_FILE, CARD_FILE)):
        if storage.exists(storage.join(target, name)):
            raise FileExistsError(f"{storage.join(target, name)} already exists; choose another output folder")
    return target


def _write_export(encoder: ConvNeXtV2, card: Mapping[str, Any], target: str, layout: str) -> Path | str:
    """Write ``encoder`` (put in eval mode) and ``card`` as an export folder ``target`` (a path or a URI,
    the card last). Returns ``target`` (a Path when local)."""
    encoder.eval()
    with storage.output_folder(target, last=[CARD_FILE]) as folder:
        atomic_save(dict(encoder.state_dict()), folder / ENCODER_FILE)
        program = encoder_program(encoder, card["input_size"], len(card["bands"]))
        _write(folder / PROGRAM_FILE, lambda handle: torch.export.save(program, handle))
        tensors = {key: value.detach().contiguous() for key, value in encoder.state_dict().items()}
        _write(folder / SAFETENSORS_FILE, lambda handle: handle.write(save(tensors, metadata={"format": "pt"})))
        config = json.dumps(encoder_config(encoder, card), indent=2).encode()
        _write(folder / CONFIG_FILE, lambda handle: handle.write(config))
        if layout == "mmearth":
            atomic_save(reference_payload(encoder, card), folder / MMEARTH_FILE, allowed=ALLOWED_CLASSES)
        with reporting_full_disk(folder / CARD_FILE, "writing it"):
            atomic_write_json(folder / CARD_FILE, dict(card))
    return target if storage.is_uri(target) else Path(target)


def _write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """A file written atomically through ``write(handle)``; a full disk's error names ``path``."""
    def through_handle(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    with reporting_full_disk(path, "writing it"):
        atomic_write(path, through_handle)


class _FinalFeatureMap(nn.Module):
    """An encoder's final feature map as the whole forward: what the exported program computes."""

    def __init__(self, encoder: ConvNeXtV2) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder.forward_features(x)


def encoder_program(encoder: ConvNeXtV2, input_size: int, channels: int) -> torch.export.ExportedProgram:
    """``encoder`` as a ``torch.export`` program: a float32 (N, ``channels``, ``input_size``, ``input_size``)
    batch, any N, to the final feature map. Plain torch runs it (``torch.export.load(file).module()``)."""
    example = torch.zeros(2, channels, input_size, input_size)
    batch = torch.export.Dim("batch", min=1)
    return torch.export.export(_FinalFeatureMap(encoder).eval(), (example,), dynamic_shapes={"x": {0: batch}})


def encoder_config(encoder: ConvNeXtV2, card: Mapping[str, Any]) -> dict[str, Any]:
    """``config.json``: what code without mpmae needs to rebuild the encoder from ``model.safetensors`` (the
    module names are the reference's) and to feed it; ``output`` is the final feature map at the input size."""
    size, channels, conventions = card["input_size"], len(card["bands"]), encoder.conventions
    stem_kernel = encoder.patch_size // 2 ** (len(encoder.dims) - 1)
    with torch.no_grad():
        grid = encoder.forward_features(torch.zeros(1, channels, size, size)).shape[-2:]
    return {
        "format": CONFIG_FORMAT,
        "model_type": "convnextv2",
        "architecture": {
            **_architecture(encoder, card["architecture"].get("conventions", "default")), "in_chans": channels,
            "initial_conv_padding": conventions.initial_conv_padding,
            "stem_padding": stem_kernel // 2 if conventions.pad_stem and encoder.stem_type == "modified" else 0,
            "grn_eps": conventions.grn_eps,
        },
        "bands": list(card["bands"]),
        "normalisation": card.get("normalisation", {}),
        "input_size": size,
        "patch_size": encoder.patch_size,
        "output": {"channels": encoder.dims[-1], "size": list(grid)},
        "weights": SAFETENSORS_FILE,
        "program": PROGRAM_FILE,
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
