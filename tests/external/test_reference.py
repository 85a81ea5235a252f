"""The reference architecture against the upstream golden outputs, and the checkpoint key converter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mpmae.config import ModelConfig
from mpmae.modalities import TASK_ORDER
from mpmae.models import (
    MPMAE,
    ConvNeXtSpec,
    ConvNeXtV2,
    convert_reference_state_dict,
    load_reference_state_dict,
)
from mpmae.pretext_losses import UncertaintyWeighting, patchify
from tests.crafted.reference import to_minkowski

#: The golden run's targets with no-data: the reference regressed them to 0, we ignore them.
NAN_TASKS = ("sentinel1", "canopy_height_eth")


@pytest.fixture(scope="module")
def golden(realdata: Path) -> dict[str, np.ndarray]:
    with np.load(realdata / "golden" / "golden_fcmae_tiny.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def manifest(realdata: Path) -> dict[str, dict[str, list[int]]]:
    return json.loads((realdata / "golden" / "manifest_convnextv2_atto.json").read_text())


def _golden_model(golden, **overrides):
    cfg = json.loads(str(golden["config"]))
    assert cfg["out_modalities"] == list(TASK_ORDER) and cfg["loss_aggr"] == "uncertainty"
    kwargs = dict(
        arch=ConvNeXtSpec(tuple(cfg["depths"]), tuple(cfg["dims"])), patch_size=cfg["patch_size"],
        decoder_dim=cfg["decoder_embed_dim"], decoder_depth=cfg["decoder_depth"], targets="all_mod",
        architecture="reference", norm_pix_loss=False,  # FCMAE's constructor default, used by the golden run
    )
    model = MPMAE(ModelConfig(**{**kwargs, **overrides}))
    state = {k.removeprefix("sd/"): torch.from_numpy(v) for k, v in golden.items() if k.startswith("sd/")}
    load_reference_state_dict(model, state)
    return model.eval()


def _as_patches(pred: np.ndarray) -> torch.Tensor:
    """Reference pixel predictions (N, p*p*K, h, w) in our (N, L, p*p*K) layout."""
    t = torch.from_numpy(pred)
    return t.flatten(2).transpose(1, 2) if t.ndim == 4 else t


@pytest.fixture(scope="module")
def golden_run(golden):
    model = _golden_model(golden)
    batch = {k.removeprefix("in/"): torch.from_numpy(v) for k, v in golden.items() if k.startswith("in/")}
    with torch.no_grad():
        return model, model(batch, mask=torch.from_numpy(golden["mask"]))


def test_golden_predictions(golden, golden_run):
    _, out = golden_run
    assert sorted(out.preds) == sorted(TASK_ORDER)
    for task, pred in out.preds.items():
        expected = _as_patches(golden[f"pred/{task}"])
        # rtol 1e-5 of the tensor's scale: the std-1 head init gives values ~1e3 whose float32 sums
        # differ by a few ulps from the reference's kernels (worst seen: 5e-7 of the scale)
        scale = expected.abs().max().item()
        torch.testing.assert_close(pred, expected, rtol=1e-5, atol=1e-5 * scale, msg=task)


def test_golden_losses_of_tasks_without_no_data(golden, golden_run):
    _, out = golden_run
    for task in TASK_ORDER:
        if task not in NAN_TASKS:
            assert out.task_losses[task].item() == pytest.approx(float(golden[f"loss/{task}"]), rel=1e-5), task


@pytest.mark.parametrize("task", NAN_TASKS)
def test_no_data_targets_are_ignored_not_regressed_to_zero(golden, golden_run, task):
    """Our loss = MSE over the valid target values of masked patches, from the golden predictions."""
    _, out = golden_run
    p = json.loads(str(golden["config"]))["patch_size"]
    pred = _as_patches(golden[f"pred/{task}"]).double().numpy()
    target = patchify(torch.from_numpy(golden[f"in/{task}"]), p).double().numpy()
    keep = ~np.isnan(target) & (golden["mask"][..., None] == 1)
    assert np.isnan(target).any()
    expected = ((pred - target) ** 2)[keep].mean()
    assert out.task_losses[task].item() == pytest.approx(expected, rel=1e-5)
    if task == "sentinel1":  # its no-data falls in masked patches, so the reference's value differs
        assert out.task_losses[task].item() != pytest.approx(float(golden[f"loss/{task}"]), rel=0.1)


def test_golden_total_is_the_uncertainty_sum_of_our_task_losses(golden, golden_run):
    model, out = golden_run
    np.testing.assert_array_equal(model.loss_fn.log_vars.detach().numpy(), golden["log_vars"])
    assert list(model.log_vars) == list(TASK_ORDER)
    agg = UncertaintyWeighting(len(TASK_ORDER))
    with torch.no_grad():
        agg.log_vars.copy_(torch.from_numpy(golden["log_vars"]))
        total = agg(torch.stack([out.task_losses[t] for t in TASK_ORDER]))
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-6)


def _zeros(shapes: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(shape) for k, shape in shapes.items()}


@pytest.mark.parametrize("architecture", ["reference", "default"])
def test_atto_fcmae_manifest_loads_strictly(manifest, architecture):
    shapes = manifest["fcmae_convnextv2_atto_in112_p16_dec512_OUT_MODALITIES"]
    # the manifest's FCMAE was built without a loss module, so it has no loss_fn.log_vars
    model = MPMAE(ModelConfig(
        arch="atto", patch_size=16, decoder_dim=512, architecture=architecture, loss="unweighted"
    ))
    load_reference_state_dict(model, _zeros(shapes))
    converted = convert_reference_state_dict(_zeros(shapes))
    ours = model.state_dict()
    # the reference encoder's final norm and 1000-class head: untrained in masked pretraining
    assert set(converted) - set(ours) == {f"encoder.{m}.{p}" for m in ("norm", "head") for p in ("weight", "bias")}
    assert set(ours) <= set(converted)
    assert {k: tuple(v.shape) for k, v in converted.items() if k in ours} == {
        k: tuple(v.shape) for k, v in ours.items()
    }


def test_atto_classifier_manifest_loads_strictly(manifest):
    shapes = manifest["convnextv2_atto_in12_cls10_p16_img112"]
    model = ConvNeXtV2(12, "atto", patch_size=16, num_classes=10, architecture="reference")
    state = {k: torch.randn(s) for k, s in shapes.items()}
    load_reference_state_dict(model, state)
    torch.testing.assert_close(model.state_dict()["stages.2.5.grn.gamma"], state["stages.2.5.grn.gamma"])


def test_sparse_checkpoint_maps_onto_the_dense_encoder():
    source = MPMAE(ModelConfig(arch=ConvNeXtSpec((1, 1, 1, 1), (8, 16, 24, 32)), patch_size=16, decoder_dim=16))
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(torch.randn_like(p))
    ours = source.state_dict()
    sparse = {}
    for key, value in ours.items():
        if key.startswith("encoder."):
            k, v = to_minkowski(key.removeprefix("encoder."), value)
            sparse["encoder." + k] = v
    # one conv element by hand: Minkowski offset index = col * k + row
    kernel = sparse["encoder.initial_conv.0.kernel"]
    weight = ours["encoder.initial_conv.0.weight"]
    assert kernel.shape == (9, 12, 8) and kernel[2 * 3 + 1, 5, 7] == weight[7, 5, 1, 2]
    assert sparse["encoder.stages.0.0.dwconv.kernel"].shape == (49, 8)
    assert sparse["encoder.stages.0.0.grn.gamma"].shape == (1, 32)

    target = MPMAE(ModelConfig(arch=ConvNeXtSpec((1, 1, 1, 1), (8, 16, 24, 32)), patch_size=16, decoder_dim=16))
    load_reference_state_dict(target.encoder, sparse)
    for key, value in target.encoder.state_dict().items():
        torch.testing.assert_close(value, ours["encoder." + key], rtol=0, atol=0, msg=key)
    classifier = ConvNeXtV2(12, ConvNeXtSpec((1, 1, 1, 1), (8, 16, 24, 32)), patch_size=16, num_classes=5)
    with pytest.raises(ValueError, match="missing .*head.weight"):
        load_reference_state_dict(classifier, sparse)
    load_reference_state_dict(classifier, sparse, ignore=("norm.", "head."))
    torch.testing.assert_close(classifier.stem[0].weight, ours["encoder.stem.0.weight"], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_original_stem_checkpoints_map_onto_stem_orig(layout):
    """The reference's ``--use_orig_stem`` encoder (``stem_orig.*``), dense or MinkowskiEngine keys."""
    spec = ConvNeXtSpec((1, 1, 1, 1), (8, 16, 24, 32))
    source = MPMAE(ModelConfig(arch=spec, patch_size=32, decoder_dim=16, stem="original"))
    with torch.no_grad():
        for p in source.parameters():
            p.copy_(torch.randn_like(p))
    ours = source.state_dict()
    assert "encoder.stem_orig.0.weight" in ours and not any(".initial_conv." in k for k in ours)
    state = {}
    for key, value in ours.items():
        if key.startswith("encoder.") and layout == "sparse":
            k, v = to_minkowski(key.removeprefix("encoder."), value)
            state["encoder." + k] = v
        elif key.startswith("encoder."):
            state[key] = value
    if layout == "sparse":
        assert state["encoder.stem_orig.0.kernel"].shape == (16, 12, 8)
        assert "encoder.stem_orig.1.ln.weight" in state
    target = MPMAE(ModelConfig(arch=spec, patch_size=32, decoder_dim=16, stem="original"))
    load_reference_state_dict(target.encoder, state)
    for key, value in target.encoder.state_dict().items():
        torch.testing.assert_close(value, ours["encoder." + key], rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="missing .*initial_conv"):
        load_reference_state_dict(MPMAE(ModelConfig(arch=spec, patch_size=32, decoder_dim=16)).encoder, state)


