"""The Grafana dashboards as code: JSON structure, committed files, file provisioning, HTTP provisioning."""

from __future__ import annotations

import importlib
import json
import logging
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpmae.cli import main
from mpmae.dashboards import (
    DASHBOARDS,
    DEFAULT_FOLDER,
    GridPos,
    cli_provision,
    cli_render,
    dumps,
    provision,
    render_all,
)
from mpmae.telemetry import METRICS, NODE_GPU_UTILIZATION, NODE_GRAM_USED

PROVISION = importlib.import_module("mpmae.dashboards.provision")  # the package exports a function of that name

REPO = Path(__file__).resolve().parents[1]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_BUILTINS = {"__rate_interval", "__range", "__interval"}
VARIABLE = re.compile(r"\$\{?([A-Za-z_]\w*)\}?")


def _panels(model: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in model["panels"] if p["type"] != "row"]


def test_dashboard_uids_and_panel_ids_are_unique() -> None:
    models = render_all().values()
    uids = [m["uid"] for m in models]
    assert len(uids) == len(set(uids)) == len(DASHBOARDS)
    for model in models:
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids)), model["uid"]
        assert model["schemaVersion"] >= 39


def test_grid_overlap_check() -> None:
    assert GridPos(0, 0, 12, 8).overlaps(GridPos(11, 7, 4, 4))
    assert not GridPos(0, 0, 12, 8).overlaps(GridPos(12, 0, 12, 8))
    assert not GridPos(0, 0, 24, 1).overlaps(GridPos(0, 1, 6, 4))


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_panels_tile_the_grid_without_overlap(name: str) -> None:
    positions = [GridPos(**p["gridPos"]) for p in render_all()[name]["panels"]]
    assert all(0 <= p.x and p.x + p.w <= 24 and p.w > 0 and p.h > 0 for p in positions)
    for i, a in enumerate(positions):
        for b in positions[i + 1:]:
            assert not a.overlaps(b), (a, b)


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_every_panel_queries_the_datasource_variable(name: str) -> None:
    model = render_all()[name]
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"SessionName", "run"} <= set(variables)
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE
    for panel in _panels(model):
        assert panel["type"] in {"timeseries", "stat", "heatmap"}
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"].strip(), panel["title"]
            used = set(VARIABLE.findall(target["expr"]))
            assert used <= set(variables) | GRAFANA_BUILTINS, (panel["title"], used)
            assert {"SessionName", "run"} <= used, panel["title"]


def test_every_metric_has_a_panel_and_gpu_panels_are_marked() -> None:
    training = DASHBOARDS["mpmae_training.json"]
    exprs = " ".join(t.expr for p in training.panels() for t in p.targets)
    for spec in METRICS:
        assert f"ray_{spec.name}" in exprs, spec.name
    for dashboard in DASHBOARDS.values():
        for panel in dashboard.panels():
            gpu = any(n in t.expr for t in panel.targets for n in (NODE_GPU_UTILIZATION, NODE_GRAM_USED))
            assert panel.gpu_only == gpu, panel.title


@pytest.mark.parametrize("name", sorted(DASHBOARDS))
def test_committed_json_is_what_the_code_renders(name: str) -> None:
    committed = (REPO / "dashboards" / name).read_text()
    assert committed == dumps(render_all()[name]), "run `python -m mpmae.dashboards` and commit the JSON"


def test_render_cli_and_module_write_the_same_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_render(tmp_path / "cli") == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "cli" / n) for n in DASHBOARDS]
    subprocess.run([sys.executable, "-m", "mpmae.dashboards", str(tmp_path / "module")], check=True,
                   capture_output=True)
    for name, model in render_all().items():
        assert json.loads((tmp_path / "cli" / name).read_text()) == model
        assert (tmp_path / "module" / name).read_text() == dumps(model)


def test_file_provisioning_yaml() -> None:
    provider = yaml.safe_load((REPO / "dashboards/provisioning/dashboards/mpmae.yaml").read_text())
    assert provider["apiVersion"] == 1
    (entry,) = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"] == "${MPMAE_DASHBOARDS_DIR}"
    assert entry["folder"] == DEFAULT_FOLDER == entry["folderUid"]
    sources = yaml.safe_load((REPO / "dashboards/provisioning/datasources/mpmae.yaml").read_text())
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    # Ray provisions its own default "Prometheus" datasource: ours must not clash with it.
    assert source["type"] == "prometheus" and source["isDefault"] is False and source["name"] != "Prometheus"


