"""Check the cluster kit (``cluster/``) before a cloud sees it: Ray cluster launcher YAMLs and KubeRay manifests.

A mistake in these files otherwise shows up minutes into ``ray up`` or as a pod stuck in Pending, or not at
all (an open dashboard, a dropped key). Launcher YAMLs go through Ray's own schema, ``prepare_config`` and
``validate_config``; KubeRay manifests through a JSON Schema of the fields the kit uses. Both then get the
cross-field and security rules that no schema states: node types that exist, ``min <= max``, non-negative
resources, token auth on every node, a dashboard that is not exposed, no credentials in the file.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import json
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml


class ClusterConfigError(ValueError):
    """A cluster file that Ray's launcher or KubeRay would reject, or that breaks the kit's rules."""

    def __init__(self, path: Path | str, detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.path = Path(path)
        self.detail = detail


class _Problem(Exception):
    """A problem at a location inside a document; `validate` adds the file name."""

    def __init__(self, location: str, message: str) -> None:
        super().__init__(f"{location}: {message}")


@dataclass(frozen=True)
class FileResult:
    """The outcome of validating one file: ``error`` is None when the file is valid."""

    path: Path
    error: ClusterConfigError | None

    @property
    def ok(self) -> bool:
        return self.error is None

    def line(self) -> str:
        return f"OK {self.path}" if self.error is None else f"FAIL {self.path}: {self.error.detail}"


def validate(path: Path | str) -> None:
    """Validate one launcher YAML or KubeRay manifest; raise `ClusterConfigError` naming the file and key."""
    path = Path(path)
    document = _load(path)
    try:
        if _is_kuberay(document):
            _validate_kuberay(document)
        elif _is_launcher(document):
            _validate_launcher(document)
        else:
            raise _Problem("top level", "neither a Ray cluster launcher config (keys cluster_name, provider) nor "
                                        "a KubeRay manifest (apiVersion ray.io/v1)")
    except _Problem as problem:
        raise ClusterConfigError(path, str(problem)) from None


def validate_files(paths: Iterable[Path | str]) -> list[FileResult]:
    """Validate every file, not stopping at the first bad one."""
    results = []
    for path in paths:
        try:
            validate(path)
        except ClusterConfigError as err:
            results.append(FileResult(Path(path), err))
        else:
            results.append(FileResult(Path(path), None))
    return results


def cli_validate(paths: Sequence[str]) -> int:
    """`mpmae cluster validate FILE...`: one ``OK``/``FAIL`` line per file; exit code 1 when any failed."""
    results = validate_files(paths)
    for result in results:
        print(result.line())
    return 0 if results and all(r.ok for r in results) else 1


# -- loading ----------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """PyYAML silently keeps the last of two equal keys; in a cluster file that is always a mistake."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[str] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, str):
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as stream:
            documents = list(yaml.load_all(stream, Loader=_StrictLoader))
    except FileNotFoundError:
        raise ClusterConfigError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ClusterConfigError(path, f"cannot read: {err}") from None
    except yaml.YAMLError as err:
        raise ClusterConfigError(path, f"not valid YAML: {' '.join(str(err).split())}") from None
    documents = [d for d in documents if d is not None]
    if len(documents) != 1:
        raise ClusterConfigError(path, f"expected exactly one YAML document, found {len(documents)}")
    if not isinstance(documents[0], dict):
        raise ClusterConfigError(path, f"expected a mapping at the top level, found {type(documents[0]).__name__}")
    return documents[0]


def _is_kuberay(document: Mapping[str, Any]) -> bool:
    return str(document.get("apiVersion", "")).startswith("ray.io/")


def _is_launcher(document: Mapping[str, Any]) -> bool:
    return "cluster_name" in document or "provider" in document


# -- JSON Schema errors as messages -----------------------------------------------------------------


