from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file as load_safetensors
from timm.layers import DropPath

from mpmae.architectures import ConvNeXtSpec
from mpmae.checkpoint import CheckpointError, TrainState, load_file, save_checkpoint
from mpmae.cli import main
from mpmae.config import DataConfig, ModelConfig, PretrainConfig, to_dict
from mpmae.export import (
    CARD_FILE,
    CONFIG_FILE,
    ENCODER_FILE,
    MMEARTH_FILE,
    PROGRAM_FILE,
    SAFETENSORS_FILE,
    export_files,
    import_reference,
    load_encoder,
)
from mpmae.models import MPMAE, to_reference_state_dict
from mpmae.models.convnextv2 import ConvNeXtV2
from mpmae.reference_checkpoint import ALLOWED_CLASSES
from tests.crafted.reference import reference_checkpoint

SPEC = ConvNeXtSpec((1, 1, 1, 1), (8, 16, 24, 32))
#: Loads and runs an exported program with plain torch, refusing any import of mpmae on the way.
PLAIN_TORCH = """
import sys

class NoMpmae:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "mpmae":
            raise ImportError(f"{name} imported while running an exported program")

sys.meta_path.insert(0, NoMpmae())
import torch

program = torch.export.load(sys.argv[1]).module()
torch.save(program(torch.load(sys.argv[2], weights_only=True)), sys.argv[3])
assert not [m for m in sys.modules if m.split(".")[0] == "mpmae"]
"""


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


