from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.layers import DropPath

from mpmae.checkpoint import CheckpointError
from mpmae.export import CARD_FILE, ENCODER_FILE, load_encoder
from mpmae.models.convnextv2 import ConvNeXtV2


def write_export(folder: Path, state: dict, patch_size: int = 16) -> Path:
    folder.mkdir()
    torch.save(state, folder / ENCODER_FILE)
    card = {"architecture": {"arch": "atto", "patch_size": patch_size, "stem": "modified"},
            "bands": ["B1", "B2", "B3", "B4"], "input_size": 112}
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


def test_load_export_strictly(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = ConvNeXtV2(4, "atto", 16, features_only=True)
    encoder, card = load_encoder(write_export(tmp_path / "ok", source.state_dict()), drop_path_rate=0.1)
    assert card is not None and card["input_size"] == 112
    assert encoder.features_only and encoder.patch_size == 16
    for key, value in source.state_dict().items():
        assert torch.equal(encoder.state_dict()[key], value), key
    assert isinstance(encoder.stages[3][1].drop_path, DropPath)
    assert encoder.stages[3][1].drop_path.drop_prob == pytest.approx(0.1)

    extra = {**source.state_dict(), "norm.weight": torch.ones(320)}
    with pytest.raises(CheckpointError, match=r"encoder.pt: unexpected weight 'norm.weight'"):
        load_encoder(write_export(tmp_path / "extra", extra))
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("stem.")}
    with pytest.raises(CheckpointError, match=r"encoder.pt: missing weight 'stem."):
        load_encoder(write_export(tmp_path / "partial", partial))


def test_in_memory_encoder_is_copied(encoder: ConvNeXtV2) -> None:
    copy, card = load_encoder(encoder, drop_path_rate=0.2)
    assert card is None and copy is not encoder
    assert copy.stages[3][0].drop_path.drop_prob == pytest.approx(0.2)
    assert isinstance(encoder.stages[3][0].drop_path, torch.nn.Identity)
    with torch.no_grad():
        copy.stages[0][0].pwconv1.weight.add_(1.0)
    assert not torch.equal(copy.stages[0][0].pwconv1.weight, encoder.stages[0][0].pwconv1.weight)
    with pytest.raises(ValueError, match="features_only"):
        load_encoder(ConvNeXtV2(3, "atto", 8))


def test_set_drop_path_rates_rise_linearly(encoder: ConvNeXtV2) -> None:
    encoder.set_drop_path(0.3)
    modules = [block.drop_path for stage in encoder.stages for block in stage]
    assert isinstance(modules[0], torch.nn.Identity)
    assert [m.drop_prob for m in modules[1:]] == pytest.approx([0.1, 0.2, 0.3])
    encoder.set_drop_path(0.0)
    assert all(isinstance(block.drop_path, torch.nn.Identity) for stage in encoder.stages for block in stage)


def test_pooled_features_are_layer_normed(encoder: ConvNeXtV2) -> None:
    with torch.no_grad():
        features = encoder.forward_head(encoder.forward_features(torch.randn(2, 3, 16, 16)), pre_logits=True)
    assert features.shape == (2, 64)
    assert features.mean(dim=1).abs().max() < 1e-5
    assert features.var(dim=1, unbiased=False).tolist() == pytest.approx([1.0, 1.0], abs=1e-3)
