"""The cluster kit's validator: every shipped file passes; broken copies fail naming the file and the key."""

from __future__ import annotations

import copy
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpmae.cluster import ClusterConfigError, cli_validate, validate, validate_files

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
SHIPPED = sorted([*CLUSTER.glob("*.yaml"), *CLUSTER.glob("kuberay/*.yaml")])


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTER / name).read_text())


def _broken(tmp_path: Path, name: str, mutate: Callable[[dict[str, Any]], object]) -> Path:
    """A copy of a shipped file with one mistake, written where `validate` can name it."""
    document = copy.deepcopy(_load(name))
    mutate(document)
    path = tmp_path / f"broken-{Path(name).name}"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _error(path: Path) -> str:
    with pytest.raises(ClusterConfigError) as info:
        validate(path)
    assert str(info.value).startswith(f"{path}: ")
    return info.value.detail


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation must never reach a cloud: any connection attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access during validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_the_kit_ships_launcher_and_kuberay_files() -> None:
    names = {p.relative_to(CLUSTER).as_posix() for p in SHIPPED}
    assert {"aws.yaml", "gcp.yaml", "kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(CLUSTER).as_posix())
def test_every_shipped_file_is_valid_offline(path: Path, no_network: None) -> None:
    validate(path)


def test_launcher_files_keep_the_kit_rules() -> None:
    for name in ("aws.yaml", "gcp.yaml"):
        config = _load(name)
        head = config["available_node_types"][config["head_node_type"]]
        assert head["resources"] == {"CPU": 0, "GPU": 0}
        assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
        assert any("pip install -q -e '.[ffcv,tracking]'" in c for c in config["setup_commands"])
        assert config["file_mounts"]["~/mpmae"] == "."
        assert "0.0.0.0" not in yaml.safe_dump(config)  # no open CIDR, no dashboard on all interfaces


def _pods(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]["spec"], *(g["template"]["spec"] for g in spec["workerGroupSpecs"])]


def test_data_and_results_live_in_the_bucket() -> None:
    """No node gets a copy of the training data and no shared volume: shards, runs and results are URIs."""
    for name, scheme in (("aws.yaml", "s3://"), ("gcp.yaml", "gs://")):
        commands = "\n".join(_load(name)["setup_commands"])
        assert f"MPMAE_STORAGE=%s\\n' '{scheme}" in commands
        for copy_line in ("s3 sync", "s3 cp", "storage rsync", "storage cp", "gsutil", "mount "):
            assert copy_line not in commands, f"{name}: setup_commands copy data onto the nodes ({copy_line!r})"
    for name in ("kuberay/raycluster.yaml", "kuberay/rayjob.yaml"):
        document = _load(name)
        spec = document["spec"].get("rayClusterSpec", document["spec"])
        for pod in _pods(spec):
            assert "initContainers" not in pod
            assert all("persistentVolumeClaim" not in v for v in pod.get("volumes", [])), name
            assert pod.get("serviceAccountName"), f"{name}: every pod reaches the bucket with its service account"
    entrypoint = _load("kuberay/rayjob.yaml")["spec"]["entrypoint"]
    for part in ("data.path=s3://", "data.format=parquet", "run.storage_path=s3://"):
        assert part in entrypoint