# --- provisioning through the HTTP API, against a recording stand-in for Grafana --------------------------


@dataclass
class FakeGrafana:
    """A Grafana HTTP API stand-in on loopback that records every request."""

    url: str
    folders: list[dict[str, str]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    fail_dashboards: bool = False
    # 200 answers of the wrong shape: a JSON value, or bytes sent as they are
    bodies: dict[str, Any] = field(default_factory=dict)


def _handler(state: FakeGrafana) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _respond(self, status: int, body: Any) -> None:
            body = state.bodies.get(f"{self.command} {self.path.split('?')[0]}", body) if status == 200 else body
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _record(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            request = {"method": self.command, "path": self.path.split("?")[0], "headers": dict(self.headers),
                       "body": body}
            state.requests.append(request)
            return request

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            request = self._record()
            if request["path"].endswith("/api/folders"):
                self._respond(200, state.folders)
            else:
                self._respond(404, {"message": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            request = self._record()
            body = request["body"]
            if request["path"].endswith("/api/folders"):
                state.folders.append({"uid": body["uid"], "title": body["title"]})
                self._respond(200, state.folders[-1])
            elif request["path"].endswith("/api/dashboards/db") and state.fail_dashboards:
                # A hostile error body that echoes the credentials: they must not reach any output.
                self._respond(500, {"message": f"internal error for {request['headers'].get('Authorization')}"})
            elif request["path"].endswith("/api/dashboards/db"):
                uid = body["dashboard"]["uid"]
                self._respond(200, {"status": "success", "uid": uid, "url": f"/d/{uid}/x", "version": 1})
            else:
                self._respond(404, {"message": "not found"})

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    return Handler


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    state = FakeGrafana("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> str:
    value = f"glsa_{secrets.token_hex(16)}"
    monkeypatch.setenv("GRAFANA_TOKEN", value)
    caplog.set_level(logging.DEBUG)  # every logger, every level: the token must not show up anywhere
    return value


def _assert_not_leaked(token: str, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> str:
    out, err = capfd.readouterr()
    logged = caplog.text + " ".join(repr(r.args) for r in caplog.records)
    assert token not in out and token not in err and token not in logged
    return out + err


def test_provision_uploads_every_dashboard_into_a_new_folder(
        grafana: FakeGrafana, token: str, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    assert cli_provision(grafana.url, "mpmae") == 0
    output = _assert_not_leaked(token, capfd, caplog)
    calls = [(r["method"], r["path"]) for r in grafana.requests]
    assert calls == [("GET", "/api/folders"), ("POST", "/api/folders")] + [("POST", "/api/dashboards/db")] * 2
    assert all(r["headers"]["Authorization"] == f"Bearer {token}" for r in grafana.requests)
    assert grafana.requests[1]["body"] == {"title": "mpmae", "uid": "mpmae"}
    uploads = [r["body"] for r in grafana.requests[2:]]
    assert all(u["overwrite"] is True and u["folderUid"] == "mpmae" for u in uploads)
    assert [u["dashboard"] for u in uploads] == list(render_all().values())
    for dashboard in DASHBOARDS.values():
        assert f"{grafana.url}/d/{dashboard.uid}/x" in output


def test_provision_reuses_an_existing_folder_under_a_path_prefix(grafana: FakeGrafana, token: str) -> None:
    grafana.folders.append({"uid": "abc123", "title": "ML runs"})
    urls = provision(f"{grafana.url}/grafana", folder="ML runs")
    assert [r["path"] for r in grafana.requests] == ["/grafana/api/folders"] + ["/grafana/api/dashboards/db"] * 2
    assert all(r["body"]["folderUid"] == "abc123" for r in grafana.requests[1:])
    assert urls == [f"{grafana.url}/d/{d.uid}/x" for d in DASHBOARDS.values()]


def test_provision_into_the_general_folder(grafana: FakeGrafana, token: str) -> None:
    provision(grafana.url, folder=None)
    assert [r["path"] for r in grafana.requests] == ["/api/dashboards/db"] * 2
    assert all("folderUid" not in r["body"] for r in grafana.requests)


def test_a_grafana_error_is_reported_without_the_token(
        grafana: FakeGrafana, token: str, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    grafana.fail_dashboards = True
    assert cli_provision(grafana.url, None) == 1
    output = _assert_not_leaked(token, capfd, caplog)
    assert "error: Grafana at" in output and "500" in output and "Bearer ***" in output


def test_an_unreachable_grafana_is_reported_without_the_token(
        token: str, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()
    assert cli_provision(f"http://127.0.0.1:{port}", "mpmae") == 1
    assert f"error: Grafana at http://127.0.0.1:{port}/" in _assert_not_leaked(token, capfd, caplog)


def test_a_missing_token_stops_before_any_request(
        grafana: FakeGrafana, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    assert cli_provision(grafana.url, "mpmae") == 1
    assert "GRAFANA_TOKEN" in capfd.readouterr().err
    assert grafana.requests == []


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("localhost", True), ("LocalHost.", True),
    ("::ffff:127.0.0.1", True), ("10.0.0.1", False), ("::2", False), ("grafana.example.com", False),
    ("localhost.example.com", False), ("127.0.0.1.nip.io", False),
])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert PROVISION.is_loopback(host) is loopback


def test_plain_http_to_a_remote_host_needs_insecure(
        grafana: FakeGrafana, token: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    """The stand-in listens on loopback; pretending it does not shows what a remote http URL gets."""
    monkeypatch.setattr(PROVISION, "is_loopback", lambda host: False)
    assert cli_provision(grafana.url, "mpmae") == 1
    output = _assert_not_leaked(token, capfd, caplog)
    assert f"error: {grafana.url}: plain http would send the token in clear text" in output
    assert "--insecure" in output and grafana.requests == []
    assert main(["dashboards", "provision", "--url", grafana.url, "--insecure"]) == 0
    assert len(grafana.requests) == 4
    _assert_not_leaked(token, capfd, caplog)


@pytest.mark.parametrize(("suffix", "message"), [
    ("?verify=false", "takes no query string or fragment"),
    ("/grafana?orgId=1", "takes no query string or fragment"),
    ("/#frag", "takes no query string or fragment"),
    (":99999", "the port is not a number"),
])
def test_urls_that_would_weaken_tls_or_confuse_the_client_are_refused(
        grafana: FakeGrafana, token: str, suffix: str, message: str, capfd: pytest.CaptureFixture) -> None:
    url = grafana.url.rsplit(":", 1)[0] + suffix if suffix.startswith(":") else grafana.url + suffix
    assert cli_provision(url, "mpmae") == 1
    assert message in capfd.readouterr().err
    assert grafana.requests == []


def test_credentials_in_the_url_are_refused_and_never_shown(
        grafana: FakeGrafana, token: str, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    url = grafana.url.replace("http://", f"http://admin:{password}@")
    assert cli_provision(url, "mpmae") == 1
    output = _assert_not_leaked(token, capfd, caplog)
    assert password not in output and "admin" not in output
    assert f"http://***@127.0.0.1:{url.rsplit(':', 1)[1]}: credentials in the URL are refused" in output
    assert grafana.requests == []


@pytest.mark.parametrize(("endpoint", "body", "message"), [
    ("GET /api/folders", {"message": "ok"}, "GET api/folders answered with dict, expected a list of folder objects"),
    ("GET /api/folders", ["mpmae"], "GET api/folders answered with list, expected a list of folder objects"),
    ("POST /api/folders", {"id": 7}, "POST api/folders answered with dict, expected a folder object with a 'uid'"),
    ("POST /api/dashboards/db", ["ok"], "POST api/dashboards/db answered with list, expected an object with a 'url'"),
    ("POST /api/dashboards/db", {"url": 3}, "POST api/dashboards/db answered with dict, expected an object"),
    ("GET /api/folders", b"<html>login</html>", "the answer is not JSON"),
])
def test_a_200_of_the_wrong_shape_names_the_endpoint(
        grafana: FakeGrafana, token: str, endpoint: str, body: Any, message: str, capfd: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    grafana.bodies[endpoint] = body
    assert cli_provision(grafana.url, "mpmae") == 1
    output = _assert_not_leaked(token, capfd, caplog)
    assert output.startswith(f"error: Grafana at {grafana.url}/: {message}") and output.count("\n") == 1
