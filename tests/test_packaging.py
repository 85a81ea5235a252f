"""What gets installed: dependency floors past known CVEs, and cluster nodes that install only pinned releases."""

from __future__ import annotations

import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted([*(REPO / "cluster").glob("*.yaml"), *(REPO / "cluster").glob("kuberay/*.yaml")])
PIPED_INTO_A_SHELL = re.compile(r"\|\s*(sudo\s+)?(\S*/)?(ba|da|z)?sh\b")


def _requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found: dict[str, list[Requirement]] = {}
    for line in [*project["dependencies"], *sum(project["optional-dependencies"].values(), [])]:
        requirement = Requirement(line)
        found.setdefault(requirement.name.lower(), []).append(requirement)
    return found


@pytest.mark.parametrize(("name", "vulnerable", "fixed"), [
    ("tqdm", "4.66.2", "4.66.3"),  # CVE-2024-34062
    ("pillow", "10.2.0", "10.3.0"),  # CVE-2024-28219
])
def test_dependency_floors_exclude_vulnerable_releases(name: str, vulnerable: str, fixed: str) -> None:
    requirements = _requirements()[name]
    assert requirements
    for requirement in requirements:
        assert not requirement.specifier.contains(vulnerable) and requirement.specifier.contains(fixed), requirement


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _pip_targets(command: str) -> Iterator[str]:
    """The packages a shell command asks pip to install (local paths and options left out)."""
    for match in re.finditer(r"pip3? install ([^&|;]+)", command):
        args = shlex.split(match.group(1))
        for arg in args:
            if not arg.startswith(("-", ".", "/", "~")):
                yield arg


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: p.relative_to(REPO / "cluster").as_posix())
def test_cluster_nodes_install_only_pinned_releases(path: Path) -> None:
    strings = [s for document in yaml.safe_load_all(path.read_text()) for s in _strings(document)]
    for text in strings:
        assert not PIPED_INTO_A_SHELL.search(text), f"{path.name}: a download piped into a shell: {text}"
        for target in _pip_targets(text):
            assert re.fullmatch(r"[A-Za-z0-9_.\[\],-]+==[0-9][0-9A-Za-z.+-]*", target), f"{path.name}: {target}"


def test_the_pin_and_pipe_checks_catch_what_they_are_for() -> None:
    assert PIPED_INTO_A_SHELL.search("curl -LsSf https://astral.sh/uv/install.sh | sh")
    assert PIPED_INTO_A_SHELL.search("wget -qO- https://x | sudo /bin/bash -s")
    assert not PIPED_INTO_A_SHELL.search("grep -q mpmae_env ~/.bashrc || printf x >> ~/.bashrc")
    assert list(_pip_targets("python3 -m pip install --user -q 'uv==0.13.8' && cd ~/mpmae && pip install -e .")) == [
        "uv==0.13.8"]
    assert list(_pip_targets("pip install -q uv")) == ["uv"]
