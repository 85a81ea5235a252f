"""bench/gpu.py, the prepared GPU check, cannot rot: its ``--quick`` CPU run ends in the JSON line it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_quick_run_ends_in_one_json_line_with_every_figure() -> None:
    # The script starts a local Ray instance of its own: nothing may send it to the session's cluster.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    done = subprocess.run([sys.executable, "bench/gpu.py", "--quick"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["errors"] == {} and result["skipped"] == [] and result["device"] == "cpu"
    for config in ("atto 56/8", "tiny 112/16"):
        eager = result["model_step"][config]["eager"]
        assert eager["samples_per_s"] > 0 and eager["peak_gpu_mib"] is None
        assert result["model_step"][config]["compile"] is None  # --quick compiles nothing
    run = result["ray_run"]
    assert run["samples_per_s"] > 0 and run["data_wait_s"] >= 0 and 0 <= run["data_wait_share"] <= 1
    assert run["gpu_util_pct"] is None and run["rows"] > 0
    assert result["mmearth64_epoch_min"]["ray_run"] > 0
    assert set(result["goals_met"]) == {"data_wait_share", "mmearth64_epoch_min"}
