"""The pretrained encoder for evaluation: rebuilt from an export (model card + weights) or taken in memory."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from mpmae.checkpoint import CARD_FILE, ENCODER_FILE, CheckpointError, load_file, load_weights
from mpmae.models.convnextv2 import ConvNeXtV2

#: A model card is a few KiB (the run config included); more is not one.
_CARD_MAX_BYTES = 1024 * 1024


def load_encoder(
    source: str | Path | ConvNeXtV2, drop_path_rate: float = 0.0
) -> tuple[ConvNeXtV2, dict[str, Any] | None]:
    """A features-only encoder and its model card (None for an in-memory encoder).

    ``source`` is an export folder (``encoder.pt`` is loaded strictly: no missing or unexpected key)
    or an encoder, which is deep-copied so that fine-tuning never changes the caller's weights.
    The drop-path rates rise linearly to ``drop_path_rate`` over the blocks, as in the constructor.
    """
    if isinstance(source, ConvNeXtV2):
        if not source.features_only:
            raise ValueError("expected a features_only encoder (the pretraining encoder or an export)")
        encoder = copy.deepcopy(source)
        set_drop_path(encoder, drop_path_rate)
        return encoder, None
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


def set_drop_path(encoder: ConvNeXtV2, rate: float) -> None:
    """Drop-path rates ``linspace(0, rate)`` over the blocks in order, replacing the current ones."""
    blocks = [block for stage in encoder.stages for block in stage]
    for block, block_rate in zip(blocks, torch.linspace(0, rate, len(blocks)).tolist(), strict=True):
        block.drop_path = DropPath(block_rate) if block_rate > 0 else nn.Identity()


def stage_depths(encoder: ConvNeXtV2) -> tuple[int, ...]:
    """Blocks per stage, read off the modules (the layer-decay ids need them)."""
    return tuple(len(stage) for stage in encoder.stages)


def pooled_features(encoder: ConvNeXtV2, x: Tensor) -> Tensor:
    """The classifier's input: last stage, global average pool, LayerNorm without affine (N, dims[-1]).

    This is the reference's probe feature (its final LayerNorm is left untrained, i.e. identity affine)
    and what `Classifier` computes before its norm's affine parameters move.
    """
    pooled = encoder.forward_stages(x)[-1].mean(dim=(-2, -1))
    return F.layer_norm(pooled, pooled.shape[-1:], eps=1e-6)


def encoder_from(
    source: str | Path | None, drop_path_rate: float = 0.0, arch: str = "atto", patch_size: int = 8
) -> tuple[ConvNeXtV2, dict[str, Any]]:
    """An encoder and its model card from an export folder, a training checkpoint or run folder, or
    (``source=None``) a randomly initialised ``arch`` encoder on the 12 default input bands."""
    from mpmae.checkpoint import encoder_weights, find_checkpoint, model_card
    from mpmae.modalities import SENTINEL2_INPUT_BANDS

    if source is None:
        encoder = ConvNeXtV2(len(SENTINEL2_INPUT_BANDS), arch, patch_size, drop_path_rate=drop_path_rate,
                             features_only=True)
        card = {"architecture": {"arch": arch, "patch_size": patch_size, "stem": "modified"},
                "bands": list(SENTINEL2_INPUT_BANDS), "patch_size": patch_size, "random_init": True}
        return encoder, card
    folder = Path(source)
    if (folder / CARD_FILE).is_file() or (folder / ENCODER_FILE).is_file():  # an export, never a checkpoint
        encoder, card = load_encoder(source, drop_path_rate)
        assert card is not None
        return encoder, card
    file, payload = find_checkpoint(source)
    card = model_card(payload, file)
    arch_card = card["architecture"]
    encoder = ConvNeXtV2(len(card["bands"]), arch_card["arch"], arch_card["patch_size"], drop_path_rate=drop_path_rate,
                         features_only=True, stem=arch_card["stem"])
    load_weights(encoder, encoder_weights(payload, file), file)
    return encoder, card
