"""Evaluation, export and sweep paths in an object store (the session's moto S3): the same results as a local
path, nothing in the bucket overwritten, a missing bucket one line before any work."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import mpmae.storage as storage
from mpmae.checkpoint import COMPLETE_FILE, STATE_FILE, CheckpointError, TrainState, save_checkpoint
from mpmae.cli import main
from mpmae.config import (
    ConfigError,
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    PretrainConfig,
    RunConfig,
    SweepConfig,
    load_config,
    to_dict,
)
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.evaluation.probe_table import probe_table
from mpmae.export import CARD_FILE, ENCODER_FILE, export_encoder, export_files, fetched, load_encoder
from mpmae.modalities import IMAGE_TASKS, PIXEL_TASKS
from mpmae.models import MPMAE
from mpmae.viz import IMAGE_TASKS_FILE, LOSS_CURVES_FILE, visualize
from tests.conftest import S3Store
from tests.crafted.checkpoints import mark_complete_as_written, small_state

REPO = Path(__file__).resolve().parents[1]
MISSING = "s3://no-such-bucket-mpmae/x"
HISTORY = [{"epoch": e, "loss": 2.0 - e, "loss/sentinel2": 1.0 / (e + 1), "lr": 1e-4} for e in range(2)]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic data and an untrained all-task checkpoint folder with a 2-epoch history."""
    root = tmp_path_factory.mktemp("store-paths")
    data = write_synthetic_mmearth(root / "data", tiles=40, seed=2)
    config = PretrainConfig(data=DataConfig(path=str(data), crop_size=56), model=ModelConfig(decoder_dim=32))
    torch.manual_seed(0)
    model = MPMAE(config.model)
    save_checkpoint(root / "run" / "epoch-0002", model, torch.optim.AdamW(model.parameters()),
                    TrainState(epoch=2, step=10, history=HISTORY), to_dict(config), {}, lr=1e-4)
    return {"root": root, "data": data, "checkpoint": root / "run" / "epoch-0002"}


@pytest.fixture(scope="module")
def stored(s3: S3Store, local: dict[str, Path]) -> dict[str, str]:
    """The checkpoint of ``local`` uploaded into a fresh bucket (its marker last)."""
    bucket = s3.bucket("paths")
    checkpoint = storage.upload(local["checkpoint"], f"{bucket}/runs/demo/epoch-0002", last=[COMPLETE_FILE])
    return {"bucket": bucket, "checkpoint": checkpoint}


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.rstrip("\n")


def test_an_export_from_and_into_a_bucket_probes_as_the_local_one(local: dict[str, Path],
                                                                  stored: dict[str, str]) -> None:
    local_export = export_encoder(local["checkpoint"], local["root"] / "export")
    out = f"{stored['bucket']}/exports/demo"
    assert export_encoder(stored["checkpoint"], out) == out
    assert set(storage.file_sizes(out)) == set(export_files())
    assert json.loads(storage.read_bytes(storage.join(out, CARD_FILE))) == json.loads(
        (Path(local_export) / CARD_FILE).read_text())

    ours, card = load_encoder(out)
    theirs, _ = load_encoder(local_export)
    assert card is not None and card["trained"] == {"epochs": 2, "steps": 10}
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key

    rows = probe_table([out, str(local_export)], "land_cover", data=local["data"], epochs=5)
    assert rows[0]["encoder"] == out and rows[0]["score"] == rows[1]["score"]
    # a checkpoint URI probes as its export does
    assert probe_table([stored["checkpoint"]], "land_cover", data=local["data"], epochs=5)[0]["score"] == \
        rows[0]["score"]


