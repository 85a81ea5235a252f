"""Shared test fixtures: the session's S3-compatible store, multi-node Ray cluster and MLflow server, a tiny
encoder.
(External material: tests/external/conftest.py.)"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mpmae.models.convnextv2 import ConvNeXtV2
from tests.crafted.tiny import tiny_encoder


@dataclass(frozen=True)
class RayHead:
    """The session's Ray head node: its GCS address and its dashboard (job server) URL."""

    address: str
    dashboard_url: str


@dataclass
class RayNode:
    """A worker node started with `ray start --address ... --block` in its own process group."""

    process: subprocess.Popen
    node_id: str
    resources: dict[str, float]

    def kill(self) -> None:
        """The node vanishes (its raylet and workers die at once), as a reclaimed spot instance does."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=60)


@dataclass
class S3Store:
    """The session's S3 endpoint: moto's server behind a TCP proxy on loopback, credentials in the environment."""

    endpoint: str
    proxy_port: int
    moto_port: int
    proxy: subprocess.Popen
    names: Iterator[int] = field(default_factory=itertools.count)

    def bucket(self, prefix: str = "bucket") -> str:
        """A new empty bucket: ``s3://<prefix>-<n>``."""
        import boto3

        name = f"{prefix}-{next(self.names)}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return f"s3://{name}"

    @contextmanager
    def outage(self) -> Iterator[None]:
        """The store goes away (connections refused) for the block, then comes back with its objects."""
        _stop(self.proxy)
        try:
            yield
        finally:
            self.proxy = _start_proxy(self.proxy_port, self.moto_port)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _start_proxy(listen_port: int, target_port: int) -> subprocess.Popen:
    proxy = subprocess.Popen([sys.executable, "-m", "tests.crafted.tcp_proxy", str(listen_port), str(target_port)],
                             cwd=Path(__file__).parent.parent, start_new_session=True)
    _wait_for_port(listen_port, proxy, timeout=30)
    return proxy


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Store]:
    """moto's S3 server on a free loopback port with IAM checks on, behind a proxy a test can cut.

    The endpoint and an access key made in moto's IAM go into the standard variables (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``, ...) of this process and of every Ray node started after it: mpmae reads
    nothing else. Wrong credentials are refused, as by a real store.
    """
    import boto3

    moto_port, proxy_port = _free_port(), _free_port()
    moto_cli = str(Path(sys.executable).with_name("moto_server"))
    moto = subprocess.Popen([moto_cli, "-H", "127.0.0.1", "-p", str(moto_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    proxy = None
    try:
        _wait_for_port(moto_port, moto, timeout=60)
        proxy = _start_proxy(proxy_port, moto_port)
        endpoint = f"http://127.0.0.1:{proxy_port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="mpmae")
        iam.put_user_policy(UserName="mpmae", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="mpmae")["AccessKey"]
        os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID=key["AccessKeyId"],
                          AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"], AWS_REGION="us-east-1",
                          AWS_DEFAULT_REGION="us-east-1")
        store = S3Store(endpoint, proxy_port, moto_port, proxy)
        yield store
        proxy = store.proxy
    finally:
        if proxy is not None:
            _stop(proxy)
        _stop(moto)


@pytest.fixture(scope="session")
def ray_cluster(s3: S3Store) -> Iterator[RayHead]:
    """One Ray cluster for the whole session: a head started with `ray start` on loopback (so that job
    submission can be tested against it too) and a second node, ``node-b``; this process joins as a driver.

    ``num_cpus=4`` is declared whatever the machine has: on a 2-core box, Train workers plus a Ray Data
    pipeline need more CPU slots than cores, or scheduling waits forever. Token auth is disabled (unless
    set explicitly), the same for the head, this driver and every subprocess, which inherit the variable.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Application metrics every second (default 10 s), so that Prometheus sees a short test run.
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
    gcs_port, dashboard_port = _free_port(), _free_port()
    ray_cli = str(Path(sys.executable).with_name("ray"))
    # `--block` in its own process group: teardown stops this head only, never another session's Ray.
    head = subprocess.Popen(
        [ray_cli, "start", "--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--include-dashboard=true",
         "--num-cpus=4", f"--object-store-memory={300 * 1024**2}", "--disable-usage-stats", "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # Every Ray process inherits the address: Ray's own State API clients (Train's placement-group
        # cleaner) would otherwise auto-discover the newest Ray instance on the machine, maybe another one.
        env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"},
    )
    nodes: list[RayNode] = []
    try:
        _wait_for_port(dashboard_port, head, timeout=180)
        ray.init(address=f"127.0.0.1:{gcs_port}", log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        nodes.append(start_node(f"127.0.0.1:{gcs_port}", {"node-b": 1, "trainer_slot": 1}, cpus=2))
        yield RayHead(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dashboard_port}")
    finally:
        ray.shutdown()
        for node in nodes:
            node.kill()
        _stop(head)


def start_node(address: str, resources: dict[str, float], cpus: int = 1) -> RayNode:
    """Start a worker node of the cluster at ``address`` with ``resources``; wait until Ray schedules on it."""
    import ray

    ray_cli = str(Path(sys.executable).with_name("ray"))
    known = {n["NodeID"] for n in ray.nodes()}
    process = subprocess.Popen(
        [ray_cli, "start", f"--address={address}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
         f"--resources={json.dumps(resources)}", f"--object-store-memory={100 * 1024**2}", "--disable-usage-stats",
         "--block"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RAY_ADDRESS": address},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"`ray start --address` exited with status {process.returncode}")
        new = [n for n in ray.nodes() if n["NodeID"] not in known and n["Alive"]]
        if new:
            return RayNode(process, new[0]["NodeID"], resources)
        time.sleep(0.5)
    raise TimeoutError(f"a node with {resources} did not join the cluster within 120 s")


@pytest.fixture
def ray_node(ray_cluster: RayHead) -> Iterator[Callable[..., RayNode]]:
    """Start extra nodes (``ray_node({"trainer_slot": 1})``); the test may kill them; teardown kills the rest."""
    started: list[RayNode] = []

    def start(resources: dict[str, float], cpus: int = 1) -> RayNode:
        started.append(start_node(ray_cluster.address, resources, cpus))
        return started[-1]

    yield start
    for node in started:
        node.kill()


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    """Wait until a server (the Ray head's dashboard, started last; moto; MLflow) accepts connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with status {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{process.args[0]} did not open port {port} within {timeout} s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An MLflow tracking server on a free loopback port (`mlflow server`, sqlite store, artifacts proxied
    into a temporary folder); yields its URI. Tests put it in ``MLFLOW_TRACKING_URI`` themselves."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    mlflow_cli = str(Path(sys.executable).with_name("mlflow"))
    with (root / "server.log").open("w") as log:
        server = subprocess.Popen(
            [mlflow_cli, "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root,
            # no job runner: it starts seven huey consumers (2 GB) that tracking never uses
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    try:
        _wait_for_port(port, server, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(server)


@pytest.fixture
def encoder() -> ConvNeXtV2:
    """A features-only encoder of one block per stage on 3 bands (see :mod:`tests.crafted.tiny`)."""
    return tiny_encoder()