def test_converter_is_strict(golden):
    model = _golden_model(golden)
    state = {k.removeprefix("sd/"): torch.from_numpy(v) for k, v in golden.items() if k.startswith("sd/")}
    with pytest.raises(KeyError, match="unrecognised"):
        convert_reference_state_dict({**state, "teacher.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected .*heads.teacher"):
        load_reference_state_dict(model, {**state, "pred_dict.teacher.weight": torch.zeros(1)})
    incomplete = {k: v for k, v in state.items() if not k.startswith("pred_dict.biome")}
    with pytest.raises(ValueError, match="missing .*heads.biome"):
        load_reference_state_dict(model, incomplete)
    wrong = {**state, "proj.weight": torch.zeros(16, 32, 1, 1)}
    with pytest.raises(ValueError, match="shape mismatches .*proj.weight"):
        load_reference_state_dict(model, wrong)
    key = "decoder_dict.lat.0.pwconv1.bias"
    with pytest.raises(ValueError, match="differs from another copy"):
        convert_reference_state_dict({**state, key: state[key] + 1})


def test_shared_reference_trunk_seeds_per_task_decoders(golden):
    model = _golden_model(golden, decoder="per_task")
    trunk = golden["sd/decoder_dict.sentinel2.0.pwconv1.weight"]
    norm = golden["sd/layer_norm_tmp.weight"]
    for task in TASK_ORDER:
        np.testing.assert_array_equal(model.decoder[task][0].pwconv1.weight.detach().numpy(), trunk)
    assert sorted(model.image_norm) == sorted(["era5", "lat", "lon", "biome", "eco_region", "month"])
    np.testing.assert_array_equal(model.image_norm["biome"].weight.detach().numpy(), norm)
