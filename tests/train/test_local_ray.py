"""The embedded local Ray instance of `mpmae pretrain` / `mpmae tune` (no RAY_ADDRESS)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import ray
from ray._private.utils import read_ray_address
from mpmae.train.trainer import ensure_ray

ensure_ray()
print(ray.get_runtime_context().gcs_address, read_ray_address(), ray.cluster_resources()["CPU"])
"""


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_local_instance_replaces_a_stale_current_cluster_record(tmp_path: Path) -> None:
    """A dead address in Ray's current-cluster record is not joined, and is replaced by the new instance's."""
    from ray._private.utils import read_ray_address, write_ray_address

    previous = read_ray_address()
    write_ray_address("127.0.0.1:9")  # nothing listens on port 9
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = subprocess.run([sys.executable, "-c", SCRIPT], env={**env, "RAY_AUTH_MODE": "disabled"},
                             cwd=tmp_path, capture_output=True, text=True, timeout=150, check=True)
        gcs_address, recorded, cpus = out.stdout.split()
        assert recorded == gcs_address != "127.0.0.1:9"
        assert float(cpus) >= 4  # a 2-core machine still gets slots for workers plus a Ray Data pipeline
    finally:
        if previous:
            write_ray_address(previous)