def _location(parts: Iterable[Any]) -> str:
    """``spec.workerGroupSpecs[0].resources["nvidia.com/gpu"]`` from a jsonschema path."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", str(part)):
            out += f".{part}" if out else str(part)
        else:
            out += f"[{json.dumps(str(part))}]"
    return out or "top level"


def _schema_problem(document: Any, schema: Mapping[str, Any]) -> _Problem | None:
    validator_cls = jsonschema.validators.validator_for(schema)
    error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(document))
    if error is None:
        return None
    return _Problem(_location(error.absolute_path), _describe(error))


def _describe(error: jsonschema.ValidationError) -> str:
    if (error.validator == "additionalProperties" and isinstance(error.instance, dict)
            and isinstance(error.schema, Mapping)):
        known = set(error.schema.get("properties", {}))
        patterns = list(error.schema.get("patternProperties", {}))
        unknown = sorted(k for k in error.instance if k not in known and not any(re.search(p, k) for p in patterns))
        allowed = f" (allowed: {', '.join(sorted(known))})" if known else ""
        return f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{allowed}"
    for candidate in _error_chain(error):
        if (isinstance(candidate.schema, Mapping) and "description" in candidate.schema
                and candidate.validator in ("anyOf", "oneOf", "pattern", "enum")):
            return f"{candidate.instance!r} is not {candidate.schema['description']}"
    return error.message


def _error_chain(error: jsonschema.ValidationError) -> Iterator[jsonschema.exceptions._Error]:
    # ``_Error``: what the stubs type ``parent`` as (ValidationError's base; the parents are ValidationErrors).
    current: jsonschema.exceptions._Error | None = error
    while current is not None:
        yield current
        current = current.parent


# -- Ray cluster launcher ---------------------------------------------------------------------------

_LOOPBACK = ("127.0.0.1", "localhost")
# Ray fills a missing top-level key from its provider defaults, which bind the dashboard to 0.0.0.0 and
# install a nightly Ray wheel: the kit's files set these themselves.
_EXPLICIT_KEYS = ("setup_commands", "head_start_ray_commands", "worker_start_ray_commands", "file_mounts")
_OPEN_CIDRS = ("0.0.0.0/0", "::/0")
_CREDENTIAL_KEYS = ("aws_credentials", "gcp_credentials", "azure_credentials")


def _validate_launcher(config: dict[str, Any]) -> None:
    problem = _schema_problem(config, _ray_launcher_schema())
    if problem is not None:
        raise problem
    for key in _EXPLICIT_KEYS:
        if key not in config:
            raise _Problem(key, "missing: Ray would take its provider default (a nightly Ray wheel, a dashboard "
                                "on 0.0.0.0, no auth)")
    _check_node_types(config)
    _check_no_credentials(config)
    _check_security_group(config)
    _check_launcher_policy(_ray_prepare_and_validate(config))


def _ray_launcher_schema() -> dict[str, Any]:
    """Ray's own launcher schema, applied to the file as written (Ray applies it after merging defaults)."""
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _ray_prepare_and_validate(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's own checks, as `ray up` runs them before it calls the cloud.

    ``prepare_config`` and ``validate_config`` are private API (``ray.autoscaler._private.util``); pyproject pins
    ``ray==2.60.*`` partly for them. Neither needs credentials or the network: ``prepare_config`` merges the
    provider's bundled ``defaults.yaml`` (a shallow, top-level merge), folds ``setup_commands`` into the head and
    worker lists and fills every node type's ``min_workers``/``max_workers``; ``validate_config`` applies the
    schema, needs the ``cluster_synced_files`` that the merge adds, and checks ``head_node_type`` and the sum
    of ``min_workers``. Cloud-side bootstrapping (IAM, subnets, security groups) is ``ray up``'s next step.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        with _quiet(logging.getLogger("ray.autoscaler._private.util")):  # "setting max workers for ..." lines
            prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as err:
        raise _Problem(_location(err.absolute_path), f"after Ray's defaults were merged: {_describe(err)}") from None
    except (ValueError, RuntimeError, KeyError, TypeError, AssertionError, NotImplementedError) as err:
        raise _Problem("Ray's validate_config", str(err) or type(err).__name__) from None
    return prepared


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_node_types(config: Mapping[str, Any]) -> None:
    types = config.get("available_node_types")
    if not types:
        raise _Problem("available_node_types", "missing: without it Ray launches its default m5.large/n1 nodes")
    head = config.get("head_node_type")
    if head is None:
        raise _Problem("head_node_type", "missing: name the head's entry of available_node_types")
    if head not in types:
        raise _Problem("head_node_type", f"{head!r} is not a key of available_node_types "
                                         f"(has: {', '.join(sorted(types))})")
    cap = config.get("max_workers")
    for name, node_type in types.items():
        _check_worker_bounds(f"available_node_types.{name}", node_type, cap)
    _check_head_resources(head, types[head])
    if len(types) < 2:
        raise _Problem("available_node_types", "no worker node type besides the head")


def _check_worker_bounds(where: str, node_type: Mapping[str, Any], cap: int | None) -> None:
    low, high = node_type.get("min_workers", 0), node_type.get("max_workers")
    for key, value in (("min_workers", low), ("max_workers", high)):
        if value is not None and value < 0:
            raise _Problem(f"{where}.{key}", f"{value} is negative")
    if high is not None and low > high:
        raise _Problem(f"{where}.max_workers", f"{high} is below min_workers {low}")
    if cap is not None and high is not None and high > cap:
        raise _Problem(f"{where}.max_workers", f"{high} exceeds the cluster's max_workers {cap}")


def _check_head_resources(head: str, node_type: Mapping[str, Any]) -> None:
    resources = node_type.get("resources", {})
    if resources.get("CPU") != 0 or resources.get("GPU", 0) != 0:
        raise _Problem(f"available_node_types.{head}.resources",
                       f"head_node_type {head!r} declares {resources}; the head must declare "
                       '{"CPU": 0, "GPU": 0} so that no training lands on it (is it a worker type?)')


def _check_no_credentials(config: Mapping[str, Any]) -> None:
    for key in _CREDENTIAL_KEYS:
        if key in config.get("provider", {}):
            raise _Problem(f"provider.{key}", "credentials do not belong in the file: the launcher reads them "
                                              "from the environment, nodes from instance roles/service accounts")
    for where, text in _strings(config):
        if re.search(r"RAY_AUTH_TOKEN\s*=", text):
            raise _Problem(where, "sets RAY_AUTH_TOKEN literally; the token comes from ~/.ray/auth_token "
                                  "(file_mounts), never from the file")


def _check_security_group(config: Mapping[str, Any]) -> None:
    """Extra inbound rules (AWS provider.security_group); Ray's schema leaves the provider section free-form."""
    group = config.get("provider", {}).get("security_group", {})
    rules = group.get("IpPermissions", []) if isinstance(group, Mapping) else []
    for i, rule in enumerate(rules if isinstance(rules, list) else []):
        if not isinstance(rule, Mapping):
            continue
        ranges = [r.get("CidrIp") for r in rule.get("IpRanges", []) if isinstance(r, Mapping)]
        ranges += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", []) if isinstance(r, Mapping)]
        for cidr in ranges:
            if cidr in _OPEN_CIDRS:
                raise _Problem(f"provider.security_group.IpPermissions[{i}]",
                               f"opens port(s) {rule.get('FromPort')}-{rule.get('ToPort')} to {cidr}; "
                               "allow only your own address (and reach the dashboard through `ray dashboard`)")


def _check_launcher_policy(config: Mapping[str, Any]) -> None:
    """Rules on the merged config, so that a key left to Ray's defaults cannot slip past them."""
    head_starts = _ray_start_commands(config, "head_start_ray_commands")
    if not any("--head" in c for _, c in head_starts):
        raise _Problem("head_start_ray_commands", "no `ray start --head` command")
    for where, command in head_starts:
        host = re.search(r"--dashboard-host[= ](\S+)", command)
        if "--head" in command and (host is None or host.group(1).strip("'\"") not in _LOOPBACK):
            raise _Problem(where, "`ray start --head` must bind the dashboard and job API to loopback "
                                  "(--dashboard-host=127.0.0.1) and be reached through `ray dashboard` (an SSH "
                                  "tunnel); Ray's launcher default is 0.0.0.0")
    worker_starts = _ray_start_commands(config, "worker_start_ray_commands")
    if not worker_starts:
        raise _Problem("worker_start_ray_commands", "no `ray start` command")
    for where, command in head_starts + worker_starts:
        if not re.search(r"\bRAY_AUTH_MODE=token\b", command):
            raise _Problem(where, "`ray start` must run with RAY_AUTH_MODE=token, the same on every node")
    for where, text in _strings(config):
        if re.search(r"RAY_AUTH_MODE=(?!token\b)", text):
            raise _Problem(where, "sets RAY_AUTH_MODE to something other than token")
    if "~/.ray/auth_token" not in config.get("file_mounts", {}):
        raise _Problem("file_mounts", "must mount ~/.ray/auth_token (made by `ray get-auth-token --generate`) so "
                                      "that every node has the cluster's token")


def _ray_start_commands(config: Mapping[str, Any], key: str) -> list[tuple[str, str]]:
    commands = config.get(key, [])
    return [(f"{key}[{i}]", c) for i, c in enumerate(commands) if isinstance(c, str) and "ray start" in c]


def _strings(value: Any, parts: tuple[Any, ...] = ()) -> Iterator[tuple[str, str]]:
    """Every string in a document with its location."""
    if isinstance(value, str):
        yield _location(parts), value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, (*parts, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, (*parts, i))


# -- KubeRay ----------------------------------------------------------------------------------------
# The fields of the ray.io/v1 RayCluster and RayJob that the kit uses (KubeRay 1.6 API reference), strict
# wherever the structure is ours to define: an unknown key is an error, not something the API server drops.
# Pod and container specs list the Kubernetes field names without typing every one.


def _ray_series() -> str:
    return ".".join(importlib.metadata.version("ray").split(".")[:2])


_QUANTITY: dict[str, Any] = {
    "description": 'a non-negative Kubernetes quantity such as 8, "500m" or "64Gi"',
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "number", "minimum": 0},
        {"type": "string", "pattern": r"^\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$"},
    ],
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
         "description": "a lower-case DNS label (a-z, 0-9, '-')"}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 2147483647}
