"""Ray Tune sweeps on the session's Ray head: ASHA stops trials early; a killed sweep resumes."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import mpmae.storage as storage
from mpmae.checkpoint import stored_checkpoint_names
from mpmae.config import PretrainConfig, SweepConfig, load_config
from mpmae.data.shards import write_shards
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.export import load_encoder
from mpmae.tune.plan import METRIC, TRIALS_DIR
from mpmae.tune.sweep import resume, tune

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Small pretraining data, and a larger folder whose 100 val tiles the probe scores (its continuous score
    never ties trials, which ASHA would all keep)."""
    root = tmp_path_factory.mktemp("sweep")
    return (write_synthetic_mmearth(root / "pretrain", tiles=40, seed=3),
            write_synthetic_mmearth(root / "probe", tiles=1000, seed=4))


def _overrides(data: tuple[Path, Path], storage_path: Path | str, name: str, *extra: str) -> list[str]:
    return [
        f"name={name}", f"storage_path={storage_path}", f"base={REPO / 'configs' / 'demo.yaml'}",
        f"pretrain.data.path={data[0]}", f"pretrain.probe.data={data[1]}", "pretrain.probe.epochs=100",
        "pretrain.optim.batch_size=8", "pretrain.optim.epochs=2", "pretrain.model.decoder_dim=64",
        "search_alg.sampler=random", *extra,
    ]


def _sweep(*overrides: str) -> SweepConfig:
    return load_config(SweepConfig, REPO / "configs" / "tune_demo.yaml", overrides)


