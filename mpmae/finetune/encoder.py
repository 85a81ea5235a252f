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

from mpmae.models.convnextv2 import ConvNeXtV2
from mpmae.train.checkpoint import CARD_FILE, ENCODER_FILE


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
    card = json.loads((folder / CARD_FILE).read_text())
    arch = card["architecture"]
    encoder = ConvNeXtV2(
        len(card["bands"]), arch["arch"], arch["patch_size"], drop_path_rate=drop_path_rate,
        architecture=arch.get("conventions", "default"), features_only=True, stem=arch.get("stem", "modified"),
    )
    encoder.load_state_dict(torch.load(folder / ENCODER_FILE, map_location="cpu", weights_only=True))
    return encoder, card


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
    from mpmae.modalities import SENTINEL2_INPUT_BANDS
    from mpmae.train.checkpoint import load_checkpoint, model_card

    if source is None:
        encoder = ConvNeXtV2(len(SENTINEL2_INPUT_BANDS), arch, patch_size, drop_path_rate=drop_path_rate,
                             features_only=True)
        card = {"architecture": {"arch": arch, "patch_size": patch_size, "stem": "modified"},
                "bands": list(SENTINEL2_INPUT_BANDS), "patch_size": patch_size, "random_init": True}
        return encoder, card
    if (Path(source) / CARD_FILE).is_file():
        encoder, card = load_encoder(source, drop_path_rate)
        assert card is not None
        return encoder, card
    payload = load_checkpoint(source)
    card = model_card(payload)
    arch_card = card["architecture"]
    encoder = ConvNeXtV2(len(card["bands"]), arch_card["arch"], arch_card["patch_size"], drop_path_rate=drop_path_rate,
                         features_only=True, stem=arch_card["stem"])
    prefix = "encoder."
    encoder.load_state_dict({k[len(prefix):]: v for k, v in payload["model"].items() if k.startswith(prefix)})
    return encoder, card
