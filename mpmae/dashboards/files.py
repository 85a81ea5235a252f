"""The dashboards as Grafana JSON files: the committed ``dashboards/*.json`` are exactly what this renders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mpmae.dashboards.catalog import DASHBOARDS

#: Where the JSON files live in the repository, relative to its root.
DEFAULT_DIR = Path("dashboards")


def render_all() -> dict[str, dict[str, Any]]:
    """File name -> Grafana dashboard JSON model, for every mpmae dashboard."""
    return {name: dashboard.to_json() for name, dashboard in DASHBOARDS.items()}


def dumps(model: dict[str, Any]) -> str:
    """The file text of a dashboard: sorted keys and a fixed indent, so that a regenerated file diffs cleanly."""
    return json.dumps(model, indent=2, sort_keys=True) + "\n"


def write_dashboards(out_dir: str | Path = DEFAULT_DIR) -> list[Path]:
    """Write every dashboard's JSON into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model in render_all().items():
        path = out / name
        path.write_text(dumps(model))
        paths.append(path)
    return paths


def cli_render(out_dir: str | Path | None = None) -> int:
    """``mpmae dashboards render [OUT_DIR]``: write the JSON files (default ``dashboards/``) and list them."""
    for path in write_dashboards(out_dir or DEFAULT_DIR):
        print(path)
    return 0
