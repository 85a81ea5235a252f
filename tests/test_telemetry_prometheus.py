"""Metric names as Ray exports them, and every dashboard query evaluated by a real Prometheus that scraped a
pretraining run on the session's Ray head."""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mpmae import telemetry
from mpmae.checkpoint import load_checkpoint
from mpmae.config import PretrainConfig, load_config
from mpmae.dashboards import DASHBOARDS
from mpmae.dashboards.model import Panel, Variable
from mpmae.data.synth import write_synthetic_mmearth
from mpmae.telemetry import CHECKPOINT_SECONDS, LOSS, METRICS, PROBE_SCORE, SKIPPED_STEPS, RunMetrics
from mpmae.train.trainer import pretrain

REPO = Path(__file__).resolve().parents[1]
VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)\}?")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


def test_prometheus_names_follow_ray_export_rules() -> None:
    assert LOSS.series() == "ray_mpmae_loss"
    assert SKIPPED_STEPS.series() == "ray_mpmae_skipped_steps_total"
    assert CHECKPOINT_SECONDS.series("bucket") == "ray_mpmae_checkpoint_seconds_bucket"
    with pytest.raises(ValueError, match="histogram"):
        CHECKPOINT_SECONDS.series()
    assert len({spec.name for spec in METRICS}) == len(METRICS)
    for spec in METRICS:
        assert spec.name.startswith("mpmae_") and spec.description and spec.unit
        assert list(spec.boundaries) == sorted(set(spec.boundaries)) and all(b > 0 for b in spec.boundaries)
        assert bool(spec.boundaries) == (spec.kind == "histogram")


class FakeMetric:
    """Records what RunMetrics hands to a Ray metric."""

    def __init__(self, spec: telemetry.MetricSpec, tags: dict[str, str]) -> None:
        self.defaults = {k: v for k, v in tags.items() if k in spec.tags}
        self.calls: list[tuple[str, float, dict[str, str] | None]] = []

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.calls.append(("set", value, tags))

    def inc(self, value: float) -> None:
        self.calls.append(("inc", value, None))

    def observe(self, value: float) -> None:
        self.calls.append(("observe", value, None))


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, FakeMetric], list[float]]:
    """Fake Ray metrics by name, and a clock for RunMetrics."""
    registered: dict[str, FakeMetric] = {}
    clock = [0.0]

    def register(spec: telemetry.MetricSpec, tags: dict[str, str]) -> FakeMetric:
        registered[spec.name] = FakeMetric(spec, tags)
        return registered[spec.name]

    monkeypatch.setattr(telemetry, "_register", register)
    monkeypatch.setattr(telemetry, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    return registered, clock


EPOCH = {"loss": 2.5, "loss/sentinel2": 1.0, "loss/biome": 0.5, "weight/biome": 0.9, "log_var/biome": 0.1,
         "lr": 1e-4, "samples_per_s": 12.0, "data_wait_s": 3.0, "skipped_steps": 2, "epoch": 0}


def test_rank_0_records_epoch_values_once_per_run(recorded: tuple[dict[str, FakeMetric], list[float]]) -> None:
    fakes, _ = recorded
    lead = RunMetrics("r", 0)
    lead.epoch(EPOCH)
    lead.probe(0.75)
    assert fakes["mpmae_step_seconds"].defaults == {"run": "r", "rank": "0"}
    assert fakes["mpmae_probe_score"].defaults == {"run": "r"}
    assert fakes["mpmae_loss"].calls == [("set", 2.5, None)]
    assert fakes["mpmae_task_loss"].calls == [("set", 1.0, {"task": "sentinel2"}), ("set", 0.5, {"task": "biome"})]
    assert fakes["mpmae_task_weight"].calls == [("set", 0.9, {"task": "biome"})]
    assert fakes["mpmae_learning_rate"].calls == [("set", 1e-4, None)]
    assert fakes["mpmae_samples_per_second"].calls == [("set", 12.0, None)]
    assert fakes["mpmae_probe_score"].calls == [("set", 0.75, None)]
    assert fakes["mpmae_skipped_steps"].calls == [("inc", 2, None)]
    lead.epoch({**EPOCH, "skipped_steps": 5})
    lead.epoch({**EPOCH, "skipped_steps": 5})
    assert fakes["mpmae_skipped_steps"].calls == [("inc", 2, None), ("inc", 3, None)]  # deltas only

    other = RunMetrics("r", 1)  # the same values, all-reduced: other ranks leave them to rank 0
    other.epoch(EPOCH)
    other.probe(0.75)
    other.step(0.2, 0.05)
    other.checkpoint(1.5)
    assert [name for name, fake in fakes.items() if fake.calls] == [
        "mpmae_step_seconds", "mpmae_data_wait_seconds", "mpmae_checkpoint_seconds"]
    assert fakes["mpmae_step_seconds"].calls == [("observe", 0.2, None)]
    assert fakes["mpmae_data_wait_seconds"].calls == [("observe", 0.05, None)]
    assert fakes["mpmae_checkpoint_seconds"].calls == [("observe", 1.5, None)]


def test_a_resumed_run_counts_only_new_skipped_steps(recorded: tuple[dict[str, FakeMetric], list[float]]) -> None:
    fakes, _ = recorded
    RunMetrics("r", 0, skipped_steps=2).epoch(EPOCH)
    assert fakes["mpmae_skipped_steps"].calls == []


def test_gauges_are_set_again_while_training_goes_on(recorded: tuple[dict[str, FakeMetric], list[float]]) -> None:
    """Ray drops a gauge two report intervals after its last set."""
    fakes, clock = recorded
    telemetry = RunMetrics("r", 0)
    telemetry.step(0.1, 0.01)
    telemetry.epoch(EPOCH)
    telemetry.step(0.1, 0.01)
    assert len(fakes["mpmae_loss"].calls) == 1
    clock[0] += 3600
    telemetry.step(0.1, 0.01)
    assert fakes["mpmae_loss"].calls == [("set", 2.5, None)] * 2
    assert fakes["mpmae_task_loss"].calls[-2:] == [("set", 1.0, {"task": "sentinel2"}), ("set", 0.5, {"task": "biome"})]
    telemetry.step(0.1, 0.01)
    assert len(fakes["mpmae_loss"].calls) == 2


def _prometheus_binary() -> str:
    path = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not Path(path).is_file():
        pytest.fail("the prometheus binary is missing: install the Debian package `prometheus` (apt-get)")
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def prometheus(ray_cluster: object, tmp_path: Path) -> Iterator[str]:
    """Prometheus on loopback scraping every live node's metrics export port every second (the session's
    cluster has several nodes, and the run's workers may sit on any of them)."""
    import ray

    binary = _prometheus_binary()
    targets = [f"127.0.0.1:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray", "static_configs": [{"targets": targets}]}],
    }))  # JSON is YAML
    port = _free_port()
    process = subprocess.Popen(
        [binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"prometheus did not start: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def _query_range(url: str, expr: str, start: float, end: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": 1})
    try:
        answer = _get(f"{url}/api/v1/query_range?{params}")
    except urllib.error.HTTPError as err:  # 400 for a query Prometheus cannot parse
        pytest.fail(f"Prometheus rejected {expr!r}: {err.read().decode()}")
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def _label_values(url: str, variable: Variable, values: dict[str, str], start: float, end: float) -> list[str]:
    """What Grafana would offer for a query variable: its label_values() through the label values API."""
    match = LABEL_VALUES.match(variable.query)
    assert match, variable.query
    selector = _substitute(match["selector"], values)
    params = urllib.parse.urlencode({"match[]": selector, "start": start, "end": end})
    return _get(f"{url}/api/v1/label/{match['label']}/values?{params}")["data"]


