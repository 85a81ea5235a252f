"""The suite: bad inputs refused before anything runs; on the session's Ray cluster, a killed driver's suite
resumes without rerunning its finished cells, and a finished suite runs nothing."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mpmae.benchmark.suite as suite_module
from mpmae.benchmark.suite import CellsFailedError, run_benchmark
from mpmae.cli import main
from mpmae.config import BenchmarkConfig, ConfigError, load_config
from tests.conftest import RayHead

CELLS = 8  # 2 encoders x 2 tasks x 2 seeds, linear probe


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> None:
        raise AssertionError("Ray was started for a suite that should have been refused")

    monkeypatch.setattr(suite_module, "ensure_ray", refuse)


def _overrides(storage: Path, geobench: Path, export: Path, data: Path) -> list[str]:
    return ["name=suite", f"storage_path={storage}", f"geobench_dir={geobench}", f"data={data}",
            f"encoders={{random: null, tiny: {export}}}", "tasks=[m-bigearthnet, land_cover]", "seeds=[0, 1]",
            "modes=[linear_probe]", "epochs=3", "linear_probe.blr=1e-2", "cpus_per_cell=1"]


@pytest.mark.parametrize(("extra", "message"), [
    (["encoders.broken={tmp}/no-export"], "encoders.broken: does not load as an encoder ("),
    (["tasks=[m-bigearthnet, m-so2sat]"], "tasks[1]: {geobench}/classification_v1.0/m-so2sat is missing"),
    (["partitions=[default, 0.01x_train]", "tasks=[m-bigearthnet]"],
     "partitions[1]: m-bigearthnet has no '0.01x_train' partition"),
    (["data={tmp}/nowhere"], "data: "),
    (["geobench_dir=null"], "geobench_dir: not set, nor is $GEO_BENCH_DIR"),
])
def test_bad_inputs_are_one_line_naming_the_key_before_any_cell(
    no_ray: None, extra: list[str], message: str, geobench_mini: Path, tiny_export: Path, land_cover_data: Path,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("GEO_BENCH_DIR", raising=False)
    overrides = [*_overrides(tmp_path, geobench_mini, tiny_export, land_cover_data),
                 *(e.format(tmp=tmp_path) for e in extra)]
    assert main(["benchmark", *overrides]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1, err
    assert err.startswith(f"mpmae benchmark: error: {message.format(geobench=geobench_mini)}"), err
    assert not (tmp_path / "suite").exists()


def _cell_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (folder / "cells").glob("*.json")}


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_killed_suite_resumes_and_a_finished_one_runs_nothing(
    ray_cluster: RayHead, geobench_mini: Path, tiny_export: Path, land_cover_data: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # one cell at a time: the driver is killed between cells, and each run starts one cold Ray worker only
    overrides = [*_overrides(tmp_path, geobench_mini, tiny_export, land_cover_data), "max_concurrent_cells=1"]
    folder = tmp_path / "suite"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    with (tmp_path / "driver.log").open("w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "mpmae.cli", "benchmark", *overrides], cwd=tmp_path,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while len(_cell_files(folder)) < 2:
                assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
                time.sleep(0.2)
        finally:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()

    before = _cell_files(folder)  # a cell in flight at the kill may land later: any file there is kept
    assert 2 <= len(before) < CELLS and not (folder / "summary.json").exists()
    result = run_benchmark(load_config(BenchmarkConfig, None, overrides))
    assert result["reused"] >= len(before) and result["reused"] + result["ran"] == CELLS
    after = _cell_files(folder)
    assert len(after) == CELLS and {name: after[name] for name in before} == before

    results = list(csv.DictReader(io.StringIO((folder / "results.csv").read_text())))
    assert {(r["encoder"], r["task"], r["seed"]) for r in results} == {
        (e, t, s) for e in ("random", "tiny") for t in ("m-bigearthnet", "land_cover") for s in ("0", "1")}
    for row in results:
        assert float(row["test_ci_low"]) <= float(row["test_metric"]) <= float(row["test_ci_high"])
        assert row["mode"] == "linear_probe" and row["epochs"] == "3" and row["partition"] == "default"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary == result["summary"]
    assert {(r["encoder"], r["task"], r["n"]) for r in summary} == {
        (e, t, n) for e in ("random", "tiny") for t, n in (("m-bigearthnet", 2), ("land_cover", 2), ("aggregate", 4))}
    scores = {(r["encoder"], r["task"]): sorted(float(x["test_metric"]) for x in results
                                                 if (x["encoder"], x["task"]) == (r["encoder"], r["task"]))
              for r in summary if r["task"] != "aggregate"}
    for row in summary:
        if row["task"] != "aggregate":
            low, high = scores[row["encoder"], row["task"]]
            assert (row["iqm"], row["ci_low"], row["ci_high"]) == pytest.approx(((low + high) / 2, low, high))
    assert (folder / "summary.png").read_bytes().startswith(b"\x89PNG")

    assert main(["benchmark", *overrides]) == 0  # finished: nothing runs, the table is printed
    out = capsys.readouterr().out
    assert out.startswith("# Benchmark suite\n") and out == (folder / "summary.md").read_text() + (
        f"\n0 cell(s) run now, {CELLS} finished before; files in {folder}\n")
    assert "| encoder | m-bigearthnet (micro F1) | land_cover (accuracy) | aggregate (normalised) |" in out
    assert _cell_files(folder) == after

    with pytest.raises(ConfigError, match=r"ran with other settings than the config asks \(recipe.epochs 3 -> 4\)"):
        run_benchmark(load_config(BenchmarkConfig, None, [*overrides, "epochs=4"]))


@pytest.mark.ray
@pytest.mark.timeout(180)
def test_a_failing_cell_ends_the_suite_naming_it_and_keeps_the_others(
    ray_cluster: RayHead, geobench_mini: Path, tiny_export: Path, land_cover_data: Path, tmp_path: Path,
) -> None:
    """A test patch cut short passes the checks (they read no pixels) and fails its cells only: the
    land_cover cells finish and keep their files, no summary is written, and the error names the cell."""
    broken = tmp_path / "geobench"
    shutil.copytree(geobench_mini, broken)
    patch = broken / "classification_v1.0" / "m-bigearthnet" / "id_0005.hdf5"
    patch.write_bytes(patch.read_bytes()[:2048])
    overrides = [*_overrides(tmp_path, broken, tiny_export, land_cover_data), "name=broken",
                 f"encoders={{tiny: {tiny_export}}}", "seeds=[0]", "max_concurrent_cells=2"]
    with pytest.raises(CellsFailedError) as info:
        run_benchmark(load_config(BenchmarkConfig, None, overrides))
    assert str(info.value).startswith(
        "1 of 2 cells failed, the first: tiny on m-bigearthnet (linear_probe, default, seed 0): "
        f"GeoBenchFormatError: {patch}: cannot be read as HDF5")
    assert [p.name for p in (tmp_path / "broken" / "cells").iterdir()] == [
        "tiny__land_cover__linear_probe__default__seed-0.json"]
    assert not (tmp_path / "broken" / "summary.json").exists()