def test_cli_prints_one_line_per_file_and_fails_if_any_fails(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = _broken(tmp_path, "aws.yaml", lambda c: c.__setitem__("head_node_type", "nope"))
    assert cli_validate([str(CLUSTER / "aws.yaml")]) == 0
    assert cli_validate([str(CLUSTER / "gcp.yaml"), str(bad)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"OK {CLUSTER / 'aws.yaml'}"
    assert lines[1] == f"OK {CLUSTER / 'gcp.yaml'}"
    assert lines[2].startswith(f"FAIL {bad}: head_node_type: 'nope'")
    assert [r.ok for r in validate_files([CLUSTER / "aws.yaml", bad, tmp_path / "missing.yaml"])] == [
        True, False, False]


# -- launcher YAMLs ---------------------------------------------------------------------------------


def _node_type(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda c: c["available_node_types"][name]


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda c: c.__setitem__("head_node_type", "cpu_head"),
     ["head_node_type: 'cpu_head' is not a key of available_node_types", "gpu_spot"]),
    (lambda c: c.__setitem__("head_node_type", "gpu_spot"),
     ["available_node_types.gpu_spot.resources", "head_node_type 'gpu_spot'", "worker type"]),
    (lambda c: _node_type("gpu_spot")(c)["resources"].__setitem__("GPU", -1),
     ["available_node_types.gpu_spot.resources.GPU", "-1 is less than the minimum of 0"]),
    (lambda c: c.__setitem__("max_worker", 3), ["top level: unknown key 'max_worker'"]),
    (lambda c: _node_type("gpu_ondemand")(c).__setitem__("min_worker", 1),
     ["available_node_types.gpu_ondemand: unknown key 'min_worker'"]),
    (lambda c: _node_type("gpu_spot")(c).__setitem__("min_workers", 5),
     ["available_node_types.gpu_spot.max_workers: 4 is below min_workers 5"]),
    (lambda c: c.__setitem__("head_start_ray_commands",
                             [s.replace("127.0.0.1", "0.0.0.0") for s in c["head_start_ray_commands"]]),
     ["head_start_ray_commands[1]", "--dashboard-host=127.0.0.1"]),
    (lambda c: c.pop("worker_start_ray_commands"), ["worker_start_ray_commands: missing"]),
    (lambda c: c.__setitem__("worker_start_ray_commands",
                             [s.replace("RAY_AUTH_MODE=token ", "") for s in c["worker_start_ray_commands"]]),
     ["worker_start_ray_commands[1]", "RAY_AUTH_MODE=token"]),
    (lambda c: c["provider"].__setitem__("security_group", {"IpPermissions": [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]}),
     ["provider.security_group.IpPermissions[0]", "0.0.0.0/0"]),
    (lambda c: c["provider"].__setitem__("aws_credentials", {"aws_access_key_id": "AKIA..."}),
     ["provider.aws_credentials", "credentials do not belong in the file"]),
    (lambda c: c["file_mounts"].pop("~/.ray/auth_token"), ["file_mounts", "~/.ray/auth_token"]),
    (lambda c: (_node_type("gpu_spot")(c).__setitem__("min_workers", 4), c.__setitem__("max_workers", 5),
                _node_type("gpu_ondemand")(c).__setitem__("min_workers", 2)),
     ["Ray's validate_config", "sum of `min_workers`"]),
], ids=["head-type-missing", "head-is-worker-type", "negative-gpu", "unknown-top-key", "unknown-nested-key",
        "min-above-max", "open-dashboard", "ray-default-start", "auth-off-on-workers", "world-open-port",
        "credentials", "token-not-mounted", "ray-sum-of-min-workers"])
def test_broken_launcher_config_names_the_key(tmp_path: Path, mutate: Callable, expected: list[str]) -> None:
    detail = _error(_broken(tmp_path, "aws.yaml", mutate))
    for part in expected:
        assert part in detail


def test_duplicate_yaml_keys_and_foreign_documents_fail(tmp_path: Path) -> None:
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("cluster_name: a\nprovider: {type: aws}\ncluster_name: b\n")
    assert "duplicate key 'cluster_name'" in _error(duplicate)
    other = tmp_path / "other.yaml"
    other.write_text("apiVersion: v1\nkind: Secret\n")
    assert "neither a Ray cluster launcher config" in _error(other)
    assert _error(tmp_path / "absent.yaml") == "no such file"


# -- KubeRay manifests ------------------------------------------------------------------------------


def _spot_group(c: dict[str, Any]) -> dict[str, Any]:
    spec = c["spec"].get("rayClusterSpec", c["spec"])
    return spec["workerGroupSpecs"][1]


def _spot_container(c: dict[str, Any]) -> dict[str, Any]:
    return _spot_group(c)["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("name", ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml"])
