"""Pretraining on Ray Train with 2 CPU workers and local storage: resume after the driver dies, job submit,
shards. (Runs in a bucket, on two nodes, through node loss and preemption: test_cluster_runs.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from mpmae.checkpoint import load_checkpoint
from mpmae.config import ConfigError, PretrainConfig, load_config
from mpmae.data.shards import write_shards
from mpmae.data.synth import write_synthetic_mmearth
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
def test_trains_from_ffcv_shards(ray_cluster: object, synth: Path, tmp_path: Path) -> None:
    """FFCV shards are divided between the workers, each reading its own (Parquet shards feed Ray Data from a
    bucket in test_cluster_runs.py)."""
    write_shards(synth, tmp_path / "shards", format="ffcv", tiles_per_shard=16, progress=False)
    config = _config(tmp_path / "shards", tmp_path, "ffcv", "data.format=ffcv", "optim.epochs=1")
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
