"""Ray-facing robustness: resources checked before Train waits, lasting errors not retried, a readable log,
DDP gradients in their buckets' layout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

from mpmae.config import ConfigError, PretrainConfig, RunConfig, load_config
from mpmae.data.mmearth import MMEarthDataset, MMEarthFormatError
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.runtime.instance import resource_shortfall
from mpmae.runtime.run import lasting_error
from mpmae.train.trainer import pretrain
from tests.crafted.mmearth import write_corrupt_chunk

REPO = Path(__file__).resolve().parents[2]
DATA = {"the Ray Data pipeline": 1.0}


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_mmearth(tmp_path_factory.mktemp("safety") / "data", tiles=40, seed=3)


def _overrides(data: Path, storage: Path, name: str, *extra: str) -> list[str]:
    return [f"data.path={data}", f"run.storage_path={storage}", f"run.name={name}", "optim.batch_size=8",
            "optim.epochs=2", "model.decoder_dim=64", *extra]


def _config(data: Path, storage: Path, name: str, *extra: str) -> PretrainConfig:
    return load_config(PretrainConfig, REPO / "configs" / "demo.yaml", _overrides(data, storage, name, *extra))


def test_resource_shortfall_names_what_is_missing() -> None:
    """The 2-core hang: 2 workers x 1 CPU leave Ray Data no CPU; 16 workers never fit."""
    run = RunConfig(num_workers=2, cpus_per_worker=1.0)
    assert resource_shortfall(run, DATA, {"CPU": 3.0}, {"CPU": 3.0}) is None
    assert resource_shortfall(run, DATA, {"CPU": 2.0}, {"CPU": 2.0}) == (
        "run.num_workers: 2 workers x 1 CPU (run.cpus_per_worker), plus 1 for the Ray Data pipeline, need 3 CPUs; "
        "the cluster has 2 (1 missing)")
    assert "need 17 CPUs; the cluster has 3 (14 missing)" in resource_shortfall(
        RunConfig(num_workers=16), DATA, {"CPU": 3.0}, {"CPU": 3.0})
    assert resource_shortfall(RunConfig(num_workers=2, cpus_per_worker=4.0), {}, {"CPU": 8.0}, {"CPU": 4.0}) is None
    assert resource_shortfall(RunConfig(num_workers=1, cpus_per_worker=6.0), {}, {"CPU": 8.0}, {"CPU": 4.0}) == (
        "run.cpus_per_worker: a worker needs 6 CPUs on one node; the largest node has 4")
    assert resource_shortfall(RunConfig(num_workers=2, use_gpu=True), {}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}) == (
        "run.use_gpu: 2 workers x 1 GPU need 2 GPUs; the cluster has 1 (1 missing)")


def test_lasting_errors_are_found_inside_rays_wrappers() -> None:
    """Bad data, config or checkpoints (ValueErrors) recur on every retry; a killed worker does not."""
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    bad = MMEarthFormatError("x.h5: dataset 'aster', row 3: cannot be read (corrupt file: inflate() failed)")
    read_task = RayTaskError("ReadMMEarth", "Traceback ...", bad).as_instanceof_cause()
    assert isinstance(read_task, MMEarthFormatError) and read_task is not bad
    failures = {1: RuntimeError("collective aborted"), 0: read_task}
    assert lasting_error(WorkerGroupError("two ranks failed", failures)) is bad
    assert lasting_error(ControllerError(bad)) is bad
    assert lasting_error(WorkerGroupError("killed", {0: RuntimeError("worker died")})) is None


def test_ddp_gradients_match_their_bucket_views(synth: Path) -> None:
    """DDP's "grad strides" warning came from the depthwise convs' gradients in the channels-last layout of
    the activations, unlike their contiguous weights; the worker now lays the weights out the same way."""
    import torch.distributed as dist

    from mpmae.data.loaders import aligned_random_crop
    from mpmae.models import MPMAE
    from mpmae.runtime.run import channels_last
    from mpmae.train.step import forward_backward

    config = _config(synth, synth.parent, "ddp")
    batch = {k: torch.as_tensor(v) for k, v in MMEarthDataset(synth, "train", config.model.targets)
             .read_batch(range(4)).items() if k != "id"}
    batch = aligned_random_crop(batch, config.data.crop_size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
        try:
            model = channels_last(MPMAE(config.model))
            ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                forward_backward(ddp, batch, 1, torch.device("cpu"), False)
        finally:
            dist.destroy_process_group()
    assert not [w for w in caught if "Grad strides" in str(w.message)]
    mismatched = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()]
    assert mismatched == []
    assert model.encoder.stages[0][0].dwconv.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_more_workers_than_the_cluster_holds_are_refused(ray_cluster: object, synth: Path, tmp_path: Path) -> None:
    """16 workers on the session's few CPUs: refused at once, where Train used to wait forever."""
    import ray

    have = ray.cluster_resources()["CPU"]
    config = _config(synth, tmp_path, "too-many", "run.num_workers=16", "optim.batch_size=16")
    expected = rf"need 9 CPUs; the cluster has {have:g} \({9 - have:g} missing\)$"
    with pytest.raises(ConfigError, match=r"^run\.num_workers: 16 workers x 0\.5 CPU .*plus 1 for the Ray Data "
                                          r"pipeline, " + expected):
        pretrain(config)
    assert not (tmp_path / "too-many").exists()


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_an_autoscaling_cluster_is_given_time_to_grow(ray_cluster: object, synth: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With node types that can grow (as the autoscaler publishes them in GCS), the driver asks for the
    run's bundles, waits ``run.resource_wait_s``, then says what is still missing and withdraws the request."""
    import ray
    import ray._private.state
    import ray.autoscaler.sdk
    from ray.core.generated import autoscaler_pb2

    cluster = autoscaler_pb2.ClusterConfig()
    group = cluster.node_group_configs.add()
    group.resources["CPU"] = 4
    group.min_count, group.max_count = 0, 8
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: cluster)
    requests: list[list[dict]] = []
    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", lambda bundles: requests.append(bundles))
    have = int(ray.cluster_resources()["CPU"])
    workers = 2 * have  # x 0.5 CPU, plus 1 for Ray Data: one CPU short
    config = _config(synth, tmp_path, "grow", f"run.num_workers={workers}", f"optim.batch_size={workers}",
                     "run.resource_wait_s=2")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=rf"need {have + 1} CPUs; the cluster has {have} \(1 missing\), after "
                                          r"waiting 2 s \(run\.resource_wait_s\) for the autoscaler$"):
        pretrain(config)
    assert 2 <= time.monotonic() - start < 30
    assert requests == [[{"CPU": 0.5}] * workers + [{"CPU": 1.0}], []]

    group.max_count = 1  # 4 CPUs at most: no use waiting
    with pytest.raises(ConfigError, match=r"\(1 missing\); its autoscaler cannot add that many$"):
        pretrain(config)