_RESOURCE_LIST = {"type": "object", "additionalProperties": _QUANTITY,
                  "propertyNames": {"pattern": r"^([a-z0-9.-]+/)?[A-Za-z0-9._-]+$"}}
_RESOURCES = {"type": "object", "additionalProperties": False,
              "properties": {"limits": _RESOURCE_LIST, "requests": _RESOURCE_LIST, "claims": {"type": "array"}}}
_KEY_REF = {"type": "object", "additionalProperties": False, "required": ["name", "key"],
            "properties": {"name": {"type": "string"}, "key": {"type": "string"}, "optional": {"type": "boolean"}}}
_ENV_VAR = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "value": {"type": "string"},
        "valueFrom": {"type": "object", "additionalProperties": False, "properties": {
            "secretKeyRef": _KEY_REF, "configMapKeyRef": _KEY_REF, "fieldRef": {"type": "object"},
            "resourceFieldRef": {"type": "object"}}},
    },
}
_VOLUME_MOUNT = {
    "type": "object", "additionalProperties": False, "required": ["name", "mountPath"],
    "properties": {k: {} for k in ("mountPropagation", "recursiveReadOnly", "subPathExpr")} | {
        "name": {"type": "string"}, "mountPath": {"type": "string"}, "readOnly": {"type": "boolean"},
        "subPath": {"type": "string"}},
}
_CONTAINER_FIELDS = ("lifecycle", "livenessProbe", "readinessProbe", "startupProbe", "securityContext",
                     "envFrom", "ports", "resizePolicy", "restartPolicy", "stdin", "stdinOnce", "tty",
                     "terminationMessagePath", "terminationMessagePolicy", "volumeDevices", "workingDir")
