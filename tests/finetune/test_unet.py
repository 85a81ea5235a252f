from __future__ import annotations

import pytest
import torch

from mpmae.architectures import ConvNeXtSpec
from mpmae.finetune.finetune import Finetuner
from mpmae.models.convnextv2 import ConvNeXtV2
from mpmae.models.unet import UNet
from tests.crafted.tiny import TINY, recipe, tiny_encoder


@pytest.mark.parametrize(("patch_size", "size"), [(8, (32, 32)), (16, (32, 48)), (8, (36, 20))])
def test_output_at_input_resolution(patch_size: int, size: tuple[int, int]) -> None:
    model = UNet(tiny_encoder(patch_size=patch_size), num_classes=5)
    with torch.no_grad():
        assert model(torch.randn(2, 3, *size)).shape == (2, 5, *size)


def test_skips_are_initial_conv_and_every_stage() -> None:
    model = UNet(tiny_encoder(patch_size=16), num_classes=2)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        maps = model.encode(x)
        stages = model.encoder.forward_intermediates(x)
    assert [tuple(m.shape[1:]) for m in maps] == [(8, 32, 32), (8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]
    for ours, theirs in zip(maps[1:], stages, strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6)
    assert not any(name.startswith("encoder.norm") for name, _ in model.named_parameters())


def test_decoder_channels_for_atto() -> None:
    model = UNet(ConvNeXtV2(4, "atto", 8, features_only=True), num_classes=7)
    convs = [m for m in [*model.up.modules(), *model.fuse.modules()] if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(320, 160), (320, 80), (160, 40), (80, 40), (80, 20)]
    assert (model.head.in_channels, model.head.out_channels) == (20, 7)


def test_reference_padding_rejected() -> None:
    with pytest.raises(ValueError, match="padding"):
        UNet(ConvNeXtV2(3, TINY, 16, features_only=True, architecture="reference"), 2)


def test_phase_one_freezes_encoder_then_phase_two_trains_it_with_layer_decay() -> None:
    model = UNet(tiny_encoder(), num_classes=3)
    modes: list[bool] = []
    model.encoder.stages[0][0].register_forward_hook(lambda module, args, out: modes.append(module.training))
    config = recipe(epochs=2, lr=1e-3, freeze_epochs=1, layer_decay=0.5)
    wrapped: list[bool] = []  # whether the encoder trains when the model gets wrapped

    def wrap(module: torch.nn.Module) -> torch.nn.Module:
        wrapped.append(module.encoder.stages[0][0].dwconv.weight.requires_grad)
        return torch.nn.Sequential(module)

    finetuner = Finetuner(model, config, "segmentation", 3, steps_per_epoch=1, wrap=wrap)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    decoder_before = model.head.weight.clone()
    batch = [(torch.randn(2, 3, 16, 16), torch.randint(0, 3, (2, 16, 16)))]

    finetuner.train_epoch(batch)
    assert modes == [False]
    assert all(p.grad is None and not p.requires_grad for p in model.encoder.parameters())
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(model.head.weight, decoder_before)
    assert {g["layer_id"] for g in finetuner.optimizer.param_groups} == {5}

    finetuner.train_epoch(batch)
    assert modes == [False, True]
    assert wrapped == [False, True] and finetuner.net[0] is model  # re-wrapped once the encoder trains
    assert not torch.equal(model.encoder.stages[0][0].pwconv1.weight, encoder_before["stages.0.0.pwconv1.weight"])
    groups = finetuner.optimizer.param_groups
    assert {g["layer_id"] for g in groups} == set(range(6))
    decayed = [g for g in groups if g["layer_id"] == 0 and g["weight_decay"] > 0]
    assert decayed and decayed[0]["lr_scale"] == pytest.approx(0.5 ** 5)

    resumed = Finetuner(UNet(tiny_encoder(seed=1), num_classes=3), config, "segmentation", 3, steps_per_epoch=1)
    resumed.load_state_dict(finetuner.state_dict())
    assert not resumed.encoder_frozen
    assert len(resumed.optimizer.param_groups) == len(groups)


def test_tiny_unet_overfits_segmentation() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (4, 4, 4)).repeat_interleave(4, 1).repeat_interleave(4, 2)  # 4x4 blocks
    x = (2 * torch.randn(3, 3))[target].permute(0, 3, 1, 2) + 0.1 * torch.randn(4, 3, 16, 16)  # colour per class
    encoder = ConvNeXtV2(3, ConvNeXtSpec((1, 1, 1, 1), (16, 32, 64, 128)), 8, features_only=True)
    config = recipe(epochs=80, lr=1e-2, weight_decay=0.0)
    finetuner = Finetuner(UNet(encoder, num_classes=3), config, "segmentation", 3, steps_per_epoch=1)
    before = finetuner.evaluate([(x, target)])
    for _ in range(config.epochs):
        finetuner.train_epoch([(x, target)])
    after = finetuner.evaluate([(x, target)])
    assert after["loss"] < 0.2 * before["loss"]
    assert before["metric"] < 0.5
    assert after["metric"] > 0.98
