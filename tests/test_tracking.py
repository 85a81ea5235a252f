"""Experiment tracking against a real MLflow server on loopback, and TensorBoard files read back with
tensorboard's own event reader. (Evaluation runs: tests/external/test_finetune_real.py; sweeps:
tests/tune/test_sweep.py.)"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest

import mpmae.storage as storage
from mpmae.config import PretrainConfig, TrackingConfig, load_config
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.modalities import resolve_selection
from mpmae.tracking import RUN_TAG, Tracker, TrackingError, flatten, open_run
from mpmae.train.trainer import pretrain

REPO = Path(__file__).resolve().parents[1]
# 40 tiles -> 32 in train; batch 8 -> 4 optimizer steps per epoch.
STEPS_PER_EPOCH = 4


def test_params_are_the_config_with_dotted_keys() -> None:
    params = flatten({"model": {"mask_ratio": 0.6, "targets": ["sentinel2", "era5"], "task_weights": None},
                      "optim": {"betas": (0.9, 0.95), "blr": 1.5e-4}, "run": {"worker_resources": {}}})
    assert params == {"model.mask_ratio": "0.6", "model.targets": "['sentinel2', 'era5']",
                      "model.task_weights": "null", "optim.betas": "[0.9, 0.95]", "optim.blr": "0.00015",
                      "run.worker_resources": "{}"}


def test_tracking_without_a_server_is_refused_before_any_worker(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    config = TrackingConfig(mlflow=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(TrackingError, match="MLFLOW_TRACKING_URI is unset"):
        open_run(config, str(tmp_path / "run"), "run", {})
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", dead)
    with pytest.raises(TrackingError, match=f"server at MLFLOW_TRACKING_URI={dead} does not answer"):
        open_run(config, str(tmp_path / "run"), "run", {})
    # the same check runs in `pretrain` before Ray starts: a run of the demo config fails at once
    data = write_synthetic_mmearth(tmp_path / "data", tiles=20, seed=1)
    with pytest.raises(TrackingError, match="does not answer"):
        pretrain(load_config(PretrainConfig, REPO / "configs" / "demo.yaml", [
            f"data.path={data}", f"run.storage_path={tmp_path}", "optim.batch_size=8", "tracking.mlflow=true"]))
    assert not (tmp_path / "demo").exists()


def test_a_server_gone_mid_run_costs_a_warning(mlflow_server: str, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    spec = open_run(TrackingConfig(mlflow=True, experiment="outage"), str(tmp_path / "run"), "run", {"a": 1})
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        spec["mlflow"]["uri"] = f"http://127.0.0.1:{sock.getsockname()[1]}"  # the server, gone
    tracker = Tracker(spec)
    (tmp_path / "card.json").write_text("{}")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="mpmae.tracking"):
        tracker.log_metrics({"loss": 1.0}, 4)
        tracker.log_artifacts([tmp_path / "card.json"])
        tracker.finish()
    assert time.monotonic() - start < 30
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and all("training goes on" in w for w in warnings)
    assert "log metrics to MLflow" in warnings[0] and "attach card.json" in warnings[1]


def _metric_steps(client: Any, run_id: str, key: str) -> list[int]:
    return [m.step for m in client.get_metric_history(run_id, key)]


def _events(bucket_prefix: str, local: Path) -> Any:
    """TensorBoard's reader over the event files of a bucket prefix, copied down."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    local.mkdir()
    for name in storage.file_sizes(bucket_prefix):
        (local / name).write_bytes(storage.read_bytes(storage.join(bucket_prefix, name)))
    accumulator = EventAccumulator(str(local))
    accumulator.Reload()
    return accumulator


@pytest.mark.ray
@pytest.mark.timeout(500)
def test_a_pretraining_run_in_a_bucket_is_tracked_and_resumes_into_its_run(
    ray_cluster: object, s3: Any, mlflow_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    data = write_synthetic_mmearth(tmp_path / "data", tiles=40, seed=3)
    bucket = s3.bucket()

    def config(epochs: int) -> PretrainConfig:
        return load_config(PretrainConfig, REPO / "configs" / "demo.yaml", [
            f"data.path={data}", f"run.storage_path={bucket}", "run.name=tracked", "optim.batch_size=8",
            f"optim.epochs={epochs}", "model.decoder_dim=64", "probe.task=land_cover", "probe.epochs=20",
            "tracking.mlflow=true", "tracking.tensorboard=true", "tracking.experiment=pretraining",
        ])

    pretrain(config(2))
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("pretraining").experiment_id
    (run,) = client.search_runs([experiment])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert run.data.tags[RUN_TAG] == storage.join(bucket, "tracked")
    params = run.data.params
    assert params["model.mask_ratio"] == "0.6" and params["optim.blr"] == "0.002"
    assert params["optim.epochs"] == "2" and params["model.targets"] == "all_mod"
    tasks = list(resolve_selection("all_mod"))
    keys = ["loss", "lr", "samples_per_s", "data_wait_s", "probe_score",
            *(f"loss/{t}" for t in tasks), *(f"weight/{t}" for t in tasks)]
    for key in keys:  # one point per epoch, at the global optimizer step
        assert _metric_steps(client, run_id, key) == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH], key
    assert 0.0 <= run.data.metrics["probe_score"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"model_card.json", "loss_curves.png", "reconstructions"} <= artifacts
    assert "reconstructions/recon_sentinel2.png" in {a.path for a in client.list_artifacts(run_id, "reconstructions")}
    card = client.download_artifacts(run_id, "model_card.json", str(tmp_path))
    assert '"steps": 8' in Path(card).read_text()

    events = _events(storage.join(bucket, "tracked", "tensorboard"), tmp_path / "events")
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    mlflow_losses = [m.value for m in client.get_metric_history(run_id, "loss")]
    assert [e.value for e in losses] == pytest.approx(mlflow_losses, rel=1e-6)
    assert {"weight/era5", "probe_score", "data_wait_s"} <= set(events.Tags()["scalars"])

    pretrain(config(3))  # resumed from epoch 2: the same MLflow run goes on
    (again,) = client.search_runs([experiment])
    assert again.info.run_id == run_id and again.info.status == "FINISHED"
    assert _metric_steps(client, run_id, "loss") == [STEPS_PER_EPOCH * e for e in (1, 2, 3)]
    assert again.data.params["optim.epochs"] == "2"  # params keep their first values (MLflow's rule)
