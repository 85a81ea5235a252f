"""Checkpoints from untrusted or damaged storage: no code runs from them, every reader names the file and
takes only complete checkpoints, a full disk leaves nothing partial, and a restarted run resumes from the
newest checkpoint that loads."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray.train
import torch

from mpmae.checkpoint import (
    COMPLETE_FILE,
    STATE_FILE,
    CheckpointError,
    StorageFullError,
    TrainState,
    atomic_save,
    checkpoint_folders,
    checkpoint_name,
    load_checkpoint,
    plan_resume,
    resolve_checkpoint,
    restore,
    save_checkpoint,
)
from mpmae.cli import main
from mpmae.config import DataConfig, ModelConfig, PretrainConfig, to_dict
from mpmae.export import encoder_from, export_encoder, load_encoder
from mpmae.finetune.run import load_state, save_state
from mpmae.models import MPMAE
from mpmae.runtime import run
from mpmae.runtime.run import report_with_checkpoint
from mpmae.train.worker import resume_source
from mpmae.tune.sweep import _finished_run_metrics
from tests.crafted.checkpoints import (
    code_running_export,
    code_running_state,
    export_without_card,
    h5_file,
    mark_complete_as_written,
    small_state,
    text_file,
    truncated,
)

CONFIG = PretrainConfig(data=DataConfig(path="unused", crop_size=56), model=ModelConfig(decoder_dim=32))


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    status = main(list(argv))
    return status, capsys.readouterr().err.strip().splitlines()


def _commands(checkpoint: Path, tmp_path: Path) -> dict[str, list[str]]:
    """The three commands that read a checkpoint, each given ``checkpoint``."""
    return {
        "export": ["export", str(checkpoint), str(tmp_path / "export")],
        "visualize": ["visualize", str(checkpoint), str(tmp_path / "no-data"), "--out", str(tmp_path / "viz")],
        "probe": ["probe", "--checkpoint", str(checkpoint), "--task", "land_cover"],
    }


def _model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = MPMAE(CONFIG.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, optimizer


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A model and optimizer after one step, so that the optimizer state holds tensors."""
    model, optimizer = _model_and_optimizer()
    next(model.parameters()).grad = torch.ones_like(next(model.parameters()))
    optimizer.step()
    return {"model": model, "optimizer": optimizer, "root": tmp_path_factory.mktemp("trained")}


# -- no code runs from a file -------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["export", "visualize", "probe"])
def test_a_state_that_would_run_a_command_is_refused_naming_the_file(
        command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PWNED"
    state = code_running_state(tmp_path / "ckpt", marker)
    status, err = _cli(capsys, *_commands(tmp_path / "ckpt", tmp_path)[command])
    assert not marker.exists(), "the checkpoint ran its command"
    assert status == 2 and len(err) == 1
    assert f"{state}: refused to load: it tries to load 'posix.system'" in err[0]


def test_an_export_whose_encoder_would_run_a_command_is_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "PWNED"
    export = code_running_export(tmp_path / "export", marker)
    with pytest.raises(CheckpointError, match=r"encoder.pt: refused to load: it tries to load 'posix.system'"):
        load_encoder(export)  # the fine-tune worker's load
    status, err = _cli(capsys, "probe", "--checkpoint", str(export), "--task", "land_cover")
    assert status == 2 and len(err) == 1 and f"{export / 'encoder.pt'}: refused to load" in err[0]
    assert not marker.exists()


def test_a_finetune_state_that_would_run_a_command_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    code_running_state(tmp_path / "ckpt", marker, name="finetune.pt")
    with pytest.raises(CheckpointError, match=r"finetune.pt: refused to load: it tries to load 'posix.system'"):
        load_state(tmp_path / "ckpt")
    assert not marker.exists()


def test_the_tune_finished_run_check_refuses_a_code_running_state(tmp_path: Path) -> None:
    marker = tmp_path / "PWNED"
    code_running_state(tmp_path / "trial" / "epoch-0002", marker)
    assert _finished_run_metrics(tmp_path / "trial", epochs=2) is None  # not taken: Train refuses it, naming it
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="epoch-0002/state.pt"):
        plan_resume(str(tmp_path), "trial")