_CONTAINER = {
    "type": "object", "additionalProperties": False, "required": ["name", "image"],
    "properties": {k: {} for k in _CONTAINER_FIELDS} | {
        "name": {"type": "string"}, "image": {"type": "string", "minLength": 1},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "env": {"type": "array", "items": _ENV_VAR},
        "resources": _RESOURCES,
        "volumeMounts": {"type": "array", "items": _VOLUME_MOUNT},
    },
}
_VOLUME_SOURCES = ("awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "configMap", "csi",
                   "downwardAPI", "ephemeral", "fc", "flexVolume", "gcePersistentDisk", "glusterfs", "hostPath",
                   "image", "iscsi", "nfs", "persistentVolumeClaim", "portworxVolume", "projected", "rbd",
                   "secret", "vsphereVolume")
_VOLUME = {
    "type": "object", "additionalProperties": False, "required": ["name"],
    "properties": {k: {"type": "object"} for k in _VOLUME_SOURCES} | {
        "name": {"type": "string"},
        "emptyDir": {"type": "object", "additionalProperties": False, "properties": {
            "medium": {"enum": ["", "Memory"]}, "sizeLimit": _QUANTITY}},
    },
}
_TOLERATION = {
    "type": "object", "additionalProperties": False,
    "properties": {"key": {"type": "string"}, "operator": {"enum": ["Exists", "Equal"]}, "value": {"type": "string"},
                   "effect": {"enum": ["", "NoSchedule", "PreferNoSchedule", "NoExecute"]},
                   "tolerationSeconds": {"type": "integer"}},
}
_POD_FIELDS = ("activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "dnsConfig", "dnsPolicy",
               "enableServiceLinks", "hostAliases", "hostIPC", "hostNetwork", "hostPID", "hostUsers", "hostname",
               "imagePullSecrets", "os", "overhead", "preemptionPolicy", "priority", "priorityClassName",
               "readinessGates", "resourceClaims", "resources", "runtimeClassName", "schedulerName",
               "schedulingGates", "securityContext", "serviceAccountName", "setHostnameAsFQDN",
               "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds", "topologySpreadConstraints")
