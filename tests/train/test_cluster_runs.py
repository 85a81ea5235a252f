"""Pretraining as it runs on a cloud cluster: data and results only in a bucket, workers on two nodes, a
node that vanishes, a spot node drained with a deadline, a store that goes away, checkpoints inside an epoch.

The session's cluster (tests/conftest.py) has a head and ``node-b``; a test adds a ``victim`` node. The
fault runs ask each worker for one ``trainer_slot``, which the head lacks, so the two workers sit on node-b
and the victim: losing the victim loses a worker mid-epoch. The only local files read are config files and
the source h5 (sharded into the bucket once per module) and the probe's h5.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import mpmae.storage as storage
from mpmae.checkpoint import COMPLETE_FILE, load_checkpoint, stored_checkpoint_names, stored_incomplete_reason
from mpmae.config import ConfigError, PretrainConfig, load_config
from mpmae.data.shards import write_shards
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.export import fetched
from mpmae.storage import StoreUnavailableError
from mpmae.train.trainer import pretrain

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray]

# 40 tiles -> 32 in train; a global batch of 8 -> 4 steps per epoch, whatever the worker count.
STEPS_PER_EPOCH = 4
#: The spot notice's lead time (seconds before the reclaim).
NOTICE_S = 45  # long enough for Ray Train's controller to see the drain on a loaded 2-core machine


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mmearth(tmp_path_factory.mktemp("cluster") / "data", tiles=40, seed=3)


@pytest.fixture(scope="module")
def shards(s3: Any, ray_cluster: Any, synth: Path) -> str:
    """The training split as Parquet shards in a bucket, written by Ray tasks (`mpmae shard` on a cluster)."""
    uri = storage.join(s3.bucket("data"), "shards")
    write_shards(synth, uri, tiles_per_shard=16, progress=False, parallel=True)
    return uri


def _config(data: str, storage_uri: str, name: str, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, REPO / "configs" / "demo.yaml", [
        f"data.path={data}", "data.format=parquet", f"run.storage_path={storage_uri}", f"run.name={name}",
        "optim.batch_size=8", "optim.epochs=2", "model.decoder_dim=64", "run.cpus_per_worker=0.5",
        "run.worker_resources={trainer_slot: 1}", "run.checkpoint_every_steps=2", "run.keep_checkpoints=20",
        *overrides,
    ])


def _markers(run: str) -> dict[str, dict[str, Any]]:
    """The complete.json of every whole checkpoint folder of a run in the store, by folder name (Ray
    uploads a folder's files in parallel: the small marker may land before the state)."""
    found = {}
    for name in stored_checkpoint_names(run):
        folder = storage.join(run, name)
        if stored_incomplete_reason(folder) is None:
            found[name] = json.loads(storage.read_bytes(storage.join(folder, COMPLETE_FILE)))
    return found


def _wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout} s")


def _final(run: str) -> dict[str, Any]:
    with fetched(run) as local:
        return load_checkpoint(local)


def _final_folder(run: str, name: str) -> Path:
    """A checkpoint folder of the store, downloaded (kept for the test's life by pytest's tmp folder)."""
    return storage.download(storage.join(run, name), Path(tempfile.mkdtemp()) / name)


