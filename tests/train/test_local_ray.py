"""The embedded local Ray instance of `mpmae pretrain` / `mpmae tune` (no RAY_ADDRESS): a machine's
instances neither find nor disturb each other."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = """
import ray
from ray._private.utils import read_ray_address
from mpmae.runtime.instance import ensure_ray

ensure_ray()
print(ray.get_runtime_context().gcs_address, read_ray_address(), ray.cluster_resources()["CPU"])
"""

#: A Train run that holds its placement group until the file ``release`` appears, as long as Train's
#: placement-group cleaner thinks its controller lives.
HOLD = """
import sys, time
from pathlib import Path
import ray, ray.train
from ray.train.torch import TorchTrainer
from mpmae.runtime.instance import ensure_ray

def hold(config):
    Path(config["started"]).touch()
    start = time.monotonic()
    while not Path(config["release"]).exists() and time.monotonic() - start < 150:
        time.sleep(0.5)
    Path(config["held"]).write_text(str(time.monotonic() - start))
    ray.train.report({})

ensure_ray()
folder = Path(sys.argv[1])
trainer = TorchTrainer(
    hold, train_loop_config={name: str(folder / name) for name in ("started", "release", "held")},
    scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
    run_config=ray.train.RunConfig(name="hold", storage_path=str(folder / "runs"),
                                   failure_config=ray.train.FailureConfig(max_failures=0)),
)
trainer.fit()
print("gcs", ray.get_runtime_context().gcs_address, "held", (folder / "held").read_text())
"""


def _local_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {**env, "RAY_AUTH_MODE": "disabled"}


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_local_instance_neither_joins_nor_rewrites_the_current_cluster_record(tmp_path: Path) -> None:
    """A dead address in Ray's machine-wide current-cluster record is not joined, and not replaced either."""
    from ray._private.utils import get_num_cpus, read_ray_address, write_ray_address

    previous = read_ray_address()
    write_ray_address("127.0.0.1:9")  # nothing listens on port 9
    try:
        out = subprocess.run([sys.executable, "-c", SCRIPT], env=_local_env(), cwd=tmp_path, capture_output=True,
                             text=True, timeout=150, check=True)
        gcs_address, recorded, cpus = out.stdout.split()
        assert gcs_address != "127.0.0.1:9" and recorded != gcs_address  # another session may have written it
        assert float(cpus) == int(get_num_cpus()) + 1  # the cores, plus a slot for a Ray Data pipeline
    finally:
        if previous:
            write_ray_address(previous)


def _wait_for(path: Path, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            out, err = process.communicate(timeout=30)
            raise AssertionError(f"{path} never appeared:\n{out[-2000:]}\n{err[-3000:]}")
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_local_instances_run_side_by_side(tmp_path: Path) -> None:
    """A second local instance started while a first one trains: both runs complete.

    Train's placement-group cleaner polls, every second, whether its run's controller lives. It used to
    find "the" cluster through the machine-wide record, which the second instance rewrote: asked about
    the first run's controller, the second cluster knew nothing of it, and the cleaner removed the first
    run's placement group, failing the run.
    """
    from ray._private.utils import read_ray_address

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (second / "release").touch()  # the second run reports at once
    runs = {}
    runs["first"] = subprocess.Popen([sys.executable, "-c", HOLD, str(first)], env=_local_env(), cwd=first,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(first / "started", runs["first"], 150)
        runs["second"] = subprocess.Popen([sys.executable, "-c", HOLD, str(second)], env=_local_env(), cwd=second,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        outputs = {"second": runs["second"].communicate(timeout=150)}
        time.sleep(3)  # a few more of the first cleaner's polls, with the second instance gone
        (first / "release").touch()
        outputs["first"] = runs["first"].communicate(timeout=60)
    finally:
        for process in runs.values():
            if process.poll() is None:
                process.kill()
    for name in ("first", "second"):
        out, err = outputs[name]
        assert runs[name].returncode == 0, f"{name} run failed:\n{out[-2000:]}\n{err[-4000:]}"
    assert not [name for name, (out, err) in outputs.items() if "multiple active Ray instances" in out + err]
    reports = {name: next(line.split() for line in out.splitlines() if line.startswith("gcs "))
               for name, (out, _) in outputs.items()}
    assert reports["first"][1] != reports["second"][1]
    assert read_ray_address() not in (reports["first"][1], reports["second"][1])
    assert float(reports["first"][3]) > 10  # the first run held on while the second one ran
