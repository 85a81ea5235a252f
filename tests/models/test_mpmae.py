"""MPMAE: batch contract, output shapes from the registry, masking, decoder sharing, losses, autocast."""

from __future__ import annotations

import pytest
import torch

from mpmae.config import ModelConfig
from mpmae.modalities import MODALITIES, PRESETS, TASK_ORDER, resolve_selection
from mpmae.models import MPMAE, ConvNeXtSpec, random_mask

TINY = ConvNeXtSpec((1, 1, 1, 1), (8, 16, 24, 32))


def make_batch(n: int = 2, side: int = 32, selection="all_mod", seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch as the data layer delivers it, with no-data in every form it can take."""
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for name, bands in resolve_selection(selection).items():
        m = MODALITIES[name]
        if m.encoding == "one_hot":
            batch[name] = torch.eye(m.num_classes, dtype=torch.long)[torch.randint(m.num_classes, (n,), generator=gen)]
        elif m.encoding == "label_map":
            batch[name] = torch.randint(-1, m.num_classes, (n, 1, side, side), generator=gen)
        elif m.level == "pixel":
            batch[name] = torch.randn(n, len(bands), side, side, generator=gen)
            batch[name][:, :, :3, :5] = float("nan")
        else:
            batch[name] = torch.randn(n, len(bands), generator=gen)
            batch[name][0, 0] = float("nan")
    return batch


def tiny(**kwargs):
    return MPMAE(ModelConfig(**{"arch": TINY, "decoder_dim": 16, **kwargs}))


@pytest.mark.parametrize(("side", "patch"), [(56, 8), (112, 16)])
def test_atto_outputs_follow_the_registry(side, patch):
    model = MPMAE(ModelConfig(arch="atto", patch_size=patch)).eval()
    with torch.no_grad():
        out = model(make_batch(2, side))
    assert list(out.task_losses) == list(TASK_ORDER)
    for task in TASK_ORDER:
        m = MODALITIES[task]
        k = m.output_channels(PRESETS["all_mod"][task])
        shape = (2, 49, patch * patch * k) if m.level == "pixel" else (2, k)
        assert out.preds[task].shape == shape, task
        assert torch.isfinite(out.task_losses[task]), task
    assert out.preds["eco_region"].shape[1] == MODALITIES["eco_region"].num_classes == 846
    assert out.preds["esa_worldcover"].shape[2] == patch * patch * 11
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert (out.mask.sum(dim=1) == 49 - 19).all()


def test_random_mask_counts_and_reproducibility():
    mask = random_mask(5, 49, 0.6, generator=torch.Generator().manual_seed(3))
    assert mask.shape == (5, 49) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert (mask.sum(dim=1) == 30).all()
    again = random_mask(5, 49, 0.6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mask, again)
    assert not torch.equal(mask[0], mask[1])


def test_given_mask_is_used_and_returned():
    model = tiny().eval()
    mask = torch.zeros(2, 16)
    mask[:, :5] = 1
    with torch.no_grad():
        out = model(make_batch(2, 32), mask=mask)
    assert torch.equal(out.mask, mask)


def test_every_parameter_gets_a_gradient():
    """No parameter is left unused (DistributedDataParallel would stop on one)."""
    model = tiny()
    out = model(make_batch(2, 32))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def _count_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_shared_trunk_runs_once_for_all_tasks():
    model = tiny().eval()
    assert list(model.decoder) == ["shared"] and list(model.image_norm) == ["shared"]
    calls = _count_calls(model.decoder["shared"])
    with torch.no_grad():
        model(make_batch(2, 32))
    assert calls == [1]


def test_per_task_decoders_have_their_own_weights():
    model = tiny(decoder="per_task").eval()
    assert list(model.decoder) == list(TASK_ORDER)
    assert model.decoder["sentinel2"][0].pwconv1.weight is not model.decoder["lat"][0].pwconv1.weight
    assert "sentinel2" not in model.image_norm and "lat" in model.image_norm
    calls = {t: _count_calls(model.decoder[t]) for t in TASK_ORDER}
    with torch.no_grad():
        out = model(make_batch(2, 32))
    assert all(c == [1] for c in calls.values())
    assert torch.isfinite(out.loss)


def test_presets_shape_input_and_heads():
    model = tiny(targets="rgb")
    assert model.tasks == ["sentinel2"] and model.encoder.initial_conv[0].in_channels == 3
    assert model.heads["sentinel2"].out_features == 8 * 8 * 3
    assert list(model.image_norm) == []
    img = tiny(targets="img_mod")
    assert img.tasks == ["sentinel2", "era5", "lat", "lon", "biome", "eco_region", "month"]
    with torch.no_grad():
        out = img.eval()(make_batch(2, 32, "img_mod"))
    assert set(out.preds) == set(img.tasks)


def test_empty_task_contributes_nothing_to_the_uncertainty_total():
    model = tiny().eval()
    with torch.no_grad():
        model.loss_fn.log_vars.copy_(torch.linspace(-1, 1, 12))
    batch = make_batch(2, 32)
    batch["dynamic_world"] = torch.full_like(batch["dynamic_world"], -1)
    with torch.no_grad():
        out = model(batch)
    assert out.task_losses["dynamic_world"].item() == 0.0
    s = model.log_vars
    expected = sum(torch.exp(-s[t]) * out.task_losses[t] + s[t] for t in TASK_ORDER if t != "dynamic_world")
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_no_data_is_sanitised_in_the_input_and_ignored_in_targets():
    model = tiny().eval()
    batch = make_batch(2, 32)
    mask = torch.ones(2, 16)
    changed = dict(batch)
    changed["sentinel2"] = batch["sentinel2"].nan_to_num(0.0)  # NaN input means 0, the band mean
    changed["sentinel1"] = batch["sentinel1"].nan_to_num(float("inf"))  # no-data either way
    with torch.no_grad():
        out = model(batch, mask=mask)
        same = model(changed, mask=mask)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(same.preds["sentinel2"], out.preds["sentinel2"], rtol=0, atol=0)
    torch.testing.assert_close(same.task_losses["sentinel1"], out.task_losses["sentinel1"], rtol=0, atol=0)
    # the S2 target is the raw tensor: its NaN pixels are ignored, zeros are scored
    assert same.task_losses["sentinel2"] != out.task_losses["sentinel2"]


def test_any_patch_multiple_side_and_validation_errors():
    model = tiny().eval()
    with torch.no_grad():
        out = model(make_batch(2, 48))
    assert out.preds["sentinel2"].shape == (2, 36, 64 * 12)
    wide = make_batch(2, 32)
    wide = {k: torch.cat([v, v[..., :16]], dim=-1) if v.ndim == 4 else v for k, v in wide.items()}
    with torch.no_grad():
        assert model(wide).preds["aster"].shape == (2, 24, 64 * 2)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model(make_batch(2, 36))
    batch = make_batch(2, 32)
    del batch["biome"]
    with pytest.raises(ValueError, match="lacks pretext targets \\['biome'\\]"):
        model(batch)
    with pytest.raises(ValueError, match="mask must have shape"):
        model(make_batch(2, 32), mask=torch.zeros(2, 49))
    with pytest.raises(ValueError, match="must contain 'sentinel2'"):
        tiny(targets=["sentinel1"])
    with pytest.raises(ValueError, match="decoder must be"):
        tiny(decoder="split")


def test_reference_architecture_refuses_patch_8_masking():
    model = tiny(architecture="reference").eval()
    with pytest.raises(ValueError, match="encoder grid"):
        model(make_batch(2, 32))


def test_log_vars_and_other_aggregations():
    assert list(tiny().log_vars) == list(TASK_ORDER)
    unweighted = tiny(loss="unweighted").eval()
    assert unweighted.log_vars == {}
    with torch.no_grad():
        out = unweighted(make_batch(2, 32))
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.task_losses.values()), rel=1e-6)


def test_channels_last_model_gives_the_same_outputs():
    model = tiny().eval()
    batch = make_batch(2, 32)
    mask = random_mask(2, 16, 0.6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(batch, mask=mask)
        model.to(memory_format=torch.channels_last)
        fast = model(batch, mask=mask)
    torch.testing.assert_close(fast.loss, plain.loss)


def test_bf16_autocast_trains():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(make_batch(2, 32))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_drawn_masks_take_the_gathered_path_with_the_same_result():
    model = tiny(patch_size=8).eval()
    with torch.no_grad():
        model.encoder.stages[0][0].grn.beta.fill_(0.5)  # makes masked-site garbage visible if it leaked
        drawn = model(make_batch(2, 32))
        given = model(make_batch(2, 32), mask=drawn.mask)
    torch.testing.assert_close(drawn.loss, given.loss)
    for task in TASK_ORDER:
        torch.testing.assert_close(drawn.preds[task], given.preds[task], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("stem", ["modified", "original"])
@pytest.mark.parametrize("patch", [8, 16, 32])
def test_every_patch_size_and_stem_predicts_on_the_patch_grid(patch, stem):
    model = tiny(patch_size=patch, stem=stem).eval()
    with torch.no_grad():
        out = model(make_batch(2, 2 * patch))
    for task in TASK_ORDER:
        m = MODALITIES[task]
        k = m.output_channels(PRESETS["all_mod"][task])
        assert out.preds[task].shape == ((2, 4, patch * patch * k) if m.level == "pixel" else (2, k)), task
    assert torch.isfinite(out.loss) and (out.mask.sum(dim=1) == 4 - 1).all()


def _nontrivial(model: torch.nn.Module) -> torch.nn.Module:
    """Non-zero biases, GRN and mask token, so that anything leaking through a masked site would show."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _run_recording_stages(model, batch, mask, seed):
    """The model's output and the four encoder stage maps it computed (hooks on each stage's last block)."""
    maps = []
    hooks = [stage[-1].register_forward_hook(lambda _m, _i, out: maps.append(out))
             for stage in model.encoder.stages]
    torch.manual_seed(seed)  # the drawn mask
    with torch.no_grad():
        out = model(batch, mask=mask)
    for hook in hooks:
        hook.remove()
    return out, maps


@pytest.mark.parametrize("stem", ["modified", "original"])
@pytest.mark.parametrize("path", ["given", "drawn"])
def test_masked_pixels_change_no_prediction_and_no_visible_encoder_output(path, stem):
    """The issue's mask-invariance test, through the whole model.

    Sentinel-2 pixels inside masked patches are replaced by large noise (and NaN): every prediction,
    pixel- and image-level, and every encoder stage map at visible sites stay the same; the Sentinel-2
    loss may change (masked pixels are its target). Both the dense masked path (a given mask of unequal
    counts per sample) and the gathered path (a mask drawn with a fixed seed) are covered. Changing one
    visible pixel must change the encoder's visible output and every prediction, so the test can fail.
    """
    model = _nontrivial(tiny(patch_size=16, stem=stem))
    batch = make_batch(2, 64, seed=1)
    grid, p = 4, 16
    if path == "given":
        mask = (torch.rand(2, grid * grid, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    else:
        mask = None
    base, base_maps = _run_recording_stages(model, batch, mask, seed=3)
    drawn = base.mask
    pixels = drawn.view(2, 1, grid, grid).repeat_interleave(p, 2).repeat_interleave(p, 3).bool()

    changed = dict(batch)
    noise = 100 * torch.randn_like(batch["sentinel2"])
    noise[:, 3, ::7, ::5] = float("nan")
    changed["sentinel2"] = torch.where(pixels, noise, batch["sentinel2"])
    same, same_maps = _run_recording_stages(model, changed, mask, seed=3)
    assert torch.equal(same.mask, drawn)
    for task in TASK_ORDER:
        torch.testing.assert_close(same.preds[task], base.preds[task], rtol=0, atol=0, msg=task)
    for a, b in zip(same_maps, base_maps, strict=True):
        visible = (1 - drawn).view(2, 1, grid, grid)
        visible = visible.repeat_interleave(a.shape[-1] // grid, 2).repeat_interleave(a.shape[-1] // grid, 3)
        torch.testing.assert_close(a * visible, b * visible, rtol=0, atol=0)
        assert (a * visible).abs().sum() > 0

    # one visible pixel (in every sample) changes the visible encoder output and every prediction
    row, col = divmod(int((drawn[0] == 0).nonzero()[0]), grid)
    poked = dict(batch)
    poked["sentinel2"] = batch["sentinel2"].clone()
    poked["sentinel2"][:, :, row * p + 5, col * p + 7] += 3.0
    row1, col1 = divmod(int((drawn[1] == 0).nonzero()[0]), grid)
    poked["sentinel2"][1, :, row1 * p + 2, col1 * p + 9] -= 3.0
    moved, moved_maps = _run_recording_stages(model, poked, mask, seed=3)
    assert torch.equal(moved.mask, drawn)
    assert not torch.equal(moved_maps[-1], base_maps[-1])
    for task in TASK_ORDER:
        for i in range(2):
            assert not torch.equal(moved.preds[task][i], base.preds[task][i]), (task, i)
