"""Grafana dashboards of mpmae as code: typed definitions rendered to Grafana JSON, written to
``dashboards/`` for file provisioning or uploaded through Grafana's HTTP API."""

from mpmae.dashboards.catalog import DASHBOARDS, training_dashboard, tune_dashboard
from mpmae.dashboards.files import DEFAULT_DIR, cli_render, dumps, render_all, write_dashboards
from mpmae.dashboards.model import Dashboard, GridPos, Panel, Row, Target, Variable
from mpmae.dashboards.provision import DEFAULT_FOLDER, TOKEN_ENV, ProvisionError, cli_provision, provision

__all__ = [
    "DASHBOARDS", "DEFAULT_DIR", "DEFAULT_FOLDER", "TOKEN_ENV", "Dashboard", "GridPos", "Panel", "ProvisionError",
    "Row", "Target", "Variable", "cli_provision", "cli_render", "dumps", "provision", "render_all",
    "training_dashboard", "tune_dashboard", "write_dashboards",
]
