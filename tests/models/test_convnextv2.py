"""The masked ConvNeXt V2 encoder: shapes, variants, and equivalence of masked-dense to sparse compute."""

from __future__ import annotations

import pytest
import timm
import torch

from mpmae.architectures import STEMS, VARIANTS, ConvNeXtSpec
from mpmae.models.convnextv2 import GRN, ConvNeXtV2

TINY = ConvNeXtSpec((1, 1, 2, 1), (8, 16, 24, 32))


def _randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights everywhere, GRN gamma/beta and biases included (they are zero at init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def test_variants_follow_the_convnext_v2_table():
    assert VARIANTS["atto"] == ConvNeXtSpec((2, 2, 6, 2), (40, 80, 160, 320))
    assert VARIANTS["tiny"] == ConvNeXtSpec((3, 3, 9, 3), (96, 192, 384, 768))
    assert len(VARIANTS) == 8
    with pytest.raises(ValueError, match="unknown ConvNeXt V2 variant"):
        ConvNeXtV2(12, "gigantic")
    with pytest.raises(ValueError, match="multiple of 8"):
        ConvNeXtV2(12, TINY, patch_size=12)


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize(("side", "patch"), [(56, 8), (112, 16), (224, 32)])
def test_atto_stage_maps_end_on_the_patch_grid(side, patch, stem):
    model = ConvNeXtV2(12, "atto", patch_size=patch, stem=stem).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 12, side, side))
    assert [tuple(m.shape[1:]) for m in maps] == [(40, 56, 56), (80, 28, 28), (160, 14, 14), (320, 7, 7)]
    assert all(torch.isfinite(m).all() for m in maps)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_and_patch_size_on_the_meta_device(variant):
    """Every size at patch sizes 8, 16 and 32, without allocating the big ones (the meta device).

    Stem kernel = stride = patch / 8, unpadded, stage depths and widths from the table, for 1, 3 or 12
    input channels; the stage maps of a 2x3-patch input, plain, masked and gathered, end on the patch
    grid. Meta ops cost about a millisecond each, so each size runs its forward at one patch size (the
    sizes take turns) and `test_atto_stage_maps_end_on_the_patch_grid` runs every patch size and stem.
    """
    spec = VARIANTS[variant]
    for i, patch in enumerate((8, 16, 32)):
        stem_k, in_chans = patch // 8, (1, 3, 12)[i]
        with torch.device("meta"):
            model = ConvNeXtV2(in_chans, variant, patch_size=patch, num_classes=5)
        conv = model.stem[0]
        assert conv.kernel_size == conv.stride == (stem_k, stem_k) and conv.padding == (0, 0)
        assert model.initial_conv[0].weight.shape == (spec.dims[0], in_chans, 3, 3)
        assert [len(stage) for stage in model.stages] == list(spec.depths)
        assert [stage[0].dwconv.weight.shape[0] for stage in model.stages] == list(spec.dims)
        assert [stage[-1].grn.gamma.shape[-1] for stage in model.stages] == [4 * d for d in spec.dims]
        if i != list(VARIANTS).index(variant) % 3:
            continue
        x = torch.empty(2, in_chans, 2 * patch, 3 * patch, device="meta")
        expected = [(2, d, 2 * 8 // 2**s, 3 * 8 // 2**s) for s, d in enumerate(spec.dims)]
        assert [tuple(m.shape) for m in model.forward_intermediates(x)] == expected
        mask = torch.zeros(2, 2, 3, device="meta")
        assert [tuple(m.shape) for m in model.forward_intermediates(x, mask, 3)] == expected
        assert tuple(model.head(model.norm(torch.empty(2, spec.dims[-1], device="meta"))).shape) == (2, 5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_original_stem_variants_have_timm_convnextv2_parameter_counts(variant):
    with torch.device("meta"):
        ours = ConvNeXtV2(3, variant, patch_size=32, stem="original", num_classes=1000)
        theirs = timm.create_model(f"convnextv2_{variant}", pretrained=False)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    assert ours.stem_orig[0].weight.shape == (VARIANTS[variant].dims[0], 3, 4, 4)


def _timm_to_ours(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """A timm ConvNeXt (V2) state-dict entry on this package's layout."""
    parts = key.split(".")
    if parts[0] == "stem":
        return f"stem_orig.{parts[1]}.{parts[2]}", value
    if parts[0] == "head":
        return f"{ {'norm': 'norm', 'fc': 'head'}[parts[1]]}.{parts[2]}", value
    if parts[2] == "downsample":
        return f"downsample_layers.{int(parts[1]) - 1}.{parts[3]}.{parts[4]}", value
    block, layer, name = f"stages.{parts[1]}.{parts[3]}", ".".join(parts[4:-1]), parts[-1]
    if layer == "mlp.grn":
        return f"{block}.grn.{ {'weight': 'gamma', 'bias': 'beta'}[name]}", value.view(1, 1, 1, -1)
    mine = {"conv_dw": "dwconv", "norm": "norm", "mlp.fc1": "pwconv1", "mlp.fc2": "pwconv2"}[layer]
    return f"{block}.{mine}.{name}", value.flatten(1) if value.ndim == 4 and mine != "dwconv" else value


def test_unmasked_original_stem_encoder_is_timm_convnextv2():
    """The fine-tuning backbone without a mask is ConvNeXt V2 itself (timm's, with the same weights)."""
    theirs = timm.models.convnext.ConvNeXt(
        in_chans=5, num_classes=7, depths=TINY.depths, dims=TINY.dims, patch_size=4, use_grn=True,
        ls_init_value=None,
    ).eval()
    _randomise(theirs)
    ours = ConvNeXtV2(5, TINY, patch_size=32, num_classes=7, stem="original").eval()
    ours.load_state_dict(dict(_timm_to_ours(k, v) for k, v in theirs.state_dict().items()))
    x = torch.randn(2, 5, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-4)
        stages = theirs.forward_intermediates(x, intermediates_only=True)
        for a, b in zip(ours.forward_intermediates(x), stages, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_original_stem_layout_and_validation():
    model = ConvNeXtV2(7, TINY, patch_size=32, stem="original")
    conv = model.stem_orig[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (7, 8, (4, 4), (4, 4))
    assert not hasattr(model, "initial_conv") and not hasattr(model, "stem")
    # the reference's original stem is unpadded too: its patch grid holds at patch size 8
    reference = ConvNeXtV2(7, TINY, patch_size=8, stem="original", architecture="reference")
    assert reference.forward_intermediates(torch.randn(1, 7, 56, 56))[-1].shape[-2:] == (7, 7)
    with pytest.raises(ValueError, match="stem must be one of"):
        ConvNeXtV2(7, TINY, stem="patchify")


def test_features_only_backbone_returns_the_four_stage_maps():
    """The U-Net backbone call: four unmasked stage maps; an all-visible mask changes nothing."""
    model = _randomise(ConvNeXtV2(12, TINY, patch_size=16, features_only=True))
    x = torch.randn(2, 12, 64, 48)
    with torch.no_grad():
        maps = model(x)
        visible = model.forward_intermediates(x, torch.zeros(2, 4, 3))
    assert [tuple(m.shape) for m in maps] == [(2, 8, 32, 24), (2, 16, 16, 12), (2, 24, 8, 6), (2, 32, 4, 3)]
    for a, b in zip(maps, visible, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not hasattr(model, "norm") and not hasattr(model, "head")
    with pytest.raises(RuntimeError, match="features_only"):
        model.forward_head(model.forward_features(x))


def test_features_and_classifier_head():
    model = ConvNeXtV2(12, TINY, patch_size=8, num_classes=10).eval()
    x = torch.randn(3, 12, 32, 32)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model(x)
    assert features.shape == (3, 32) and logits.shape == (3, 10)
    # pooled, then LayerNormed with identity affine at init
    torch.testing.assert_close(features.mean(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, model.head(features))


@pytest.mark.parametrize("stem", STEMS)
def test_masked_sites_are_zero_at_every_stage(stem):
    model = _randomise(ConvNeXtV2(12, TINY, patch_size=16, stem=stem))
    mask = (torch.rand(2, 6, 6) > 0.5).float()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(2, 12, 96, 96), mask)
    for m in maps:
        scale = m.shape[-1] // 6
        hidden = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2).unsqueeze(1).bool()
        assert (m.masked_select(hidden) == 0).all()
        assert (m.masked_select(~hidden) != 0).any()


@pytest.mark.parametrize(("stem", "patch"), [("modified", 8), ("modified", 16), ("original", 16)])
def test_masked_encoder_equals_the_dense_encoder_on_the_visible_crop(stem, patch):
    """Sparse semantics: nothing outside the visible sites matters, not even the image border.

    A 4x4-patch image, fully visible, must give the same features as the same image pasted into a larger
    canvas whose other patches are masked and hold random values. This needs re-masking after every
    spatial op (bias leakage), GRN statistics over visible sites only, and "same" padding (an inactive
    border). The reference's input-only masking fails it.
    """
    model = _randomise(ConvNeXtV2(12, TINY, patch_size=patch, stem=stem))
    p = patch
    crop = torch.randn(2, 12, 4 * p, 4 * p)
    canvas = torch.randn(2, 12, 8 * p, 8 * p) * 5
    canvas[:, :, 2 * p:6 * p, 3 * p:7 * p] = crop  # patch offset (2, 3)
    mask = torch.ones(2, 8, 8)
    mask[:, 2:6, 3:7] = 0
    with torch.no_grad():
        alone = model.forward_intermediates(crop)
        embedded = model.forward_intermediates(canvas, mask)
    for a, e in zip(alone, embedded, strict=True):
        s = a.shape[-1] // 4  # cells per patch at this stage
        torch.testing.assert_close(e[..., 2 * s:6 * s, 3 * s:7 * s], a, atol=1e-4, rtol=1e-4)

    reference = _randomise(ConvNeXtV2(12, TINY, patch_size=16, architecture="reference", stem=stem))
    with torch.no_grad():
        hidden = reference.forward_intermediates(canvas, torch.ones(2, p // 2, p // 2))[-1]
    assert hidden.abs().sum() > 0  # input-only masking lets biases through masked sites


@pytest.mark.parametrize("stem", STEMS)
def test_visible_features_ignore_masked_content(stem):
    model = _randomise(ConvNeXtV2(12, TINY, patch_size=16, stem=stem))
    x = torch.randn(2, 12, 96, 96)
    mask = (torch.rand(2, 6, 6) > 0.4).float()
    changed = x + 10 * torch.randn_like(x) * mask.repeat_interleave(16, 1).repeat_interleave(16, 2)[:, None]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(changed, mask)[-1],
                                   model.forward_intermediates(x, mask)[-1])


def test_grn_statistics_use_visible_positions_per_sample():
    grn = GRN(4, eps=1e-6)
    with torch.no_grad():
        grn.gamma.fill_(0.5)
        grn.beta.fill_(0.1)
    x = torch.randn(2, 5, 5, 4)
    visible = (torch.rand(2, 5, 5, 1) > 0.5).float()
    y = grn(x, visible)
    g = (x * visible).square().sum(dim=(1, 2), keepdim=True).sqrt()
    expected = 0.5 * x * g / (g.mean(-1, keepdim=True) + 1e-6) + 0.1 + x
    torch.testing.assert_close(y, expected)
    x2 = x + 100 * (1 - visible) * torch.randn_like(x)
    torch.testing.assert_close(grn(x2, visible) * visible, y * visible)
    y_first = grn(x[:1], visible[:1])
    torch.testing.assert_close(y_first, y[:1])  # no batch-wide statistics


@pytest.mark.parametrize("stem", STEMS)
def test_gathered_blocks_compute_the_dense_masked_result(stem):
    """With an equal visible count per sample the blocks run on visible sites only: same values, grads."""
    model = _randomise(ConvNeXtV2(12, TINY, patch_size=16, stem=stem))
    x = torch.randn(3, 12, 64, 64)
    mask = torch.ones(3, 16)
    for row in mask:
        row[torch.randperm(16)[:6]] = 0
    results = []
    for num_visible in (None, 6):
        model.zero_grad()
        maps = model.forward_intermediates(x, mask.view(3, 4, 4), num_visible)
        sum(m.square().mean() for m in maps).backward()
        results.append((maps, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (dense, dense_grads), (gathered, gathered_grads) = results
    for d, g in zip(dense + dense_grads, gathered + gathered_grads, strict=True):
        torch.testing.assert_close(g, d, atol=1e-5, rtol=1e-4)