@pytest.mark.timeout(900)
def test_asha_sweep_stops_trials_early_and_writes_its_summary(
    ray_cluster: object, s3: Any, mlflow_server: str, data: tuple[Path, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sweep as on a cloud cluster: its trials train on Parquet shards in a bucket and every result (Tune's
    state, the trials' checkpoints, tables, plot, best config and encoder) goes to the bucket. Tracked in
    MLflow: the sweep's run, each trial's nested under it, the best one tagged."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    bucket = s3.bucket()
    shards = storage.join(bucket, "shards")
    write_shards(data[0], shards, tiles_per_shard=16, progress=False)
    # reduction factor 4, one rung after epoch 1: a trial goes on only with the best score so far
    summary = tune(_sweep(*_overrides(data, bucket, "asha", "num_samples=5", "scheduler.grace_period=1",
                                      "scheduler.reduction_factor=4", f"pretrain.data.path={shards}",
                                      "pretrain.data.format=parquet", "tracking.mlflow=true",
                                      "tracking.experiment=sweeps")))
    folder = storage.join(bucket, "asha")
    rows = summary["trials"]
    assert len(rows) == 5 and {r["state"] for r in rows} <= {"completed", "stopped early"}
    stopped = [r for r in rows if r["state"] == "stopped early"]
    assert stopped and all(r["epochs_run"] == 1 for r in stopped), [(r[METRIC], r["state"]) for r in rows]
    assert any(r["state"] == "completed" and r["epochs_run"] == 2 for r in rows)
    assert all(0.0 <= r["probe_score_low"] <= r["probe_score"] <= r["probe_score_high"] <= 1.0 for r in rows)
    assert all(0.0 <= r["probe_accuracy"] <= 1.0 for r in rows) and "95 % intervals" in summary["separation"]
    for row in rows:  # every trial is its own Train run, checkpointed at each probe
        assert len(stored_checkpoint_names(storage.join(folder, TRIALS_DIR, row["trial_id"]))) == row["epochs_run"]

    table = list(csv.DictReader(io.StringIO(storage.read_bytes(storage.join(folder, "trials.csv")).decode())))
    assert [r["trial_id"] for r in table] == [r["trial_id"] for r in rows]
    assert {"probe_score", "probe_score_low", "probe_score_high", "probe_accuracy", "epochs_run", "state",
            "model.mask_ratio", "optim.blr", "model.loss"} <= set(table[0])
    assert json.loads(storage.read_bytes(storage.join(folder, "trials.json")))[0]["trial_id"] == rows[0]["trial_id"]
    assert storage.info(storage.join(folder, "probe_score.png")).size > 10_000

    best = summary["best"]
    assert best["probe_score"] == max(r["probe_score"] for r in rows)
    best_config = tmp_path / "best_config.yaml"
    best_config.write_bytes(storage.read_bytes(storage.join(folder, "best_config.yaml")))
    config = load_config(PretrainConfig, best_config)
    assert config.model.mask_ratio == best["model.mask_ratio"] and config.optim.blr == best["optim.blr"]
    assert config.model.loss == best["model.loss"] and config.run.name == "asha-best"
    assert config.optim.epochs == 2 and config.probe.task == "land_cover"
    assert config.data.path == shards
    if best["model.loss"] == "weighted":
        assert config.model.task_weights == {k.rsplit(".", 1)[1]: v for k, v in best.items()
                                             if k.startswith("model.task_weights.")}
    encoder, card = load_encoder(storage.join(folder, f"best-encoder-{best['trial_id']}"))
    assert card["bands"][0] == "B1" and encoder.features_only
    _check_tracked_sweep(mlflow_server, rows, best)


def _check_tracked_sweep(uri: str, rows: list[dict[str, Any]], best: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    (sweep_run,) = [r for r in runs if r.data.tags.get("mpmae.kind") == "sweep"]
    assert sweep_run.info.run_name == "asha" and sweep_run.info.status == "FINISHED"
    assert sweep_run.data.tags["mpmae.best_trial_id"] == best["trial_id"]
    assert sweep_run.data.params["scheduler.reduction_factor"] == "4.0"
    assert {a.path for a in client.list_artifacts(sweep_run.info.run_id)} == {
        "trials.csv", "trials.json", "probe_score.png", "best_config.yaml"}
    trials = {r.info.run_name: r for r in runs if r is not sweep_run}
    assert set(trials) == {r["trial_id"] for r in rows}
    status = {"completed": "FINISHED", "stopped early": "KILLED"}
    for row in rows:
        run = trials[row["trial_id"]]
        assert run.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
        assert run.info.status == status[row["state"]]
        assert run.data.metrics["probe_score"] == pytest.approx(row["probe_score"])
        assert run.data.params["model.mask_ratio"] == str(row["model.mask_ratio"])
        assert (run.data.tags.get("mpmae.best_trial") == "true") == (row["trial_id"] == best["trial_id"])


def _terminated_trials(folder: Path) -> int:
    """Trials that Tune's saved experiment state records as finished."""
    states = sorted(folder.glob("experiment_state-*.json"))
    if not states:
        return 0
    try:
        trials = json.loads(states[-1].read_text())["trial_data"]
    except (json.JSONDecodeError, KeyError):
        return 0  # caught mid-write
    return sum(json.loads(state)["status"] == "TERMINATED" for state, _ in trials)


@pytest.mark.timeout(900)
def test_killed_sweep_resumes_without_rerunning_finished_trials(
    ray_cluster, data: tuple[Path, Path], tmp_path: Path
) -> None:
    overrides = _overrides(data, tmp_path, "killed", "num_samples=2", "scheduler.type=fifo")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "mpmae.cli", "tune", "--config", str(REPO / "configs" / "tune_demo.yaml"),
             *overrides], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        folder = tmp_path / "killed"
        deadline = time.monotonic() + 600
        while _terminated_trials(folder) < 1:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first trial did not finish"
            time.sleep(1)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()

    first = [p for p in (folder / TRIALS_DIR).iterdir() if len(list(p.glob("epoch-*"))) == 2]
    assert len(first) == 1
    before = {p.name: p.stat().st_mtime_ns for p in first[0].glob("epoch-*")}

    summary = resume("killed", tmp_path)
    rows = summary["trials"]
    assert [r["state"] for r in rows] == ["completed", "completed"]
    assert first[0].name in {r["trial_id"] for r in rows}
    assert {p.name: p.stat().st_mtime_ns for p in first[0].glob("epoch-*")} == before  # not trained again
    assert _terminated_trials(folder) == 2