def _in_background(work: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            work()
        except BaseException as err:  # noqa: BLE001 - surfaced by the test after the run
            errors.append(err)

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.timeout(420)
def test_a_lost_node_resumes_from_the_newest_step_checkpoint(
        s3: Any, ray_node: Callable[..., Any], shards: str) -> None:
    """A node vanishes mid-epoch (no notice); the autoscaler's replacement joins; the run resumes from the
    newest checkpoint in the bucket and ends with exactly the config's steps: none repeated, none skipped."""
    bucket = s3.bucket()
    run = storage.join(bucket, "runs", "loss")
    victim = ray_node({"trainer_slot": 1, "victim": 1})
    at_loss: dict[str, Any] = {}

    def lose_the_victim() -> None:
        _wait_for(lambda: any(m["batch"] for m in _markers(run).values()), 240, "no step checkpoint appeared")
        victim.kill()
        at_loss.update(max(_markers(run).values(), key=lambda m: m["step"]))
        ray_node({"trainer_slot": 1})  # the autoscaler's replacement

    thread, errors = _in_background(lose_the_victim)
    result = pretrain(_config(shards, storage.join(bucket, "runs"), "loss", "run.max_failures=2", "optim.epochs=2"))
    thread.join()
    assert not errors, errors
    payload = _final(run)
    assert payload["epoch"] == 2 and payload["step"] == 2 * STEPS_PER_EPOCH
    assert [h["step"] for h in payload["history"]] == [4, 8]
    resumed = payload["resumes"][-1]
    # Resumed from the newest checkpoint at the loss or a later one written before the group stopped:
    # the steps redone are fewer than run.checkpoint_every_steps.
    assert resumed["step"] >= at_loss["step"] and resumed["workers"] == 2
    assert result.path.startswith("s3://") or result.path.startswith(bucket.removeprefix("s3://"))
    assert all(m["files"]["state.pt"] > 0 for m in _markers(run).values())


@pytest.mark.timeout(420)
def test_a_drained_spot_node_gets_a_checkpoint_at_the_notice_and_the_run_shrinks(
        s3: Any, ray_cluster: Any, ray_node: Callable[..., Any], shards: str) -> None:
    """`ray drain-node` with the preemption reason, as the autoscaler does on a spot notice: the workers
    checkpoint at once and take no further step; Ray restarts the run without the node (elastic: one worker
    on), counting a preemption, not a failure (run.max_failures=0)."""
    bucket = s3.bucket()
    run = storage.join(bucket, "runs", "spot")
    victim = ray_node({"trainer_slot": 1})
    notice: dict[str, Any] = {}

    def drain_the_victim() -> None:
        _wait_for(lambda: any(m["batch"] for m in _markers(run).values()), 240, "no step checkpoint appeared")
        reclaim = time.monotonic() + NOTICE_S
        subprocess.run([str(Path(sys.executable).with_name("ray")), "drain-node", f"--address={ray_cluster.address}",
                        f"--node-id={victim.node_id}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message=spot reclaim", f"--deadline-remaining-seconds={NOTICE_S}"],
                       check=True, capture_output=True, timeout=60)
        notice.update(_wait_for(lambda: [m for m in _markers(run).values() if m["reason"] == "preemption"], 90,
                                "no checkpoint was taken at the notice")[0])
        time.sleep(max(0.0, reclaim - time.monotonic()))  # the cloud takes the instance at the deadline
        victim.kill()

    thread, errors = _in_background(drain_the_victim)
    pretrain(_config(shards, storage.join(bucket, "runs"), "spot", "run.min_workers=1", "run.max_failures=0",
                     "run.preemption_check_steps=1", "optim.epochs=3"))
    thread.join()
    assert not errors, errors
    payload = _final(run)
    assert payload["epoch"] == 3 and payload["step"] == 3 * STEPS_PER_EPOCH
    resumed = payload["resumes"][-1]
    assert resumed["step"] == notice["step"] and resumed["workers"] == 1  # no step lost beyond the notice
    assert [h["workers"] for h in payload["history"]][-1] == 1
    assert [h["step"] for h in payload["history"]] == [4, 8, 12]  # one worker: the same global batch


@pytest.mark.timeout(420)
def test_a_store_that_goes_away_fails_clearly_and_a_rerun_resumes(s3: Any, ray_node: Callable[..., Any],
                                                                  shards: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No store at the start: one line before any worker. The store gone mid-run: one line naming the run's
    storage; the checkpoint already whole stays loadable, and a rerun resumes from it without touching it."""
    bucket = s3.bucket()
    run = storage.join(bucket, "runs", "outage")
    ray_node({"trainer_slot": 1})
    config = _config(shards, storage.join(bucket, "runs"), "outage", "run.max_failures=0", "optim.epochs=2")
    monkeypatch.setattr(storage, "STORE_TRIES", 1)  # the driver's check: no retries to wait for
    with s3.outage(), pytest.raises(ConfigError, match=r"^run.storage_path: s3://.*/runs: the store did not answer"):
        pretrain(config)
    monkeypatch.undo()

    failed = threading.Event()

    def cut() -> None:
        _wait_for(lambda: _markers(run), 240, "no checkpoint appeared")
        with s3.outage():
            failed.wait(240)

    thread, errors = _in_background(cut)
    with pytest.raises(StoreUnavailableError, match=r"s3://.*/runs: the store did not answer while Ray Train"):
        pretrain(config)
    failed.set()
    thread.join()
    assert not errors, errors
    good = _markers(run)
    kept = {name: storage.info(storage.join(run, name, "state.pt")).mtime for name in good}
    payload = load_checkpoint(_final_folder(run, max(good, key=lambda n: good[n]["step"])))
    assert payload["step"] == max(m["step"] for m in good.values())

    pretrain(config)
    final = _final(run)
    assert final["step"] == 2 * STEPS_PER_EPOCH and final["resumes"][-1]["step"] == payload["step"]
    assert {name: storage.info(storage.join(run, name, "state.pt")).mtime for name in good} == kept


@pytest.mark.timeout(420)
def test_the_cloud_workflow_keeps_data_and_results_in_the_bucket(s3: Any, shards: str, synth: Path) -> None:
    """Shards in the bucket -> pretraining with its workers on two nodes -> export -> probe, every result in
    the bucket; a rerun of the export overwrites nothing."""
    from ray.util.state import list_actors

    from mpmae.cli import main
    from mpmae.evaluation.probe_table import probe_table
    from mpmae.export import export_encoder, export_files, load_encoder
    from mpmae.models import Classifier

    bucket = s3.bucket()
    nodes: set[str] = set()

    def watch_placement() -> None:
        def placed() -> bool:
            workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            nodes.update(w.node_id for w in workers)
            return len(nodes) >= 2
        _wait_for(placed, 240, "the workers never ran on two nodes")

    thread, errors = _in_background(watch_placement)
    result = pretrain(_config(shards, storage.join(bucket, "runs"), "e2e", "optim.epochs=1",
                              "run.worker_resources={}", "run.placement_strategy=STRICT_SPREAD"))
    thread.join()
    assert not errors and len(nodes) == 2, (errors, nodes)
    run = storage.join(bucket, "runs", "e2e")
    payload = _final(run)
    assert payload["epoch"] == 1 and payload["step"] == STEPS_PER_EPOCH and payload["history"][0]["loss"] > 0
    assert set(payload) >= {"model", "optimizer", "scheduler", "scaler", "config", "data_position", "norm_stats"}
    assert payload["norm_stats"]["bands"][7] == "B8A"
    metrics = result.metrics
    assert {f"loss/{t}" for t in ("sentinel2", "biome", "esa_worldcover")} <= set(metrics)
    assert {"lr", "samples_per_s", "data_wait_s", "weight/era5", "log_var/era5", "skipped_steps"} <= set(metrics)
    assert metrics["skipped_steps"] == 0 and metrics["samples_per_s"] > 0 and metrics["workers"] == 2

    export = storage.join(bucket, "exports", "e2e")
    assert export_encoder(run, export) == export
    assert set(storage.file_sizes(export)) == set(export_files())
    card = storage.read_bytes(storage.join(export, "model_card.json"))
    facts = json.loads(card)
    assert facts["bands"] == payload["norm_stats"]["bands"] and facts["patch_size"] == 8
    assert facts["input_size"] == 56 and len(facts["normalisation"]["sentinel2_l2a"]["mean"]) == 12
    encoder, _ = load_encoder(export)  # strict: no missing or unexpected keys
    assert Classifier(encoder, 43)(torch.zeros(1, 12, 120, 120)).shape == (1, 43)
    assert main(["export", run, export]) == 2  # refused, naming the file; nothing rewritten
    assert storage.read_bytes(storage.join(export, "model_card.json")) == card
    rows = probe_table([export, None], "land_cover", data=synth, epochs=20)
    assert rows[0]["encoder"] and all(0.0 <= r["score"] <= 1.0 for r in rows)
    assert main(["probe", "--checkpoint", export, "--task", "land_cover", "--data", str(synth), "--epochs", "5",
                 "--out", storage.join(bucket, "probe.json")]) == 0
    assert json.loads(storage.read_bytes(storage.join(bucket, "probe.json")))[0]["task"] == "land_cover"
