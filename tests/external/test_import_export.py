"""Checkpoints of the original MMEarth project, written in its layout from the reference's golden FCMAE
(dense path, depths 1-1-1-1, patch 16), imported as exports and taken as encoders directly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path, PosixPath

import numpy as np
import pytest
import torch

from mpmae.architectures import ConvNeXtSpec
from mpmae.checkpoint import CheckpointError
from mpmae.cli import main
from mpmae.config import ModelConfig
from mpmae.export import CARD_FILE, CONFIG_FILE, MMEARTH_FILE, encoder_from, export_files, load_encoder
from mpmae.modalities import SENTINEL2_INPUT_BANDS, TASK_ORDER
from mpmae.models import MPMAE, ConvNeXtV2, load_reference_state_dict
from mpmae.reference_checkpoint import load_reference_checkpoint
from tests.crafted.reference import code_running_reference_checkpoint, minkowski_encoder, reference_checkpoint

#: The loss of each golden-derived checkpoint, and the ``args`` field that names it (None: inferred).
LOSSES = [("uncertainty", "loss_aggr"), ("unweighted", None)]


@pytest.fixture(scope="module")
def golden(realdata: Path) -> dict[str, np.ndarray]:
    with np.load(realdata / "golden" / "golden_fcmae_tiny.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def config(golden: dict[str, np.ndarray]) -> dict:
    return json.loads(str(golden["config"]))


@pytest.fixture(scope="module")
def inputs(golden: dict[str, np.ndarray]) -> torch.Tensor:
    """The golden Sentinel-2 batch, sanitised as the MP-MAE feeds its encoder."""
    return torch.nan_to_num(torch.from_numpy(golden["in/sentinel2"]), nan=0.0, posinf=0.0, neginf=0.0)


def _state(golden: dict[str, np.ndarray], loss: str) -> dict[str, torch.Tensor]:
    """The golden state dict; an unweighted run keeps its log-variances at their initial zeros."""
    state = {k.removeprefix("sd/"): torch.from_numpy(v) for k, v in golden.items() if k.startswith("sd/")}
    if loss == "unweighted":
        state["loss_fn.log_vars"] = torch.zeros_like(state["loss_fn.log_vars"])
    return state


def _args(config: dict, **overrides: object) -> argparse.Namespace:
    """The reference's ``args`` of the golden run (its FCMAE was built from depths and dims: no model name)."""
    return argparse.Namespace(**{
        "input_size": config["img_size"], "patch_size": config["patch_size"], "decoder_depth": config["decoder_depth"],
        "decoder_embed_dim": config["decoder_embed_dim"], "mask_ratio": config["mask_ratio"], "norm_pix_loss": False,
        "use_orig_stem": False, "sparse": False, "output_dir": PosixPath("/runs/pt-golden"), "blr": 1.5e-4,
        **overrides,
    })


def _expected(golden: dict[str, np.ndarray], config: dict, loss: str) -> ConvNeXtV2:
    """The golden FCMAE's encoder as the MP-MAE of that loss loads it (unweighted: log-variances dropped)."""
    model = MPMAE(ModelConfig(
        arch=ConvNeXtSpec(tuple(config["depths"]), tuple(config["dims"])), patch_size=config["patch_size"],
        decoder_dim=config["decoder_embed_dim"], decoder_depth=config["decoder_depth"], targets="all_mod",
        architecture="reference", loss=loss,
    ))
    load_reference_state_dict(model, _state(golden, loss))
    return model.encoder.eval()


