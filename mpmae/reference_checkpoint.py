"""The original MMEarth project's checkpoint files: its (released) checkpoints read safely, our encoders
written in its layout.

A checkpoint of the reference code (vishalned/MMEarth-train, ``helpers.save_model``) is
``{"model": state dict, "optimizer", "epoch", "scaler", "args": argparse.Namespace}``, the state dict dense
or MinkowskiEngine. It is loaded with ``weights_only=True``, allowing only the classes such a file holds
(:data:`ALLOWED_CLASSES`). The weights are the truth about the encoder (`encoder_shape`); ``args`` must
agree with them. The reference code's conventions (``architecture="reference"``) are what its weights
need. What we write in its layout carries our own model card in ``args`` (:data:`CARD_ARG`), so that
reading it back gives the same encoder, conventions and bands.
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from mpmae.architectures import VARIANTS, ConvNeXtSpec, get_conventions
from mpmae.checkpoint import CheckpointError, load_file
from mpmae.modalities import PRESETS, SENTINEL2_INPUT_BANDS, TASK_ORDER
from mpmae.models.convnextv2 import ConvNeXtV2
from mpmae.models.reference import (
    LOG_VARS_KEY,
    EncoderShape,
    encoder_shape,
    load_reference_state_dict,
    to_reference_state_dict,
)

#: What a reference checkpoint may hold beyond tensors and plain containers: its ``args`` and the paths in them
#: (a ``WindowsPath`` cannot be made on the Linux machines mpmae runs on: refused by name rather than failing).
ALLOWED_CLASSES: tuple[type, ...] = (argparse.Namespace, pathlib.PurePosixPath, pathlib.PureWindowsPath,
                                     pathlib.PosixPath)
#: The ``args`` entry in which our layout keeps the model card of the export it was written from.
CARD_ARG = "mpmae_card"
#: Names under which ``args`` may say how the task losses were aggregated (the reference's name varies).
LOSS_ARGS = ("loss_aggr", "loss_type")
LOSSES = ("uncertainty", "unweighted")
#: Input channels -> bands: the 12 Sentinel-2 input bands, or the reference's "rgb" (blue, green, red).
_BANDS_BY_CHANNELS = {len(bands): bands for bands in (SENTINEL2_INPUT_BANDS, PRESETS["rgb"]["sentinel2"])}
#: The reference's factory names the pico model without the V2.
_MODEL_NAMES = {"pico": "convnext_pico"}


@dataclass
class ReferenceEncoder:
    """A features-only encoder read from a reference checkpoint, and what the file says about it."""

    encoder: ConvNeXtV2
    conventions: str
    input_size: int
    bands: tuple[str, ...]
    pretext_tasks: tuple[str, ...]
    #: The loss aggregation: from ``args``, else inferred from the log-variances (None: the file has none).
    loss: str | None
    #: The reference's ``epoch``: the index of the last epoch trained (None when absent or not a number).
    epoch: int | None
    #: ``args`` as JSON values, without our card.
    args: dict[str, Any]
    #: The model card our export stored in ``args``, or None for a checkpoint of the reference code.
    card: dict[str, Any] | None


def is_reference_layout(payload: Any) -> bool:
    """Whether a loaded file looks like the reference's checkpoint (a ``model``, no mpmae ``config``)."""
    return isinstance(payload, dict) and "model" in payload and "config" not in payload


def load_reference_checkpoint(file: Path | str, drop_path_rate: float = 0.0) -> ReferenceEncoder:
    """The encoder of a reference checkpoint file; errors name the file and the key or ``args`` field."""
    payload = load_file(file, allowed=ALLOWED_CLASSES)
    if isinstance(payload, dict) and "config" in payload:
        raise CheckpointError(f"{file}: an mpmae training checkpoint, not an MMEarth one; export it with mpmae export")
    if not is_reference_layout(payload):
        raise CheckpointError(f"{file}: not an MMEarth checkpoint (expected a dict with 'model' and 'args'; it holds "
                              f"a {type(payload).__name__} without 'model')")
    return read_reference_payload(payload, file, drop_path_rate)


