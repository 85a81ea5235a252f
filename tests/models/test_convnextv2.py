"""The masked ConvNeXt V2 encoder: shapes, variants, and equivalence of masked-dense to sparse compute."""

from __future__ import annotations

import pytest
import torch

from mpmae.models.convnextv2 import GRN, VARIANTS, ConvNeXtSpec, ConvNeXtV2

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


@pytest.mark.parametrize(("side", "patch"), [(56, 8), (112, 16)])
def test_atto_stage_maps_end_on_the_patch_grid(side, patch):
    model = ConvNeXtV2(12, "atto", patch_size=patch).eval()
    with torch.no_grad():
        maps = model.forward_stages(torch.randn(2, 12, side, side))
    assert [tuple(m.shape[1:]) for m in maps] == [(40, 56, 56), (80, 28, 28), (160, 14, 14), (320, 7, 7)]


def test_features_and_classifier_head():
    model = ConvNeXtV2(12, TINY, patch_size=8, num_classes=10).eval()
    x = torch.randn(3, 12, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    assert features.shape == (3, 32) and logits.shape == (3, 10)
    # pooled, then LayerNormed with identity affine at init
    torch.testing.assert_close(features.mean(dim=1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, model.head(features))


def test_masked_sites_are_zero_at_every_stage():
    model = _randomise(ConvNeXtV2(12, TINY, patch_size=8))
    mask = (torch.rand(2, 6, 6) > 0.5).float()
    with torch.no_grad():
        maps = model.forward_stages(torch.randn(2, 12, 48, 48), mask)
    for m in maps:
        scale = m.shape[-1] // 6
        hidden = mask.repeat_interleave(scale, 1).repeat_interleave(scale, 2).unsqueeze(1).bool()
        assert (m.masked_select(hidden) == 0).all()
        assert (m.masked_select(~hidden) != 0).any()


def test_masked_encoder_equals_the_dense_encoder_on_the_visible_crop():
    """Sparse semantics: nothing outside the visible sites matters, not even the image border.

    A 4x4-patch image, fully visible, must give the same features as the same image pasted into a larger
    canvas whose other patches are masked and hold random values. This needs re-masking after every
    spatial op (bias leakage), GRN statistics over visible sites only, and "same" padding (an inactive
    border). The reference's input-only masking fails it.
    """
    model = _randomise(ConvNeXtV2(12, TINY, patch_size=8))
    crop = torch.randn(2, 12, 32, 32)
    canvas = torch.randn(2, 12, 64, 64) * 5
    canvas[:, :, 16:48, 24:56] = crop  # patch offset (2, 3)
    mask = torch.ones(2, 8, 8)
    mask[:, 2:6, 3:7] = 0
    with torch.no_grad():
        alone = model.forward_stages(crop)
        embedded = model.forward_stages(canvas, mask)
    for a, e in zip(alone, embedded, strict=True):
        s = a.shape[-1] // 4  # cells per patch at this stage
        torch.testing.assert_close(e[..., 2 * s:6 * s, 3 * s:7 * s], a, atol=1e-4, rtol=1e-4)

    reference = _randomise(ConvNeXtV2(12, TINY, patch_size=16, architecture="reference"))
    with torch.no_grad():
        hidden = reference.forward_stages(canvas, torch.ones(2, 4, 4))[-1]
    assert hidden.abs().sum() > 0  # input-only masking lets biases through masked sites


def test_visible_features_ignore_masked_content():
    model = _randomise(ConvNeXtV2(12, TINY, patch_size=8))
    x = torch.randn(2, 12, 48, 48)
    mask = (torch.rand(2, 6, 6) > 0.4).float()
    changed = x + 10 * torch.randn_like(x) * mask.repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None]
    with torch.no_grad():
        torch.testing.assert_close(model.forward_stages(changed, mask)[-1], model.forward_stages(x, mask)[-1])


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


def test_gathered_blocks_compute_the_dense_masked_result():
    """With an equal visible count per sample the blocks run on visible sites only: same values, grads."""
    model = _randomise(ConvNeXtV2(12, TINY, patch_size=16))
    x = torch.randn(3, 12, 64, 64)
    mask = torch.ones(3, 16)
    for row in mask:
        row[torch.randperm(16)[:6]] = 0
    results = []
    for num_visible in (None, 6):
        model.zero_grad()
        maps = model.forward_stages(x, mask.view(3, 4, 4), num_visible)
        sum(m.square().mean() for m in maps).backward()
        results.append((maps, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (dense, dense_grads), (gathered, gathered_grads) = results
    for d, g in zip(dense + dense_grads, gathered + gathered_grads, strict=True):
        torch.testing.assert_close(g, d, atol=1e-5, rtol=1e-4)