def _features(encoder: ConvNeXtV2, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return encoder.eval().forward_features(x)


@pytest.mark.parametrize(("loss", "loss_field"), LOSSES)
def test_import_gives_the_reference_encoder_with_a_card(golden, config, inputs, loss, loss_field, tmp_path,
                                                        capsys) -> None:
    args = _args(config, **({} if loss_field is None else {loss_field: loss}))
    file = reference_checkpoint(tmp_path / "checkpoint-199.pth", _state(golden, loss), args)
    out = tmp_path / "export"
    assert main(["import", str(file), str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {', '.join(export_files())} to {out}\n"
    assert sorted(p.name for p in out.iterdir()) == sorted(export_files()) and MMEARTH_FILE not in export_files()

    encoder, card = load_encoder(out)
    assert torch.equal(_features(encoder, inputs), _features(_expected(golden, config, loss), inputs))
    assert card is not None and card["architecture"] == {
        "arch": None, "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "patch_size": 16, "stem": "modified",
        "conventions": "reference"}
    assert card["bands"] == list(SENTINEL2_INPUT_BANDS) and card["pretext_tasks"] == list(TASK_ORDER)
    assert (card["input_size"], card["trained"], card["normalisation"]) == (64, {"epochs": 200, "steps": None}, {})
    source = card["imported_from"]
    assert (source["file"], source["layout"], source["loss"]) == ("checkpoint-199.pth", "mmearth", loss)
    assert source["args"]["output_dir"] == "/runs/pt-golden" and source["args"]["mask_ratio"] == 0.6
    assert len(source["sha256"]) == 64
    settings = json.loads((out / CONFIG_FILE).read_text())
    assert settings["architecture"]["grn_eps"] == 1e-4 and settings["architecture"]["initial_conv_padding"] == 0
    assert settings["output"] == {"channels": 32, "size": [4, 4]}  # the stem padding keeps the 64 / 16 grid


def test_a_reference_file_is_an_encoder_where_encoders_are_accepted(golden, config, inputs, tmp_path) -> None:
    """``finetune``'s ``encoder`` and ``probe --checkpoint`` take such a file as is (both use encoder_from)."""
    file = reference_checkpoint(tmp_path / "ckpt" / "checkpoint-199.pth", _state(golden, "uncertainty"),
                                _args(config, loss_aggr="uncertainty"))
    encoder, card = encoder_from(str(file), drop_path_rate=0.1)
    assert list(file.parent.iterdir()) == [file]  # nothing written beside it
    assert card["architecture"]["conventions"] == "reference" and card["imported_from"]["loss"] == "uncertainty"
    assert encoder.stages[3][0].drop_path.drop_prob == pytest.approx(0.1)
    assert torch.equal(_features(encoder, inputs), _features(_expected(golden, config, "uncertainty"), inputs))


def test_a_minkowski_checkpoint_gives_the_features_of_its_dense_twin(golden, config, inputs, tmp_path) -> None:
    state = minkowski_encoder(_state(golden, "uncertainty"))
    assert "encoder.stages.0.0.dwconv.kernel" in state and "encoder.head.weight" not in state
    file = reference_checkpoint(tmp_path / "sparse.pth", state, _args(config, sparse=True))
    found = load_reference_checkpoint(file)
    assert found.loss == "uncertainty"  # trained log-variances, no args field
    torch.testing.assert_close(_features(found.encoder, inputs),
                               _features(_expected(golden, config, "uncertainty"), inputs), rtol=0, atol=0)


@pytest.mark.parametrize(("overrides", "message"), [
    pytest.param({"patch_size": 8}, "args.patch_size is 8, but its weights say 16", id="patch_size"),
    pytest.param({"use_orig_stem": True}, "args.use_orig_stem is True, but its weights say False", id="stem"),
    pytest.param({"sparse": True}, "args.sparse is True, but its weights say False", id="sparse"),
    pytest.param({"model": "convnextv2_atto"},
                 r"args.model is 'convnextv2_atto', but its weights say depths \(1, 1, 1, 1\)", id="model"),
    pytest.param({"loss_aggr": "unweighted"},
                 r"args.loss_aggr is 'unweighted', but its weights say uncertainty \(loss_fn", id="loss"),
    pytest.param({"loss_type": "focal"}, r"args.loss_type is 'focal'; expected one of \['uncertainty', 'unweighted'\]",
                 id="loss_name"),
    pytest.param({"input_size": 60}, "args.input_size is 60; expected a positive multiple of the patch size 16",
                 id="input_size"),
])
def test_args_that_contradict_the_weights_name_the_file_and_the_field(golden, config, tmp_path, overrides,
                                                                      message) -> None:
    file = reference_checkpoint(tmp_path / "checkpoint-199.pth", _state(golden, "uncertainty"),
                                _args(config, **overrides))
    with pytest.raises(CheckpointError, match=rf"^{file}: {message}"):
        load_reference_checkpoint(file)


def test_a_file_holding_a_forbidden_class_is_refused_naming_it(golden, tmp_path, capsys) -> None:
    marker = tmp_path / "pwned"
    file = code_running_reference_checkpoint(tmp_path / "checkpoint-199.pth", _state(golden, "uncertainty"), marker)
    assert main(["import", str(file), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mpmae import: error: {file}: refused to load: it tries to load 'posix.system', which "
                          "is not a tensor, plain container or one of argparse.Namespace") and err.count("\n") == 1
    with pytest.raises(CheckpointError, match="refused to load: it tries to load 'posix.system'"):
        encoder_from(file)
    assert not marker.exists() and not (tmp_path / "out" / CARD_FILE).exists()