_POD_TEMPLATE = {
    "type": "object", "additionalProperties": False, "required": ["spec"],
    "properties": {
        "metadata": {"type": "object", "additionalProperties": False,
                     "properties": {"labels": _STRING_MAP, "annotations": _STRING_MAP, "name": {"type": "string"}}},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["containers"],
            "properties": {k: {} for k in _POD_FIELDS} | {
                "containers": {"type": "array", "minItems": 1, "items": _CONTAINER},
                "initContainers": {"type": "array", "items": _CONTAINER},
                "volumes": {"type": "array", "items": _VOLUME},
                "nodeSelector": _STRING_MAP,
                "tolerations": {"type": "array", "items": _TOLERATION},
                "restartPolicy": {"enum": ["Always", "OnFailure", "Never"]},
            },
        },
    },
}
_RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"},
                     "description": "a map of strings (quote numbers: num-cpus: \"0\")"}
_HEAD_GROUP = {
    "type": "object", "additionalProperties": False, "required": ["template"],
    "properties": {
        "template": _POD_TEMPLATE,
        "rayStartParams": _RAY_START_PARAMS,
        "serviceType": {"enum": ["ClusterIP"], "description": "ClusterIP: reach the dashboard through kubectl "
                                                             "port-forward, never a public LoadBalancer/NodePort"},
        "headService": {"type": "object"},
        "enableIngress": {"enum": [False], "description": "false: no Ingress to the dashboard"},
    },
}
_WORKER_GROUP = {
    "type": "object", "additionalProperties": False,
    "required": ["groupName", "minReplicas", "maxReplicas", "template"],
    "properties": {
        "groupName": _NAME, "replicas": _COUNT, "minReplicas": _COUNT, "maxReplicas": _COUNT,
        "numOfHosts": {"type": "integer", "minimum": 1}, "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
        "rayStartParams": _RAY_START_PARAMS, "template": _POD_TEMPLATE, "suspend": {"type": "boolean"},
        "scaleStrategy": {"type": "object", "additionalProperties": False,
                          "properties": {"workersToDelete": {"type": "array", "items": {"type": "string"}}}},
    },
}
_RAY_CLUSTER_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["headGroupSpec", "rayVersion", "authOptions"],
    "properties": {
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": _WORKER_GROUP},
        "rayVersion": {"type": "string", "pattern": rf"^{re.escape(_ray_series())}(\.[0-9]+)?$",
                       "description": f"the Ray series pinned in pyproject.toml ({_ray_series()}.x)"},
        "authOptions": {"type": "object", "additionalProperties": False, "required": ["mode"], "properties": {
            "mode": {"enum": ["token"], "description": "token: the kit never runs a cluster without auth"},
            "secretName": {"type": "string", "minLength": 1}, "enableK8sTokenAuth": {"type": "boolean"}}},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
            "idleTimeoutSeconds": {"type": "integer", "minimum": 0}, "resources": _RESOURCES,
            "image": {"type": "string"}, "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
            "env": {"type": "array", "items": _ENV_VAR}, "envFrom": {"type": "array"},
            "volumeMounts": {"type": "array", "items": _VOLUME_MOUNT}, "securityContext": {"type": "object"},
            "version": {"enum": ["v1", "v2"]}}},
        "headServiceAnnotations": _STRING_MAP,
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "gcsFaultToleranceOptions": {"type": "object"},
    },
}
_RAY_JOB_SPEC = {
    "type": "object", "additionalProperties": False, "required": ["entrypoint"],
    "properties": {
        "entrypoint": {"type": "string", "minLength": 1},
        "rayClusterSpec": _RAY_CLUSTER_SPEC,
        "clusterSelector": _STRING_MAP,
        "runtimeEnvYAML": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "submitterPodTemplate": _POD_TEMPLATE,
        "submitterConfig": {"type": "object", "additionalProperties": False,
                            "properties": {"backoffLimit": {"type": "integer", "minimum": 0}}},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "jobId": {"type": "string"},
        "metadata": _STRING_MAP,
        "entrypointNumCpus": {"type": "number", "minimum": 0},
        "entrypointNumGpus": {"type": "number", "minimum": 0},
        "entrypointResources": {"type": "string"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "deletionStrategy": {"type": "object"},
    },
}
KUBERAY_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"enum": ["RayCluster", "RayJob"]},
        "metadata": {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
            "name": _NAME, "namespace": _NAME, "labels": _STRING_MAP, "annotations": _STRING_MAP}},
        "spec": {"type": "object"},
    },
    "allOf": [
        {"if": {"properties": {"kind": {"const": "RayCluster"}}}, "then": {"properties": {"spec": _RAY_CLUSTER_SPEC}}},
        {"if": {"properties": {"kind": {"const": "RayJob"}}}, "then": {"properties": {"spec": _RAY_JOB_SPEC}}},
    ],
}