def _train_workers_started() -> int:
    from ray.util.state import list_actors

    return len(list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_bad_data_fail_the_run_at_once(ray_cluster: object, tmp_path: Path) -> None:
    """A damaged chunk fails every attempt the same way: one attempt, and the driver raises the error
    naming the file, dataset and row (it used to be retried max_failures times: 198 s, 942 log lines)."""
    damage = write_corrupt_chunk(tmp_path / "broken", tiles=40)
    before = _train_workers_started()
    start = time.monotonic()
    with pytest.raises(MMEarthFormatError) as caught:
        pretrain(_config(damage.folder, tmp_path, "bad-data", "run.max_failures=2"))
    assert time.monotonic() - start < 150
    assert re.fullmatch(rf"{re.escape(str(damage.h5))}: dataset 'sentinel2', rows? [0-9.]+: cannot be read "
                        r"\(corrupt file: .*\)", str(caught.value))  # one line, Ray Data's retry advice dropped
    assert _train_workers_started() - before <= 2  # one attempt of 2 workers (none if the driver finds it)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_log_has_one_line_per_epoch(ray_cluster: object, synth: Path, tmp_path: Path) -> None:
    """`mpmae pretrain` with 2 workers: no report dicts, DDP or deprecation warnings; an epoch line each epoch."""
    command = [sys.executable, "-m", "mpmae.cli", "pretrain", "--config", str(REPO / "configs" / "demo.yaml"),
               *_overrides(synth, tmp_path, "log")]
    done = subprocess.run(command, env={**os.environ, "RAY_ADDRESS": ray_cluster.address}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=280)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    assert "TrainingReport(" not in log
    assert "Grad strides" not in log
    assert "Deprecat" not in log
    # Every node of the session's one-machine cluster forwards the same worker log files: lines repeat.
    lines = list(dict.fromkeys(log.splitlines()))
    assert re.findall(r"epoch (\d+)/2 step \d+ loss", "\n".join(lines)) == ["1", "2"]
