"""The command line: help for users, and one line on stderr (never a traceback) for what a user can fix."""

from __future__ import annotations

import errno
import importlib
from pathlib import Path

import pytest

from mpmae.cli import main


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run in an empty folder; a config that passes validation by mistake must not start Ray."""
    def refuse() -> None:
        raise AssertionError("Ray was started for a config that should have been refused")

    for module in ("mpmae.runtime.instance", "mpmae.train.trainer", "mpmae.tune.sweep"):
        monkeypatch.setattr(importlib.import_module(module), "ensure_ray", refuse)
    monkeypatch.chdir(tmp_path)


def _one_line(capsys: pytest.CaptureFixture) -> str:
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    return err.rstrip("\n")


def test_help_describes_the_tool_the_workflow_and_the_environment(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "No logic of its own" not in text
    assert "Multi-Pretext Masked Autoencoder" in text and "typical workflow:" in text
    steps = ["mpmae synth", "mpmae inspect", "mpmae shard", "mpmae pretrain", "mpmae export", "mpmae probe",
             "mpmae finetune", "mpmae tune"]
    positions = [text.index(step) for step in steps]
    assert positions == sorted(positions)
    assert "RAY_ADDRESS" in text and "GEO_BENCH_DIR" in text and "GRAFANA_TOKEN" in text


def test_an_override_with_a_yaml_tag_is_one_line_naming_it(no_ray: None, capsys: pytest.CaptureFixture) -> None:
    assert main(["pretrain", 'model.mask_ratio=!!python/object/apply:os.system ["echo pwned"]']) == 2
    assert _one_line(capsys).startswith(
        "mpmae pretrain: error: model.mask_ratio: the override's value '!!python/object/apply:os.system "
        "[\"echo pwned\"]' is not plain YAML (could not determine a constructor for the tag "
        "'tag:yaml.org,2002:python/object/apply:os.system'")


@pytest.mark.parametrize(("override", "message"), [
    ("run.num_workers=0", "run.num_workers: 0 must be >= 1"),
    ("optim.blr=-2e-3", "optim.blr: -0.002 must be > 0"),
    ("run.name=../../outside", "run.name: '../../outside' is not a safe name: use letters, digits and ._=+-"),
])
def test_fault_table_configs_fail_in_one_line_before_ray(no_ray: None, capsys: pytest.CaptureFixture,
                                                        override: str, message: str) -> None:
    assert main(["pretrain", override]) == 2
    assert _one_line(capsys).startswith(f"mpmae pretrain: error: {message}")


def test_a_storage_path_that_is_a_file_fails_before_ray(no_ray: None, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "runs").write_text("not a folder")
    assert main(["finetune", "task=m-eurosat", "run.storage_path=runs/sub"]) == 2
    assert _one_line(capsys) == (f"mpmae finetune: error: run.storage_path: runs/sub lies under {tmp_path}/runs, "
                                 "which is a file; expected a folder (or a path where one can be made)")


@pytest.mark.parametrize("name", ["/etc/cron.d", "../../elsewhere", ".hidden"])
def test_resume_refuses_a_sweep_name_that_leaves_the_storage(no_ray: None, name: str,
                                                            capsys: pytest.CaptureFixture) -> None:
    assert main(["tune", "--resume", name]) == 2
    assert _one_line(capsys).startswith(f"mpmae tune: error: --resume: {name!r} is not a safe name")


@pytest.mark.parametrize(("error", "line"), [
    (OSError(errno.ENOSPC, "No space left on device", "/mnt/full/mpmae_training.json"),
     "/mnt/full/mpmae_training.json: no space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/srv/dashboards"), "/srv/dashboards: permission denied"),
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device ([Errno 28] No space left on device)"),
])
def test_a_full_disk_or_a_refused_permission_is_one_line_naming_the_path(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, error: OSError, line: str) -> None:
    def fail(out: Path | None) -> int:
        raise error

    monkeypatch.setattr("mpmae.dashboards.cli_render", fail)
    assert main(["dashboards", "render"]) == 1
    assert _one_line(capsys) == f"mpmae dashboards: error: {line}"


def test_a_wrapped_full_disk_is_found_and_other_errors_keep_their_traceback(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Ray hands a worker's error to the driver wrapped in its own exception."""
    def wrapped(out: Path | None) -> int:
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "runs/demo/checkpoint_000003/state.pt")
        except OSError as err:
            raise RuntimeError("training failed") from err

    monkeypatch.setattr("mpmae.dashboards.cli_render", wrapped)
    assert main(["dashboards", "render"]) == 1
    assert _one_line(capsys).endswith("runs/demo/checkpoint_000003/state.pt: no space left on device")

    def other(out: Path | None) -> int:
        raise OSError(errno.EIO, "Input/output error", "x")

    monkeypatch.setattr("mpmae.dashboards.cli_render", other)
    with pytest.raises(OSError, match="Input/output error"):
        main(["dashboards", "render"])


def test_a_planted_sweep_file_cannot_move_the_sweep_it_resumes(tmp_path: Path) -> None:
    """`tune --resume NAME` works in storage/NAME, whatever name the sweep.yaml found there claims."""
    import yaml

    from mpmae.config import SweepConfig, load_config, to_dict
    from mpmae.data.synth import write_synthetic_mmearth
    from mpmae.tune.plan import SWEEP_FILE, yaml_ready
    from mpmae.tune.sweep import load_sweep, prepare_sweep

    repo = Path(__file__).resolve().parents[1]
    data = write_synthetic_mmearth(tmp_path / "data", tiles=40, seed=5)
    config = load_config(SweepConfig, repo / "configs" / "tune_demo.yaml", [
        f"base={repo / 'configs' / 'demo.yaml'}", f"pretrain.data.path={data}",
        f"storage_path={tmp_path / 'runs'}", "pretrain.optim.batch_size=8"])
    sweep = prepare_sweep(config)
    planted = {"sweep": {**to_dict(config), "name": "../../elsewhere"}, "base": sweep.base}
    Path(sweep.folder).mkdir(parents=True)
    (Path(sweep.folder) / SWEEP_FILE).write_text(yaml.safe_dump(yaml_ready(planted)))
    assert load_sweep(sweep.folder).folder == sweep.folder == str(tmp_path / "runs" / "tune-demo")