def test_an_export_already_in_the_bucket_is_never_overwritten(local: dict[str, Path], stored: dict[str, str],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = f"{stored['bucket']}/exports/kept"
    export_encoder(stored["checkpoint"], out)
    before = {name: storage.read_bytes(storage.join(out, name)) for name in (ENCODER_FILE, CARD_FILE)}
    other = local["root"] / "other"
    small_state(other)
    mark_complete_as_written(other)
    with pytest.raises(FileExistsError, match=f"{out}/{ENCODER_FILE} already exists"):
        export_encoder(other, out)
    assert main(["export", str(other), out]) == 2
    assert _one_line(capsys) == (f"mpmae export: error: {out}/{ENCODER_FILE} already exists; "
                                 "choose another output folder")
    storage.delete_file(storage.join(out, ENCODER_FILE))  # a card alone refuses as well
    with pytest.raises(FileExistsError, match=f"{out}/{CARD_FILE} already exists"):
        export_encoder(other, out)
    assert storage.read_bytes(storage.join(out, CARD_FILE)) == before[CARD_FILE]


def test_a_run_folder_uri_skips_a_newer_checkpoint_without_its_marker(
        local: dict[str, Path], s3: S3Store, caplog: pytest.LogCaptureFixture) -> None:
    run = local["root"] / "two"
    for epoch in (1, 2):
        small_state(run / f"epoch-{epoch:04d}", epoch=epoch)
        mark_complete_as_written(run / f"epoch-{epoch:04d}")
    (run / "epoch-0002" / COMPLETE_FILE).unlink()  # its upload was cut short before the marker
    uri = storage.upload(run, f"{s3.bucket('runs')}/two")
    out = export_encoder(uri, f"{uri}-export")
    card = json.loads(storage.read_bytes(storage.join(out, CARD_FILE)))
    assert card["trained"]["epochs"] == 1
    assert f"{uri}/epoch-0002/{COMPLETE_FILE}: not found" in caplog.text
    with pytest.raises(CheckpointError, match=f"^{uri}/epoch-0002/{COMPLETE_FILE}: not found"):
        export_encoder(f"{uri}/epoch-0002/{STATE_FILE}", f"{uri}-export-2")
    with fetched(f"{uri}/epoch-0001/{STATE_FILE}") as file:  # a state.pt URI: the file, marker checked
        assert file.name == STATE_FILE and (file.parent / COMPLETE_FILE).is_file()
    with pytest.raises(FileNotFoundError, match=f"^{uri}/nowhere: no {STATE_FILE}"):
        export_encoder(f"{uri}/nowhere", f"{uri}-export-3")


def test_visualize_into_a_bucket_writes_every_file_once(local: dict[str, Path], stored: dict[str, str]) -> None:
    out = f"{stored['bucket']}/viz"
    written = visualize(stored["checkpoint"], local["data"], out, tiles=2)
    expected = {LOSS_CURVES_FILE, IMAGE_TASKS_FILE, *(f"recon_{t}.png" for t in PIXEL_TASKS)}
    assert {storage.name_of(p) for p in written} == expected and all(str(p).startswith(out) for p in written)
    assert set(storage.file_sizes(out)) == expected
    assert storage.read_bytes(storage.join(out, LOSS_CURVES_FILE))[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads(storage.read_bytes(storage.join(out, IMAGE_TASKS_FILE)))
    assert set(table["tasks"]) == set(IMAGE_TASKS)
    before = storage.read_bytes(storage.join(out, "recon_sentinel2.png"))
    storage.delete_file(storage.join(out, LOSS_CURVES_FILE))
    with pytest.raises(FileExistsError, match=f"{out}/recon_\\w+.png already exists; nothing was overwritten"):
        visualize(stored["checkpoint"], local["data"], out, tiles=2)
    assert storage.read_bytes(storage.join(out, "recon_sentinel2.png")) == before
    assert LOSS_CURVES_FILE not in storage.file_sizes(out)  # refused before anything was drawn
    with pytest.raises(ValueError, match="must be a local MMEarth folder"):
        visualize(stored["checkpoint"], f"{stored['bucket']}/data", f"{out}-2")


def test_the_probe_table_goes_into_a_bucket_once(local: dict[str, Path], stored: dict[str, str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = f"{stored['bucket']}/tables/probe.json"
    argv = ["probe", "--random", "--task", "land_cover", "--data", str(local["data"]), "--epochs", "2", "--out", out]
    assert main(argv) == 0
    rows = json.loads(storage.read_bytes(out))
    assert rows[0]["encoder"] == "random init"
    capsys.readouterr()
    assert main(argv) == 2
    assert _one_line(capsys) == f"mpmae probe: error: {out} already exists; choose another --out"
    assert json.loads(storage.read_bytes(out)) == rows


def test_a_missing_bucket_or_refused_credentials_are_one_line_before_any_work(
        s3: S3Store, local: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    gone = "the bucket 'no-such-bucket-mpmae' does not exist"
    assert main(["export", str(local["checkpoint"]), MISSING]) == 2
    assert _one_line(capsys) == f"mpmae export: error: out: {MISSING}: {gone}"
    assert main(["export", MISSING, str(tmp_path / "export")]) == 2
    assert _one_line(capsys) == f"mpmae export: error: checkpoint: {MISSING}: {gone}"
    assert main(["probe", "--checkpoint", MISSING, "--task", "land_cover", "--data", str(local["data"])]) == 2
    assert _one_line(capsys) == f"mpmae probe: error: encoder: {MISSING}: {gone}"
    assert main(["visualize", str(local["checkpoint"]), str(local["data"]), "--out", MISSING]) == 2
    assert _one_line(capsys).startswith(f"mpmae visualize: error: out: {MISSING}")
    assert main(["tune", "--resume", "demo", "--storage-path", MISSING]) == 2
    assert _one_line(capsys) == f"mpmae tune: error: --storage-path: {MISSING}: {gone}"
    assert list(tmp_path.iterdir()) == []

    bucket = s3.bucket("refused")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-key")
    assert main(["export", str(local["checkpoint"]), f"{bucket}/export"]) == 2
    line = _one_line(capsys)
    assert line.startswith(f"mpmae export: error: out: {bucket}/export: access refused with the credentials of "
                           "the environment"), line


def test_a_store_that_stays_away_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    def away(checkpoint: str, out: str, layout: str = "mpmae") -> None:
        raise storage.StoreUnavailableError(f"{out}: the store did not answer (connection refused) after 3 tries")

    monkeypatch.setattr("mpmae.export.export_encoder", away)
    assert main(["export", "ckpt", "s3://b/x"]) == 1
    assert _one_line(capsys) == ("mpmae export: error: s3://b/x: the store did not answer (connection refused) "
                                 "after 3 tries")


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> None:
        raise AssertionError("Ray was started for a config that should have been refused")

    for module in ("mpmae.runtime.instance", "mpmae.tune.sweep"):
        monkeypatch.setattr(importlib.import_module(module), "ensure_ray", refuse)


def test_a_missing_bucket_stops_a_sweep_or_an_evaluation_before_ray(
        s3: S3Store, no_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mpmae.finetune.run import finetune
    from mpmae.tune.sweep import tune

    search = {"model": {"mask_ratio": {"uniform": [0.4, 0.9]}}}
    config = SweepConfig(storage_path=MISSING, search=search)
    config.validate()  # the URI's form; its store is checked where the command starts (validation runs in trials too)
    with pytest.raises(ConfigError, match=f"^storage_path: {MISSING}.*does not exist"):
        tune(config)
    with pytest.raises(ConfigError, match=f"^run.storage_path: {MISSING}.*does not exist"):
        finetune(FinetuneConfig(task="m-eurosat", run=RunConfig(num_workers=1, storage_path=MISSING)))
    with pytest.raises(ConfigError, match=f"^encoder: {MISSING}.*does not exist"):
        finetune(FinetuneConfig(task="m-eurosat", encoder=MISSING,
                                run=RunConfig(num_workers=1, storage_path=str(tmp_path))))
    assert main(["finetune", "task=m-eurosat", f"run.storage_path={MISSING}"]) == 2
    assert _one_line(capsys).startswith(f"mpmae finetune: error: run.storage_path: {MISSING}")
    assert main(["tune", "--config", str(REPO / "configs" / "tune_demo.yaml"), f"storage_path={MISSING}"]) == 2
    assert _one_line(capsys).startswith(f"mpmae tune: error: storage_path: {MISSING}")
    assert list(tmp_path.iterdir()) == []


def test_finetune_refuses_results_already_in_the_bucket(s3: S3Store) -> None:
    from mpmae.finetune.run import RESULTS_FILE, finetune

    runs = f"{s3.bucket('ft')}/runs"
    storage.write_bytes(f"{runs}/lp-demo/{RESULTS_FILE}", b"{}")
    config = FinetuneConfig(task="m-eurosat", mode="linear_probe", run=RunConfig(num_workers=1, name="lp-demo",
                                                                                storage_path=runs))
    with pytest.raises(FileExistsError, match=f"^{runs}/lp-demo/{RESULTS_FILE} already exists"):
        finetune(config)  # before any GEO-Bench file or Ray


def _result(trial: str, tag: str, score: float, epochs: int, mask_ratio: float) -> SimpleNamespace:
    metrics = {"trial_id": trial, "experiment_tag": tag, "probe_score": score, "epochs_done": epochs}
    return SimpleNamespace(metrics=metrics, error=None, path=f"bucket/sweeps/x/run_trial_{trial}",
                           config={"model.mask_ratio": mask_ratio})


def test_a_sweep_folder_in_a_bucket(local: dict[str, Path], s3: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """sweep.yaml written and read back, a rerun refused, the finished-trial check and the summary in a bucket
    (the Ray end to end: the cluster tests)."""
    from mpmae.tune import sweep as sweeps
    from mpmae.tune.plan import yaml_ready
    from mpmae.tune.summary import summarize

    storage_path = f"{s3.bucket('sweeps')}/sweeps"
    config = load_config(SweepConfig, REPO / "configs" / "tune_demo.yaml", [
        f"base={REPO / 'configs' / 'demo.yaml'}", f"pretrain.data.path={local['data']}",
        f"storage_path={storage_path}", "pretrain.optim.batch_size=8", "pretrain.optim.epochs=2",
        "pretrain.probe.epochs=2", "pretrain.probe.geobench_dir=s3://geobench/root"])
    sweep = sweeps.prepare_sweep(config)
    assert sweep.folder == f"{storage_path}/tune-demo"
    assert sweep.base["data"]["path"] == str(local["data"].resolve())
    assert sweep.base["probe"]["geobench_dir"] == "s3://geobench/root"  # a URI is kept as it is
    sweeps._write_sweep_file(sweep)
    loaded = sweeps.load_sweep(sweep.folder)
    assert loaded.folder == sweep.folder and loaded.base == yaml_ready(sweep.base)
    def ray_starts() -> None:
        raise RuntimeError("Ray starts")

    monkeypatch.setattr(sweeps, "ensure_ray", ray_starts)
    with pytest.raises(FileExistsError, match=f"^{sweep.folder} already exists"):
        sweeps.tune(config)
    with pytest.raises(RuntimeError, match="Ray starts"):  # --resume found and checked the sweep in the bucket
        sweeps.resume("tune-demo", storage_path)
    with pytest.raises(FileNotFoundError, match=f"^{storage_path}/other/sweep.yaml not found"):
        sweeps.resume("other", storage_path)

    trials = storage.join(sweep.folder, "trials")
    run = local["root"] / "trial"
    for epoch in (1, 2):
        small_state(run / f"epoch-{epoch:04d}", epoch=epoch)
        mark_complete_as_written(run / f"epoch-{epoch:04d}")
    storage.upload(run, storage.join(trials, "a1"))
    assert sweeps._finished_run_metrics(storage.join(trials, "a1"), epochs=2) == \
        {"epoch": 1, "epochs_done": 2, "probe_score": 0.1}
    assert sweeps._finished_run_metrics(storage.join(trials, "a1"), epochs=3) is None
    assert sweeps._finished_run_metrics(storage.join(trials, "none"), epochs=2) is None

    results = [_result("a1", "1_mask_ratio=0.5", 0.7, 2, 0.5), _result("b2", "2_mask_ratio=0.8", 0.4, 1, 0.8)]
    summary = summarize(sweep, results)
    assert summary["folder"] == sweep.folder and summary["best"]["trial_id"] == "a1"
    files = storage.file_sizes(sweep.folder)
    assert {"sweep.yaml", "trials.json", "trials.csv", "probe_score.png", "best_config.yaml"} <= set(files)
    assert [r["trial_id"] for r in json.loads(storage.read_bytes(storage.join(sweep.folder, "trials.json")))] == \
        ["a1", "b2"]
    encoder = summary["best_encoder"]
    assert encoder == storage.join(sweep.folder, "best-encoder-a1")
    kept = storage.read_bytes(storage.join(encoder, ENCODER_FILE))
    results.append(_result("c3", "3_mask_ratio=0.6", 0.5, 2, 0.6))
    again: dict[str, Any] = summarize(sweep, results)  # a resumed sweep: tables rewritten, the export kept
    assert len(json.loads(storage.read_bytes(storage.join(sweep.folder, "trials.json")))) == 3
    assert again["best_encoder"] == encoder and storage.read_bytes(storage.join(encoder, ENCODER_FILE)) == kept