def _validate_kuberay(manifest: dict[str, Any]) -> None:
    problem = _schema_problem(manifest, KUBERAY_SCHEMA)
    if problem is not None:
        raise problem
    spec = manifest["spec"]
    if manifest["kind"] == "RayJob":
        _check_ray_job(spec)
        spec, where = spec.get("rayClusterSpec"), "spec.rayClusterSpec"
    else:
        where = "spec"
    if spec is not None:
        _check_ray_cluster(spec, where)


def _check_ray_job(spec: Mapping[str, Any]) -> None:
    if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
        raise _Problem("spec", "give exactly one of rayClusterSpec (a new cluster) and clusterSelector (an "
                               "existing one)")
    if "runtimeEnvYAML" in spec:
        try:
            runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        except yaml.YAMLError as err:
            raise _Problem("spec.runtimeEnvYAML", f"not valid YAML: {err}") from None
        if not isinstance(runtime_env, dict):
            raise _Problem("spec.runtimeEnvYAML", "must be a YAML mapping (env_vars:, pip:, ...)")


def _check_ray_cluster(spec: Mapping[str, Any], where: str) -> None:
    secret = spec["authOptions"].get("secretName")
    _check_pod(spec["headGroupSpec"]["template"]["spec"], f"{where}.headGroupSpec.template.spec", secret)
    names: set[str] = set()
    for i, group in enumerate(spec.get("workerGroupSpecs", [])):
        group_where = f"{where}.workerGroupSpecs[{i}]"
        if group["groupName"] in names:
            raise _Problem(f"{group_where}.groupName", f"{group['groupName']!r} is used by another worker group")
        names.add(group["groupName"])
        _check_replicas(group, group_where)
        _check_pod(group["template"]["spec"], f"{group_where}.template.spec", secret)


