"""Typed building blocks of a Grafana dashboard and their rendering to Grafana's JSON model.

Panels are laid out by the renderer, row after row, left to right on Grafana's 24-column grid, and numbered
in that order: a dashboard definition says what to show, never where.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

SCHEMA_VERSION = 39
GRID_WIDTH = 24
#: Every panel and variable queries the Prometheus chosen in the ``datasource`` variable.
DATASOURCE_VARIABLE = "datasource"
DATASOURCE = {"type": "prometheus", "uid": f"${{{DATASOURCE_VARIABLE}}}"}

PanelKind = Literal["timeseries", "stat", "heatmap"]


@dataclass(frozen=True)
class GridPos:
    """A panel's place on the grid: column ``x`` (0-23), row ``y``, width and height in grid units."""

    x: int
    y: int
    w: int
    h: int

    def overlaps(self, other: GridPos) -> bool:
        return (self.x < other.x + other.w and other.x < self.x + self.w
                and self.y < other.y + other.h and other.y < self.y + self.h)

    def to_json(self) -> dict[str, int]:
        return {"h": self.h, "w": self.w, "x": self.x, "y": self.y}


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel; ``heatmap`` targets return one series per histogram bucket (``le``)."""

    expr: str
    legend: str = ""
    heatmap: bool = False

    def to_json(self, ref_id: str) -> dict[str, Any]:
        return {
            "datasource": DATASOURCE,
            "editorMode": "code",
            "expr": self.expr,
            "format": "heatmap" if self.heatmap else "time_series",
            "instant": False,
            "legendFormat": "{{le}}" if self.heatmap else self.legend,
            "range": True,
            "refId": ref_id,
        }


@dataclass(frozen=True)
class Panel:
    """A timeseries, stat or heatmap panel; ``unit`` is a Grafana unit id.

    ``gpu_only`` marks panels built on Ray's GPU node metrics, which have no series on CPU-only nodes.
    """

    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: PanelKind = "timeseries"
    width: int = 12
    height: int = 8
    gpu_only: bool = False

    def to_json(self, panel_id: int, pos: GridPos) -> dict[str, Any]:
        refs = (chr(ord("A") + i) for i in range(len(self.targets)))
        return {
            "datasource": DATASOURCE,
            "description": self.description,
            "fieldConfig": {"defaults": self._field_defaults(), "overrides": []},
            "gridPos": pos.to_json(),
            "id": panel_id,
            "options": self._options(),
            "targets": [t.to_json(ref) for t, ref in zip(self.targets, refs, strict=True)],
            "title": self.title,
            "type": self.kind,
        }

    def _field_defaults(self) -> dict[str, Any]:
        if self.kind == "timeseries":
            # Ray exports a gauge only for a while after each set: span the gaps between epochs.
            custom = {"drawStyle": "line", "fillOpacity": 0, "lineWidth": 1, "showPoints": "auto", "spanNulls": True}
            return {"custom": custom, "unit": self.unit}
        if self.kind == "stat":
            return {"color": {"mode": "thresholds"}, "unit": self.unit,
                    "thresholds": {"mode": "absolute", "steps": [{"color": "blue", "value": None}]}}
        return {"custom": {"scaleDistribution": {"type": "linear"}}}

    def _options(self) -> dict[str, Any]:
        if self.kind == "timeseries":
            return {"legend": {"calcs": ["lastNotNull", "max"], "displayMode": "table", "placement": "bottom",
                               "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}}
        if self.kind == "stat":
            return {"colorMode": "value", "graphMode": "area", "justifyMode": "auto", "orientation": "auto",
                    "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "textMode": "value_and_name"}
        return {"calculate": False, "cellGap": 1, "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                "legend": {"show": True}, "rowsFrame": {"layout": "le"},
                "tooltip": {"mode": "single", "yHistogram": True}, "yAxis": {"unit": self.unit}}


@dataclass(frozen=True)
class Row:
    """A titled group of panels."""

    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Variable:
    """A templating variable: the datasource picker, or label values from a PromQL selector.

    ``query`` is ``label_values(<selector>, <label>)`` for query variables and the plugin id for a datasource.
    """

    name: str
    label: str
    query: str
    kind: Literal["datasource", "query"] = "query"
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        common = {"description": self.description, "hide": 0, "label": self.label, "name": self.name,
                  "options": [], "regex": "", "type": self.kind}
        if self.kind == "datasource":
            return {**common, "current": {}, "includeAll": False, "multi": False, "query": self.query,
                    "refresh": 1}
        return {**common, "allValue": ".*", "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                "datasource": DATASOURCE, "definition": self.query, "includeAll": True, "multi": True,
                "query": {"query": self.query, "refId": "StandardVariableQuery"}, "refresh": 2, "sort": 1}


@dataclass(frozen=True)
class Dashboard:
    """A whole dashboard; ``uid`` is its stable identity in Grafana (file provisioning and the HTTP API)."""

    uid: str
    title: str
    description: str
    variables: tuple[Variable, ...]
    rows: tuple[Row, ...]
    tags: tuple[str, ...] = field(default=("mpmae", "ray"))

    def panels(self) -> Iterator[Panel]:
        for row in self.rows:
            yield from row.panels

    def layout(self) -> Iterator[tuple[Row | Panel, GridPos]]:
        """Rows and panels with their grid positions: a row header, then its panels wrapped at 24 columns."""
        y = 0
        for row in self.rows:
            yield row, GridPos(0, y, GRID_WIDTH, 1)
            y, x, line = y + 1, 0, 0
            for panel in row.panels:
                if x + panel.width > GRID_WIDTH:
                    y, x, line = y + line, 0, 0
                yield panel, GridPos(x, y, panel.width, panel.height)
                x, line = x + panel.width, max(line, panel.height)
            y += line

    def to_json(self) -> dict[str, Any]:
        panels = []
        for panel_id, (item, pos) in enumerate(self.layout(), start=1):
            if isinstance(item, Row):
                panels.append({"collapsed": False, "gridPos": pos.to_json(), "id": panel_id, "panels": [],
                               "title": item.title, "type": "row"})
            else:
                panels.append(item.to_json(panel_id, pos))
        return {
            "annotations": {"list": []},
            "description": self.description,
            "editable": True,
            "fiscalYearStartMonth": 0,
            "graphTooltip": 1,
            "id": None,
            "links": [],
            "panels": panels,
            "refresh": "30s",
            "schemaVersion": SCHEMA_VERSION,
            "tags": list(self.tags),
            "templating": {"list": [v.to_json() for v in self.variables]},
            "time": {"from": "now-6h", "to": "now"},
            "timepicker": {},
            "timezone": "browser",
            "title": self.title,
            "uid": self.uid,
            "version": 1,
        }
