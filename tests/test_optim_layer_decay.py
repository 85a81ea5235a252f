from __future__ import annotations

import pytest
import torch

from mpmae.models import Classifier, ConvNeXtV2, UNet
from mpmae.optim import WarmupCosine, apply_lr, param_groups

ATTO = (2, 2, 6, 2)


@pytest.mark.parametrize(("name", "expected"), [
    ("encoder.initial_conv.0.weight", 0),
    ("encoder.stem.0.weight", 0),
    ("encoder.stem_orig.1.bias", 0),
    ("encoder.stages.0.0.dwconv.weight", 1),
    ("encoder.stages.0.1.grn.gamma", 2),
    ("encoder.downsample_layers.0.1.weight", 3),  # before stage 1: its first block's id
    ("encoder.stages.1.0.pwconv1.weight", 3),
    ("encoder.stages.1.1.norm.weight", 4),
    ("encoder.downsample_layers.1.0.weight", 5),
    ("encoder.stages.2.5.pwconv2.bias", 10),
    ("encoder.downsample_layers.2.1.weight", 11),
    ("encoder.stages.3.1.dwconv.weight", 12),
    ("norm.weight", 13),
    ("head.weight", 13),
    ("up.0.1.weight", 13),
])
def test_atto_layer_ids(name: str, expected: int) -> None:
    encoder = ConvNeXtV2(4, "atto", 8, features_only=True)
    assert encoder.depths == ATTO
    assert Classifier(encoder, 3).layer_id(name) == UNet(encoder, 3).layer_id(name) == expected


def test_layer_id_without_prefix_for_a_plain_classifier() -> None:
    encoder = ConvNeXtV2(4, "atto", 8, num_classes=3)
    assert encoder.layer_id("stem.0.weight") == 0
    assert encoder.layer_id("head.weight") == 13


def test_atto_groups_scales_and_weight_decay() -> None:
    model = Classifier(ConvNeXtV2(4, "atto", 8, features_only=True), num_classes=3)
    groups = param_groups(model, weight_decay=0.3, layer_decay=0.9)
    assert sorted({g["layer_id"] for g in groups}) == list(range(14))
    for g in groups:
        assert g["lr_scale"] == pytest.approx(0.9 ** (13 - g["layer_id"]))
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)
    expectations = {  # name: (lr_scale, weight_decay)
        "encoder.initial_conv.0.weight": (0.9 ** 13, 0.3),
        "encoder.initial_conv.0.bias": (0.9 ** 13, 0.0),
        "encoder.downsample_layers.2.1.weight": (0.9 ** 2, 0.3),
        "encoder.stages.3.1.grn.gamma": (0.9, 0.0),
        "encoder.stages.3.1.norm.weight": (0.9, 0.0),
        "encoder.stages.3.1.pwconv1.weight": (0.9, 0.3),
        "head.weight": (1.0, 0.3),
        "norm.weight": (1.0, 0.0),
    }
    for name, (scale, decay) in expectations.items():
        group = by_param[id(named[name])]
        assert (group["lr_scale"], group["weight_decay"]) == (pytest.approx(scale), decay), name


def test_frozen_parameters_are_left_out() -> None:
    model = Classifier(ConvNeXtV2(4, "atto", 8, features_only=True), num_classes=3)
    model.encoder.requires_grad_(False)
    groups = param_groups(model, weight_decay=0.3, layer_decay=0.9)
    assert {g["layer_id"] for g in groups} == {13}
    assert sum(len(g["params"]) for g in groups) == 4  # norm weight/bias, head weight/bias


def test_warmup_cosine_values() -> None:
    schedule = WarmupCosine(lr=1.0, min_lr=1e-6, total_steps=110, warmup_steps=10)
    assert schedule(0) == 0.0
    assert schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(60) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert schedule(110) == schedule(500) == pytest.approx(1e-6)


def test_apply_lr_scales_each_group() -> None:
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [a], "lr_scale": 0.5}, {"params": [b]}], lr=1.0)
    apply_lr(optimizer, 0.2)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(0.1), pytest.approx(0.2)]