def read_reference_payload(payload: Mapping[str, Any], file: Path | str,
                           drop_path_rate: float = 0.0) -> ReferenceEncoder:
    """The encoder of a loaded reference checkpoint (``file``: where it came from, for errors)."""
    state = payload["model"]
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise CheckpointError(f"{file}: its 'model' is not a dict of tensors")
    args = _args(payload.get("args"), file)
    try:
        shape = encoder_shape(state)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{file}: {_reason(err)}") from None
    _check_args(args, shape, any(k.endswith(".kernel") for k in state), file)
    card = _stored_card(args, shape, file)
    conventions = card["architecture"].get("conventions", "default") if card else "reference"
    epoch = payload.get("epoch")
    return ReferenceEncoder(
        encoder=_encoder(state, shape, conventions, drop_path_rate, file), conventions=conventions,
        input_size=_input_size(args, card, shape, file), bands=_bands(shape.in_chans, card, file),
        pretext_tasks=_pretext_tasks(state, card), loss=_loss(args, state, file),
        epoch=epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
        args={k: _plain(v) for k, v in args.items() if k != CARD_ARG}, card=card,
    )


def _encoder(state: Mapping[str, Tensor], shape: EncoderShape, conventions: str, drop_path_rate: float,
             file: Path | str) -> ConvNeXtV2:
    """The features-only encoder of ``shape``, its weights loaded strictly from ``state``."""
    try:
        encoder = ConvNeXtV2(shape.in_chans, shape.spec, shape.patch_size, drop_path_rate=drop_path_rate,
                             architecture=conventions, features_only=True, stem=shape.stem)
        load_reference_state_dict(encoder, state)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{file}: {_reason(err)}") from None
    return encoder


def reference_payload(encoder: ConvNeXtV2, card: Mapping[str, Any]) -> dict[str, Any]:
    """``encoder`` (with its model card) in the reference's checkpoint layout, for :func:`~mpmae.checkpoint.atomic_save`
    with ``allowed=ALLOWED_CLASSES``: dense ``encoder.*`` weights and the ``args`` its code builds from."""
    spec = ConvNeXtSpec(encoder.depths, encoder.dims)
    variant = next((name for name, known in VARIANTS.items() if known == spec), None)
    args = argparse.Namespace(
        model=None if variant is None else _MODEL_NAMES.get(variant, f"convnextv2_{variant}"),
        input_size=card["input_size"], patch_size=encoder.patch_size,
        use_orig_stem=encoder.stem_type == "original", sparse=False, **{CARD_ARG: dict(card)},
    )
    payload: dict[str, Any] = {"model": to_reference_state_dict(encoder), "args": args}
    epochs = (card.get("trained") or {}).get("epochs")
    if isinstance(epochs, int) and epochs > 0:
        payload["epoch"] = epochs - 1  # the reference stores the index of the last epoch trained
    return payload


# -- what the file says, checked against the weights ------------------------------------------------------


def _args(args: Any, file: Path | str) -> dict[str, Any]:
    """``args`` as a dict (a file without them has none)."""
    if args is None:
        return {}
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if isinstance(args, dict):
        return args
    raise CheckpointError(f"{file}: its 'args' is a {type(args).__name__}, expected an argparse.Namespace")


def _reason(err: Exception) -> str:
    """An error's message (a KeyError's without the quotes its ``str`` adds)."""
    return str(err.args[0]) if err.args else type(err).__name__


def _mismatch(file: Path | str, field: str, value: Any, weights: Any) -> CheckpointError:
    """The error of a fact in the file that its weights contradict."""
    return CheckpointError(f"{file}: {field} is {value!r}, but its weights say {weights}")


def _check_args(args: Mapping[str, Any], shape: EncoderShape, sparse: bool, file: Path | str) -> None:
    """Every architecture fact in ``args`` must agree with the weights."""
    facts = {"patch_size": shape.patch_size, "use_orig_stem": shape.stem == "original", "sparse": sparse}
    for field, value in facts.items():
        if args.get(field, value) != value:
            raise _mismatch(file, f"args.{field}", args[field], value)
    model = args.get("model")
    variant = model.removeprefix("convnextv2_").removeprefix("convnext_") if isinstance(model, str) else None
    known = VARIANTS.get(variant) if variant is not None else None
    if known is not None and known != shape.spec:
        raise _mismatch(file, "args.model", model, f"depths {shape.spec.depths}, dims {shape.spec.dims}")