def _check_replicas(group: Mapping[str, Any], where: str) -> None:
    low, high = group["minReplicas"], group["maxReplicas"]
    if high < low:
        raise _Problem(f"{where}.maxReplicas", f"{high} is below minReplicas {low} (group {group['groupName']!r})")
    replicas = group.get("replicas")
    if replicas is not None and not low <= replicas <= high:
        raise _Problem(f"{where}.replicas", f"{replicas} is outside minReplicas..maxReplicas ({low}..{high})")


def _check_pod(pod: Mapping[str, Any], where: str, secret: str | None) -> None:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    containers = [("containers", c) for c in pod["containers"]]
    containers += [("initContainers", c) for c in pod.get("initContainers", [])]
    index: dict[str, int] = {}
    for kind, container in containers:
        i = index[kind] = index.get(kind, -1) + 1
        container_where = f"{where}.{kind}[{i}]"
        _check_env(container.get("env", []), f"{container_where}.env", secret)
        _check_mounts(container.get("volumeMounts", []), volumes, f"{container_where}.volumeMounts")
        _check_gpus(container.get("resources", {}), f"{container_where}.resources")


def _check_env(env: Sequence[Mapping[str, Any]], where: str, secret: str | None) -> None:
    for i, var in enumerate(env):
        name = var["name"]
        if name == "RAY_AUTH_TOKEN":
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if "value" in var or ref is None:
                raise _Problem(f"{where}[{i}]", "RAY_AUTH_TOKEN must come from a Secret (valueFrom.secretKeyRef), "
                                                "never a literal value")
            if secret is not None and ref["name"] != secret:
                raise _Problem(f"{where}[{i}].valueFrom.secretKeyRef.name",
                               f"{ref['name']!r} differs from authOptions.secretName {secret!r}: two tokens")
        if name == "RAY_AUTH_MODE" and var.get("value") != "token":
            raise _Problem(f"{where}[{i}]", f"RAY_AUTH_MODE is {var.get('value')!r}; the kit runs token auth only")


def _check_mounts(mounts: Sequence[Mapping[str, Any]], volumes: Mapping[str, Any], where: str) -> None:
    for i, mount in enumerate(mounts):
        volume = volumes.get(mount["name"])
        if volume is None:
            raise _Problem(f"{where}[{i}].name", f"{mount['name']!r} names no entry of the pod's volumes "
                                                 f"(has: {', '.join(sorted(volumes)) or 'none'})")
        if mount["mountPath"] == "/dev/shm" and volume.get("emptyDir", {}).get("medium") != "Memory":
            raise _Problem(f"{where}[{i}]", "/dev/shm must be an emptyDir with medium: Memory (Ray's object store)")


def _check_gpus(resources: Mapping[str, Any], where: str) -> None:
    gpus = {kind: resources.get(kind, {}).get("nvidia.com/gpu") for kind in ("limits", "requests")}
    for kind, value in gpus.items():
        if value is not None and not re.fullmatch(r"\+?[0-9]+", str(value)):
            raise _Problem(f'{where}.{kind}["nvidia.com/gpu"]', f"{value!r} is not a whole number of GPUs")
    if None not in gpus.values() and int(gpus["limits"]) != int(gpus["requests"]):
        raise _Problem(f'{where}.requests["nvidia.com/gpu"]', "must equal the limit (Kubernetes does not "
                                                              "overcommit GPUs)")