def _substitute(expr: str, values: dict[str, str]) -> str:
    return VARIABLE.sub(lambda m: values[m[1]], expr)


def _empty_panels(url: str, panels: list[Panel], values: dict[str, str], start: float, end: float) -> list[str]:
    empty = []
    for panel in panels:
        for target in panel.targets:
            result = _query_range(url, _substitute(target.expr, values), start, end)
            if not result and not panel.gpu_only:
                empty.append(f"{panel.title}: {target.expr}")
    return empty


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_every_dashboard_query_returns_series_for_a_real_run(prometheus: str, tmp_path: Path) -> None:
    synth = write_synthetic_mmearth(tmp_path / "data", tiles=40, seed=3)
    run = f"prom-{uuid.uuid4().hex[:8]}"
    config = load_config(PretrainConfig, REPO / "configs" / "demo.yaml", [
        f"data.path={synth}", f"run.storage_path={tmp_path}", f"run.name={run}", "optim.batch_size=8",
        "optim.epochs=2", "model.decoder_dim=64", "probe.task=land_cover", "probe.epochs=5",
    ])
    start = time.time()
    history = load_checkpoint(pretrain(config).checkpoint.path)["history"]

    values = {"datasource": "unused", "run": run, "rank": ".*", "__rate_interval": "5s", "__range": "1h"}
    session_variable = next(v for v in DASHBOARDS["mpmae_training.json"].variables if v.name == "SessionName")
    deadline = time.monotonic() + 30  # the last export and scrape after the run
    while not (sessions := _label_values(prometheus, session_variable, values, start, time.time())):
        assert time.monotonic() < deadline, "Prometheus never saw the run's metrics"
        time.sleep(1)
    assert len(sessions) == 1, sessions  # one Ray head in this test session
    values["SessionName"] = sessions[0]
    expected = {"SessionName": sessions[0], "run": run, "rank": "1"}  # two workers: ranks 0 and 1
    for dashboard in DASHBOARDS.values():
        for variable in dashboard.variables:
            if variable.kind == "query":
                offered = _label_values(prometheus, variable, values, start, time.time())
                assert expected[variable.name] in offered, (dashboard.uid, variable.name, offered)

    panels = [panel for dashboard in DASHBOARDS.values() for panel in dashboard.panels()]
    while (empty := _empty_panels(prometheus, panels, values, start, time.time())) and time.monotonic() < deadline:
        time.sleep(1)
    assert not empty, "\n".join(empty)
    assert any(panel.gpu_only for panel in panels)  # parsed by Prometheus above, empty on a CPU-only node
    for spec, key in ((LOSS, "loss"), (PROBE_SCORE, "probe_score")):
        seen = [float(v) for series in _query_range(prometheus, f'{spec.series()}{{run="{run}"}}', start, time.time())
                for _, v in series["values"]]
        reported = [epoch[key] for epoch in history]
        assert seen and all(any(math.isclose(v, r, rel_tol=1e-6) for r in reported) for v in seen), (seen, reported)