def _stored_card(args: Mapping[str, Any], shape: EncoderShape, file: Path | str) -> dict[str, Any] | None:
    """The model card our export stored in ``args``, checked against the weights (None if there is none)."""
    card = args.get(CARD_ARG)
    if card is None:
        return None
    arch = card.get("architecture") if isinstance(card, dict) else None
    if not isinstance(arch, dict) or not isinstance(card.get("bands"), list):
        raise CheckpointError(f"{file}: args.{CARD_ARG} is not a model card (no 'architecture' or 'bands')")
    facts = {"depths": list(shape.spec.depths), "dims": list(shape.spec.dims), "patch_size": shape.patch_size,
             "stem": shape.stem}
    for field, value in facts.items():
        if field in arch and arch[field] != value:
            raise _mismatch(file, f"args.{CARD_ARG}.architecture.{field}", arch[field], value)
    try:
        get_conventions(arch.get("conventions", "default"))
    except ValueError as err:
        raise CheckpointError(f"{file}: args.{CARD_ARG}.architecture.conventions: {err}") from None
    return card


def _input_size(args: Mapping[str, Any], card: Mapping[str, Any] | None, shape: EncoderShape,
                file: Path | str) -> int:
    """The pretraining input side: the card's, else ``args.input_size``, else 7 patches (every released run)."""
    field, size = ((f"args.{CARD_ARG}.input_size", card.get("input_size")) if card is not None
                   else ("args.input_size", args.get("input_size", 7 * shape.patch_size)))
    if not isinstance(size, int) or size <= 0 or size % shape.patch_size:
        raise CheckpointError(f"{file}: {field} is {size!r}; expected a positive multiple of the patch size "
                              f"{shape.patch_size}")
    return size


def _bands(channels: int, card: Mapping[str, Any] | None, file: Path | str) -> tuple[str, ...]:
    """The input bands: the card's, else those the reference feeds that many channels."""
    if card is not None:
        if len(card["bands"]) != channels:
            raise _mismatch(file, f"args.{CARD_ARG}.bands", card["bands"], f"{channels} input channels")
        return tuple(card["bands"])
    if channels not in _BANDS_BY_CHANNELS:
        raise CheckpointError(f"{file}: its encoder takes {channels} input channels; expected 12 (Sentinel-2 "
                              f"{', '.join(SENTINEL2_INPUT_BANDS)}) or 3 (the rgb preset B2, B3, B4)")
    return _BANDS_BY_CHANNELS[channels]


def _pretext_tasks(state: Mapping[str, Tensor], card: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The card's pretext tasks, else the reference's prediction heads (``pred_dict.<task>``) in task order."""
    if card is not None:
        return tuple(card.get("pretext_tasks", ()))
    heads = {key.split(".")[1] for key in state if key.startswith("pred_dict.")}
    return tuple(sorted(heads, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else len(TASK_ORDER), t)))


def _loss(args: Mapping[str, Any], state: Mapping[str, Tensor], file: Path | str) -> str | None:
    """The loss aggregation ``args`` names, else the one the log-variances show (all zero: never trained)."""
    log_vars = state.get(LOG_VARS_KEY)
    trained = log_vars is not None and bool(log_vars.count_nonzero())
    named = next(((f, args[f]) for f in LOSS_ARGS if f in args), None)
    if named is None:
        return None if log_vars is None else LOSSES[0] if trained else LOSSES[1]
    field, value = named
    if value not in LOSSES:
        raise CheckpointError(f"{file}: args.{field} is {value!r}; expected one of {list(LOSSES)}")
    if value == "unweighted" and trained:
        raise _mismatch(file, f"args.{field}", value, f"uncertainty ({LOG_VARS_KEY} are not all zero)")
    return str(value)


def _plain(value: Any) -> Any:
    """``value`` as JSON: containers kept, anything that is not a number, string or None as its text."""
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)