# -- broken files: one line naming the file -----------------------------------------------------------------


@pytest.mark.parametrize("kind, reason", [
    ("truncated", "PytorchStreamReader failed reading zip archive"),
    ("text", "it is not a zip archive, as torch.save writes"),
    ("h5", "it is an HDF5 file"),
])
@pytest.mark.parametrize("command", ["export", "visualize", "probe"])
def test_a_broken_checkpoint_is_one_line_naming_the_file(
        command: str, kind: str, reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = tmp_path / "ckpt" / "state.pt"
    if kind == "truncated":
        truncated(small_state(file.parent))
    elif kind == "text":
        text_file(file)
    else:
        file = h5_file(tmp_path / "data_1M_v001_64.h5")
    status, err = _cli(capsys, *_commands(file, tmp_path)[command])
    assert status == 2 and len(err) == 1
    assert f"{file}: not an mpmae checkpoint (corrupt or not written by torch.save: {reason}" in err[0]


def test_an_export_without_its_card_names_the_card(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    export = export_without_card(tmp_path / "export")
    with pytest.raises(FileNotFoundError, match="model_card.json: not found"):
        encoder_from(export)
    status, err = _cli(capsys, "probe", "--checkpoint", str(export), "--task", "land_cover")
    assert status == 2 and len(err) == 1 and f"{export / 'model_card.json'}: not found" in err[0]


def test_the_key_check_names_the_file_and_the_key(tmp_path: Path) -> None:
    file = small_state(tmp_path / "a")
    payload = torch.load(file, weights_only=True)
    torch.save({**payload, "hook": "x"}, file)
    with pytest.raises(CheckpointError, match=rf"{file}: not an mpmae checkpoint \(unexpected key 'hook'\)"):
        load_checkpoint(file)
    torch.save({k: v for k, v in payload.items() if k != "step"}, file)
    with pytest.raises(CheckpointError, match=rf"{file}: not an mpmae checkpoint \(missing key 'step'\)"):
        load_checkpoint(file)
    torch.save([1, 2], file)
    with pytest.raises(CheckpointError, match=r"it holds a list, not a dict"):
        load_checkpoint(file)


def test_weights_that_do_not_fit_name_the_file_and_the_weight(trained: dict[str, Any]) -> None:
    folder = trained["root"] / "misfit"
    save_checkpoint(folder, trained["model"], trained["optimizer"], TrainState(1, 1), to_dict(CONFIG), {}, 1e-3)
    payload = load_checkpoint(folder)
    del payload["model"]["encoder.stem.0.weight"]
    model, optimizer = _model_and_optimizer()
    with pytest.raises(CheckpointError, match=r"state.pt: missing weight 'encoder.stem.0.weight'"):
        restore(payload, model, optimizer, folder / STATE_FILE)


# -- what is written loads safely, and what today's code wrote still does -----------------------------------


def test_a_checkpoint_written_the_old_way_keeps_loading(trained: dict[str, Any]) -> None:
    """Before markers: ``torch.save`` of the payload dict, nothing beside it."""
    model, optimizer = trained["model"], trained["optimizer"]
    folder = trained["root"] / "old"
    folder.mkdir()
    history = [{"epoch": 0, "loss": 2.5, "lr": 1e-3}]
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": {"kind": "warmup_cosine", "last_lr": 1e-3}, "scaler": None, "epoch": 1, "step": 4,
        "skipped_steps": 0, "history": history, "data_position": {"epoch": 1, "batch": 0},
        "config": to_dict(CONFIG), "norm_stats": {"bands": ["B1"]},
    }, folder / STATE_FILE)
    payload = load_checkpoint(folder)
    fresh, fresh_optimizer = _model_and_optimizer()
    state = restore(payload, fresh, fresh_optimizer, folder / STATE_FILE)
    assert (state.epoch, state.step, state.history) == (1, 4, history)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    moments = [o.state_dict()["state"][0]["exp_avg"] for o in (fresh_optimizer, optimizer)]
    assert torch.equal(*moments) and moments[0].abs().sum() > 0
    out = export_encoder(folder, trained["root"] / "old-export")
    encoder, card = load_encoder(out)
    assert card["trained"] == {"epochs": 1, "steps": 4} and encoder.features_only