@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda c: _spot_container(c)["resources"]["limits"].__setitem__("nvidia.com/gpu", "-1"),
     ['workerGroupSpecs[1].template.spec.containers[0].resources.limits["nvidia.com/gpu"]',
      "'-1' is not a non-negative Kubernetes quantity"]),
    (lambda c: _spot_container(c)["resources"]["requests"].__setitem__("memory", "-16Gi"),
     ["resources.requests.memory", "non-negative Kubernetes quantity"]),
    (lambda c: c.__setitem__("specs", {}), ["top level: unknown key 'specs'"]),
    (lambda c: _spot_group(c).__setitem__("maxReplica", 3), ["workerGroupSpecs[1]: unknown key 'maxReplica'"]),
    (lambda c: (_spot_group(c).__setitem__("minReplicas", 3), _spot_group(c).__setitem__("maxReplicas", 1)),
     ["workerGroupSpecs[1].maxReplicas: 1 is below minReplicas 3", "gpu-spot"]),
    (lambda c: _spot_group(c).__setitem__("replicas", 9), ["workerGroupSpecs[1].replicas: 9 is outside"]),
    (lambda c: _spot_container(c)["env"].__setitem__(1, {"name": "RAY_AUTH_TOKEN", "value": "secret"}),
     ["containers[0].env[1]", "RAY_AUTH_TOKEN must come from a Secret"]),
    (lambda c: _spot_group(c)["template"]["spec"]["volumes"].pop(0),
     ["containers[0].volumeMounts[0].name: 'dshm' names no entry of the pod's volumes"]),
    (lambda c: _spot_group(c).__setitem__("groupName", "gpu-ondemand"),
     ["workerGroupSpecs[1].groupName: 'gpu-ondemand' is used by another worker group"]),
], ids=["negative-gpu", "negative-memory", "unknown-top-key", "unknown-nested-key", "max-below-min",
        "replicas-out-of-range", "literal-token", "mount-without-volume", "duplicate-group"])
def test_broken_kuberay_manifest_names_the_key(tmp_path: Path, name: str, mutate: Callable,
                                              expected: list[str]) -> None:
    detail = _error(_broken(tmp_path, name, mutate))
    for part in expected:
        assert part in detail


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda c: c["spec"]["headGroupSpec"].__setitem__("serviceType", "LoadBalancer"),
     ["spec.headGroupSpec.serviceType: 'LoadBalancer' is not ClusterIP"]),
    (lambda c: c["spec"].pop("authOptions"), ["spec: 'authOptions' is a required property"]),
    (lambda c: c["spec"]["authOptions"].__setitem__("mode", "disabled"), ["spec.authOptions.mode", "token"]),
    (lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].__setitem__("num-cpus", 0),
     ["spec.headGroupSpec.rayStartParams.num-cpus: 0 is not of type 'string'"]),
    (lambda c: c["spec"].__setitem__("rayVersion", "2.52.0"), ["spec.rayVersion: '2.52.0'", "pinned"]),
    (lambda c: _spot_container(c)["env"][1]["valueFrom"]["secretKeyRef"].__setitem__("name", "other"),
     ["secretKeyRef.name: 'other' differs from authOptions.secretName 'ray-auth'"]),
    (lambda c: _spot_container(c)["resources"]["limits"].__setitem__("nvidia.com/gpu", "500m"),
     ["'500m' is not a whole number of GPUs"]),
    (lambda c: c.__setitem__("kind", "RayService"), ["kind: 'RayService' is not one of"]),
], ids=["load-balancer", "auth-missing", "auth-disabled", "unquoted-start-param", "other-ray", "two-secrets",
        "fractional-gpu", "unsupported-kind"])
def test_kuberay_rules_beyond_the_crd(tmp_path: Path, mutate: Callable, expected: list[str]) -> None:
    detail = _error(_broken(tmp_path, "kuberay/raycluster.yaml", mutate))
    for part in expected:
        assert part in detail


def test_rayjob_needs_one_cluster_source_and_a_mapping_runtime_env(tmp_path: Path) -> None:
    both = _broken(tmp_path, "kuberay/rayjob.yaml", lambda c: c["spec"].__setitem__("clusterSelector", {"a": "b"}))
    assert "exactly one of rayClusterSpec" in _error(both)
    listed = _broken(tmp_path, "kuberay/rayjob.yaml", lambda c: c["spec"].__setitem__("runtimeEnvYAML", "- pip"))
    assert _error(listed).startswith("spec.runtimeEnvYAML: must be a YAML mapping")