def test_a_card_may_give_the_encoder_s_depths_and_dims(tmp_path: Path) -> None:
    source = ConvNeXtV2(4, SPEC, 16, features_only=True)
    folder = write_export(tmp_path / "sized", source.state_dict())
    card = json.loads((folder / CARD_FILE).read_text())
    card["architecture"] = {"depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "patch_size": 16}
    (folder / CARD_FILE).write_text(json.dumps(card))
    encoder, _ = load_encoder(folder)
    assert encoder.depths == (1, 1, 1, 1) and encoder.dims == (8, 16, 24, 32)
    card["architecture"]["arch"] = "atto"
    (folder / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=r"model_card.json: its architecture cannot be built \('arch' 'atto' is "
                                              r"not depths \(1, 1, 1, 1\)"):
        load_encoder(folder)


@pytest.fixture(scope="module", params=["default", "reference"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny pretraining checkpoint (12 bands, patch 16, 32 px crops) of either conventions, and its export in
    the mmearth layout."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    model = ModelConfig(arch=SPEC, patch_size=16, targets="S2", decoder_dim=16, architecture=request.param)
    torch.manual_seed(0)
    mpmae = MPMAE(model)
    config = to_dict(PretrainConfig(data=DataConfig(path="unused", crop_size=32), model=model))
    norm = {"bands": ["B1"], "sentinel2_l2a": {"mean": [1.0], "std": [2.0]}}
    save_checkpoint(root / "run" / "epoch-0003", mpmae, torch.optim.AdamW(mpmae.parameters()), TrainState(3, 30),
                    config, norm, 1e-4)
    assert main(["export", str(root / "run"), str(root / "export"), "--layout", "mmearth"]) == 0
    return {"conventions": request.param, "checkpoint": root / "run" / "epoch-0003", "export": root / "export"}


def test_an_export_writes_every_format_and_the_card_last(exported: dict[str, Any]) -> None:
    out = exported["export"]
    assert export_files("mmearth") == (ENCODER_FILE, PROGRAM_FILE, SAFETENSORS_FILE, CONFIG_FILE, MMEARTH_FILE,
                                       CARD_FILE)
    assert sorted(p.name for p in out.iterdir()) == sorted(export_files("mmearth"))
    written = [(out / name).stat().st_mtime_ns for name in export_files("mmearth")]
    assert written == sorted(written)  # in order, the card (the completion marker) last
    encoder, card = load_encoder(out)
    assert card is not None and card["architecture"] == {
        "arch": None, "depths": [1, 1, 1, 1], "dims": [8, 16, 24, 32], "patch_size": 16, "stem": "modified",
        "conventions": exported["conventions"]}
    weights = load_safetensors(out / SAFETENSORS_FILE)
    assert weights.keys() == encoder.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in encoder.state_dict().items())
    config = json.loads((out / CONFIG_FILE).read_text())
    assert config["architecture"]["dims"] == [8, 16, 24, 32] and config["architecture"]["in_chans"] == 12
    assert config["architecture"]["grn_eps"] == encoder.conventions.grn_eps
    assert config["bands"] == card["bands"] and config["normalisation"] == card["normalisation"]
    assert (config["input_size"], config["patch_size"], config["output"]) == (32, 16, {"channels": 32, "size": [2, 2]})
    with pytest.raises(ValueError, match="layout: 'onnx' is not one of"):
        export_files("onnx")


def test_the_mmearth_layout_is_the_original_projects(exported: dict[str, Any]) -> None:
    """Dense ``encoder.*`` weights with GRN parameters (1, C), which the original loader unsqueezes, and the
    ``args`` it builds from; nothing a plain ``weights_only`` load with Namespace allowed would refuse."""
    payload = load_file(exported["export"] / MMEARTH_FILE, allowed=ALLOWED_CLASSES)
    encoder, _ = load_encoder(exported["export"])
    assert payload["model"].keys() == {f"encoder.{k}" for k in encoder.state_dict()}
    assert payload["model"]["encoder.stages.0.0.grn.gamma"].shape == (1, 32)
    assert payload["model"]["encoder.stages.0.0.dwconv.weight"].shape == (8, 1, 7, 7)
    args = vars(payload["args"])
    assert {k: args[k] for k in ("model", "input_size", "patch_size", "use_orig_stem", "sparse")} == {
        "model": None, "input_size": 32, "patch_size": 16, "use_orig_stem": False, "sparse": False}
    assert payload["epoch"] == 2  # the index of the last of the 3 epochs trained, as the original stores it


def test_the_mmearth_layout_imports_as_the_same_encoder(exported: dict[str, Any], tmp_path: Path) -> None:
    """export -> --layout mmearth -> mpmae import: the same weights, conventions and features."""
    out = import_reference(exported["export"] / MMEARTH_FILE, tmp_path / "imported")
    ours, card = load_encoder(exported["export"])
    theirs, imported = load_encoder(out)
    assert card is not None and imported is not None
    assert imported["architecture"] == card["architecture"] and imported["normalisation"] == card["normalisation"]
    assert imported["imported_from"]["file"] == MMEARTH_FILE and imported["trained"] == {"epochs": 3, "steps": 30}
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), key
    x = torch.randn(2, 12, 32, 32)
    with torch.no_grad():
        assert torch.equal(theirs.eval().forward_features(x), ours.eval().forward_features(x))


@pytest.mark.parametrize("exported", ["default"], indirect=True)
def test_the_program_runs_with_plain_torch_at_any_batch_size(exported: dict[str, Any], tmp_path: Path) -> None:
    encoder, _ = load_encoder(exported["export"])
    batch = torch.randn(3, 12, 32, 32)  # the program was traced with 2
    torch.save(batch, tmp_path / "batch.pt")
    subprocess.run([sys.executable, "-c", PLAIN_TORCH, str(exported["export"] / PROGRAM_FILE),
                    str(tmp_path / "batch.pt"), str(tmp_path / "features.pt")], check=True, cwd=tmp_path)
    with torch.no_grad():
        expected = encoder.eval().forward_features(batch)
    assert torch.equal(torch.load(tmp_path / "features.pt", weights_only=True), expected)


@pytest.mark.parametrize("exported", ["default"], indirect=True)
def test_import_refuses_what_is_not_an_original_checkpoint(exported: dict[str, Any], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    state = exported["checkpoint"] / "state.pt"
    assert main(["import", str(state), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"mpmae import: error: {state}: an mpmae training checkpoint, not an MMEarth "
                                       "one; export it with mpmae export\n")
    five = ConvNeXtV2(5, SPEC, 16, features_only=True)
    file = reference_checkpoint(tmp_path / "five.pth", to_reference_state_dict(five), None)
    with pytest.raises(CheckpointError, match=rf"{file}: its encoder takes 5 input channels; expected 12"):
        import_reference(file, tmp_path / "out")
    with pytest.raises(FileExistsError, match=f"{exported['export'] / ENCODER_FILE} already exists"):
        import_reference(exported["export"] / MMEARTH_FILE, exported["export"])
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'gone.pth'}: not found; expected a checkpoint file"):
        import_reference(tmp_path / "gone.pth", tmp_path / "out")