def test_a_new_checkpoint_loads_with_plain_torch_and_carries_its_marker(trained: dict[str, Any]) -> None:
    folder = trained["root"] / "new"
    state = TrainState(2, 8, history=[{"epoch": 0, "loss": 1.0}, {"epoch": 1, "loss": 0.5}])
    save_checkpoint(folder, trained["model"], trained["optimizer"], state, to_dict(CONFIG), {}, 1e-3)
    assert sorted(p.name for p in folder.iterdir()) == [COMPLETE_FILE, STATE_FILE]
    marker = json.loads((folder / COMPLETE_FILE).read_text())
    assert marker["files"] == {STATE_FILE: (folder / STATE_FILE).stat().st_size}
    assert (marker["epoch"], marker["step"]) == (2, 8)
    assert torch.load(folder / STATE_FILE, weights_only=True)["history"] == state.history


def test_a_value_that_would_not_load_safely_is_refused_when_saving(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"state.pt\['history'\]\[0\]\['loss'\]: a float64 is neither a tensor"):
        atomic_save({"history": [{"loss": np.float64(1.0)}]}, tmp_path / "state.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_finetune_state_round_trips_with_its_best_weights(tmp_path: Path) -> None:
    weights = {"w": torch.arange(3.0)}
    state = {"finetuner": {"model": weights, "optimizer": {}, "epoch": 2, "step": 6, "encoder_frozen": False},
             "history": [{"epoch": 0, "val_metric": 0.5}], "best": {"metric": float("-inf"), "epoch": -1,
                                                                    "model": weights}, "config": {"task": "x"}}
    save_state(tmp_path, state)
    loaded = load_state(tmp_path)
    assert torch.equal(loaded["best"]["model"]["w"], weights["w"]) and loaded["history"] == state["history"]
    assert json.loads((tmp_path / COMPLETE_FILE).read_text())["epoch"] == 2


# -- a full disk --------------------------------------------------------------------------------------------


def _disk_full_after(size: int) -> Any:
    """A ``torch.save`` that writes ``size`` bytes to its file, then fails as a full disk does."""
    def save(obj: Any, handle: Any) -> None:
        handle.write(b"\0" * size)
        handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_a_full_disk_leaves_no_partial_checkpoint_and_names_the_path(
        trained: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    folder = trained["root"] / "full" / "epoch-0003"
    monkeypatch.setattr(torch, "save", _disk_full_after(4096))
    with pytest.raises(StorageFullError) as raised:
        save_checkpoint(folder, trained["model"], trained["optimizer"], TrainState(3, 12), to_dict(CONFIG), {}, 1e-3)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(folder / STATE_FILE)
    assert "No space left on device" in str(raised.value)
    assert list(folder.iterdir()) == []  # no state.pt, no temporary file, no marker


def test_export_on_a_full_disk_is_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    small_state(tmp_path / "ckpt")
    monkeypatch.setattr(torch, "save", _disk_full_after(100))
    status, err = _cli(capsys, "export", str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert status == 1 and err == [f"mpmae export: error: {tmp_path / 'out' / 'encoder.pt'}: no space left on device"]
    assert list((tmp_path / "out").iterdir()) == []


def test_a_full_disk_during_ray_s_copy_names_the_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def report(metrics: dict, checkpoint: Any = None, checkpoint_dir_name: str = "") -> None:
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(run, "_storage_place", lambda name: f"/storage/run/{name}")
    with pytest.raises(StorageFullError) as raised:
        report_with_checkpoint({}, 0, lambda folder: small_state(folder), "epoch-0003")
    assert raised.value.filename == "/storage/run/epoch-0003"


def _damaged_run(run: Path) -> None:
    """Epochs 1 (marker) and 2 (no marker: written before markers) whole; 3 and 4 cut short by a full disk
    (3 with the marker copied before the state, 4 without one); 5 whole but its marker cut short."""
    mark_complete_as_written(small_state(run / "epoch-0001", 1).parent)
    small_state(run / "epoch-0002", 2)
    folder = small_state(run / "epoch-0003", 3).parent
    mark_complete_as_written(folder)
    truncated(folder / STATE_FILE)
    truncated(small_state(run / "epoch-0004", 4))
    folder = small_state(run / "epoch-0005", 5).parent
    truncated(mark_complete_as_written(folder), 0.6)


def test_readers_take_the_newest_complete_checkpoint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    _damaged_run(run)
    with caplog.at_level(logging.WARNING, logger="mpmae.checkpoint"):
        assert resolve_checkpoint(run) == run / "epoch-0002" / STATE_FILE
    skipped = "\n".join(caplog.messages)
    assert f"{run / 'epoch-0005' / COMPLETE_FILE}: unreadable" in skipped
    assert f"{run / 'epoch-0004' / STATE_FILE}: not an mpmae checkpoint" in skipped
    assert f"{run / 'epoch-0003' / STATE_FILE}: incomplete (" in skipped
    assert _finished_run_metrics(run, epochs=2) == {"epoch": 1, "epochs_done": 2, "probe_score": 0.1}
    assert _finished_run_metrics(run, epochs=3) is None
    with pytest.raises(CheckpointError, match=r"epoch-0003/state.pt: incomplete \(\d+ of the \d+ bytes"):
        load_checkpoint(run / "epoch-0003")  # named explicitly: refused, not replaced
    status, _ = _cli(capsys, "export", str(run), str(tmp_path / "export"))
    assert status == 0
    assert json.loads((tmp_path / "export" / "model_card.json").read_text())["trained"]["epochs"] == 2


# -- resuming a run whose latest checkpoint is broken ------------------------------------------------------


def test_the_driver_resumes_from_the_newest_loadable_checkpoint(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _damaged_run(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="mpmae.checkpoint"):
        plan = plan_resume(str(tmp_path), "run")
    assert plan == {"from": str(tmp_path / "run" / "epoch-0002"),
                    "taken": [f"epoch-000{e}" for e in range(1, 6)]}
    assert f"{tmp_path / 'run' / 'epoch-0003' / STATE_FILE}: incomplete" in caplog.text
    assert plan_resume(str(tmp_path), "fresh") == {"from": None, "taken": []}



def test_the_driver_refuses_a_run_whose_checkpoints_all_fail(tmp_path: Path) -> None:
    truncated(small_state(tmp_path / "run" / "epoch-0001"))
    text_file(tmp_path / "run" / "epoch-0002" / STATE_FILE)
    with pytest.raises(CheckpointError, match=r"run: cannot resume, none of its 2 checkpoints .*epoch-0002/state.pt"):
        plan_resume(str(tmp_path), "run")


def test_workers_resume_from_the_driver_s_choice_unless_this_run_wrote_a_newer_one(tmp_path: Path) -> None:
    plan = {"from": str(tmp_path / "epoch-0002"), "taken": ["epoch-0001", "epoch-0002", "epoch-0003"]}
    broken = ray.train.Checkpoint(str(tmp_path / "epoch-0003"))  # Ray's record, as found on a restart
    assert resume_source(broken, plan).path == str(tmp_path / "epoch-0002")
    written_since = ray.train.Checkpoint(str(tmp_path / "epoch-0003.1"))  # a restarted worker group
    assert resume_source(written_since, plan) is written_since
    assert resume_source(broken, None) is broken
    assert resume_source(None, {"from": None, "taken": []}) is None


def test_a_resumed_run_never_reuses_a_checkpoint_name(tmp_path: Path) -> None:
    assert checkpoint_name(3) == "epoch-0003"
    assert checkpoint_name(3, ["epoch-0003"]) == "epoch-0003.1"
    assert checkpoint_name(3, ["epoch-0003", "epoch-0003.1"]) == "epoch-0003.2"
    for name in ("epoch-0002", "epoch-0003", "epoch-0003.2", "epoch-0003.10", "epoch-0010", "other"):
        (tmp_path / name).mkdir()
    assert [p.name for p in checkpoint_folders(tmp_path)] == [
        "epoch-0010", "epoch-0003.10", "epoch-0003.2", "epoch-0003", "epoch-0002"]
