"""Pretraining on Ray Train with 2 CPU workers: training, checkpoints, resume, worker failure, job submit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import pytest
import torch

from mpmae.checkpoint import load_checkpoint
from mpmae.config import ConfigError, PretrainConfig, load_config
from mpmae.data.shards import write_shards
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.export import export_encoder, load_encoder
from mpmae.models import Classifier
from mpmae.models.convnextv2 import ConvNeXtV2
from mpmae.train.trainer import describe_data, pretrain

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray]

# 40 tiles -> 32 in train; batch 8 over 2 workers -> 4 steps per epoch.
STEPS_PER_EPOCH = 4


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mmearth(tmp_path_factory.mktemp("pretrain") / "data", tiles=40, seed=3)


def _config(synth: Path, storage: Path, name: str, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, REPO / "configs" / "demo.yaml", [
        f"data.path={synth}", f"run.storage_path={storage}", f"run.name={name}", "optim.batch_size=8",
        "optim.epochs=2", "model.decoder_dim=64", *overrides,
    ])


def _checkpoints(storage: Path, name: str) -> list[Path]:
    return sorted((storage / name).glob("epoch-*"))


@pytest.mark.timeout(300)
def test_two_workers_train_and_checkpoint(ray_cluster: object, synth: Path, tmp_path: Path) -> None:
    result = pretrain(_config(synth, tmp_path, "basic"))
    payload = load_checkpoint(result.checkpoint.path)
    assert payload["epoch"] == 2 and payload["step"] == 2 * STEPS_PER_EPOCH
    assert [h["epoch"] for h in payload["history"]] == [0, 1]
    metrics = result.metrics
    assert {f"loss/{t}" for t in ("sentinel2", "biome", "esa_worldcover")} <= set(metrics)
    assert {"lr", "samples_per_s", "data_wait_s", "weight/era5", "log_var/era5", "skipped_steps"} <= set(metrics)
    assert metrics["skipped_steps"] == 0 and metrics["samples_per_s"] > 0
    assert set(payload) >= {"model", "optimizer", "scheduler", "scaler", "config", "data_position", "norm_stats"}
    assert payload["norm_stats"]["bands"][7] == "B8A"

    out = export_encoder(result.checkpoint.path, tmp_path / "export")
    encoder = ConvNeXtV2(12, "atto", 8, features_only=True)
    encoder.load_state_dict(torch.load(out / "encoder.pt", weights_only=True))  # strict: no missing keys
    card = json.loads((out / "model_card.json").read_text())
    assert card["bands"] == payload["norm_stats"]["bands"] and card["patch_size"] == 8
    assert card["input_size"] == 56 and len(card["normalisation"]["sentinel2_l2a"]["mean"]) == 12
    with pytest.raises(FileExistsError, match="encoder.pt already exists"):
        export_encoder(result.checkpoint.path, out)
    finetune_encoder, card = load_encoder(out)  # strict: no missing or unexpected keys
    logits = Classifier(finetune_encoder, 43)(torch.zeros(1, 12, 120, 120))
    assert logits.shape == (1, 43) and card["architecture"]["stem"] == "modified"


@pytest.mark.timeout(400)
def test_resume_after_the_driver_is_killed(ray_cluster: object, synth: Path, tmp_path: Path) -> None:
    """A run stopped mid-way continues from its latest checkpoint: no epoch repeated, none lost."""
    script = (
        "import sys, ray; from mpmae.config import load_config, PretrainConfig;"
        "from mpmae.train.trainer import pretrain;"
        f"ray.init(address={ray_cluster.address!r});"
        "pretrain(load_config(PretrainConfig, sys.argv[1], sys.argv[2:]))"
    )
    overrides = [f"data.path={synth}", f"run.storage_path={tmp_path}", "run.name=resume", "optim.batch_size=8",
                 "optim.epochs=4", "model.decoder_dim=64"]
    driver = subprocess.Popen([sys.executable, "-c", script, str(REPO / "configs" / "demo.yaml"), *overrides],
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not _checkpoints(tmp_path, "resume") and time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
    assert _checkpoints(tmp_path, "resume"), "the first run never wrote a checkpoint"
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    stopped_at = load_checkpoint(_checkpoints(tmp_path, "resume")[-1])["epoch"]
    assert stopped_at < 4

    config = load_config(PretrainConfig, REPO / "configs" / "demo.yaml", overrides)
    payload = load_checkpoint(pretrain(config).checkpoint.path)
    assert payload["epoch"] == 4 and payload["step"] == 4 * STEPS_PER_EPOCH
    assert [h["epoch"] for h in payload["history"]] == [0, 1, 2, 3]
    assert [h["step"] for h in payload["history"]] == [STEPS_PER_EPOCH * (e + 1) for e in range(4)]


@pytest.mark.timeout(400)
def test_killed_worker_is_restarted_and_the_run_completes(ray_cluster: object, synth: Path, tmp_path: Path) -> None:
    from ray.util.state import list_actors

    killed: list[int] = []

    def kill_a_worker_after_the_first_checkpoint() -> None:
        deadline = time.time() + 240
        while not _checkpoints(tmp_path, "failure") and time.time() < deadline:
            time.sleep(0.5)
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        if workers:
            os.kill(workers[-1].pid, signal.SIGKILL)
            killed.append(workers[-1].pid)

    killer = threading.Thread(target=kill_a_worker_after_the_first_checkpoint, daemon=True)
    killer.start()
    result = pretrain(_config(synth, tmp_path, "failure", "optim.epochs=4", "run.max_failures=2"))
    killer.join()
    assert killed, "no worker was found to kill"
    payload = load_checkpoint(result.checkpoint.path)
    assert payload["epoch"] == 4 and payload["step"] == 4 * STEPS_PER_EPOCH
    assert [h["epoch"] for h in payload["history"]] == [0, 1, 2, 3]


@pytest.mark.timeout(400)
def test_ray_job_submit_to_a_head_on_loopback(ray_cluster: object, synth: Path, tmp_path: Path) -> None:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    command = [
        ray_cli, "job", "submit", "--address", ray_cluster.dashboard_url, "--working-dir", str(REPO),
        "--runtime-env", str(REPO / "ray_jobs" / "runtime_env.yaml"), "--",
        sys.executable, "ray_jobs/pretrain.py", "--config", "configs/demo.yaml", f"data.path={synth}",
        f"run.storage_path={tmp_path}", "run.name=job", "optim.batch_size=8", "optim.epochs=1",
        "model.decoder_dim=64",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=360, cwd=REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout
    assert load_checkpoint(_checkpoints(tmp_path, "job")[-1])["epoch"] == 1


@pytest.mark.timeout(400)
@pytest.mark.parametrize("fmt", ["parquet", "ffcv"])
def test_trains_from_shards(ray_cluster: object, synth: Path, tmp_path: Path, fmt: str) -> None:
    """Parquet shards feed Ray Data; FFCV shards are divided between the workers, each reading its own."""
    write_shards(synth, tmp_path / "shards", format=fmt, tiles_per_shard=16, progress=False)
    config = _config(tmp_path / "shards", tmp_path, fmt, f"data.format={fmt}", "optim.epochs=1")
    assert describe_data(config).rows == 32
    payload = load_checkpoint(pretrain(config).checkpoint.path)
    assert payload["epoch"] == 1 and payload["step"] == STEPS_PER_EPOCH
    assert payload["history"][0]["loss"] > 0


def test_data_errors_are_raised_before_any_worker_starts(synth: Path, tmp_path: Path) -> None:
    broken = write_synthetic_mmearth(tmp_path / "broken", tiles=8, seed=1)
    with h5py.File(next(broken.glob("*.h5")), "r+") as h5:
        del h5["aster"]
    with pytest.raises(ConfigError, match=r"^data\.path: .*missing dataset 'aster'"):
        describe_data(_config(broken, tmp_path, "x"))
    with pytest.raises(ConfigError, match=r"^optim\.batch_size: 32 tiles .* less than one batch of 32"):
        describe_data(_config(synth, tmp_path, "x", "optim.batch_size=64"))
    with pytest.raises(ConfigError, match=r"^data\.crop_size: 72 exceeds the data's tiles of 64 px"):
        describe_data(_config(synth, tmp_path, "x", "data.crop_size=72"))
