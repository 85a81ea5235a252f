"""Create or update the mpmae dashboards on a Grafana server through its HTTP API.

The token (a Grafana service account token that may write dashboards and folders) comes from
``GRAFANA_TOKEN`` and only ever reaches the HTTP client's Authorization header: it is never printed,
logged or put in an error message.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any
from urllib.parse import urljoin, urlparse

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaException

from mpmae.dashboards.files import render_all

TOKEN_ENV = "GRAFANA_TOKEN"
DEFAULT_FOLDER = "mpmae"


class ProvisionError(RuntimeError):
    """Provisioning failed; the message names the server and the reason, never the token."""


def provision(url: str, token: str | None = None, folder: str | None = DEFAULT_FOLDER,
              timeout: float = 10.0) -> list[str]:
    """Create ``folder`` unless Grafana has one of that title (None: the General folder), then create or
    overwrite every mpmae dashboard in it; returns the dashboards' URLs.

    ``token`` defaults to ``$GRAFANA_TOKEN``.
    """
    secret = token or os.environ.get(TOKEN_ENV, "")
    if not secret:
        raise ProvisionError(f"no Grafana token: set {TOKEN_ENV} to a service account token")
    if urlparse(url).scheme not in ("http", "https"):
        raise ProvisionError(f"{url!r} is not an http(s) URL")
    base = url if url.endswith("/") else url + "/"  # grafana_client appends "api" to the path as it is
    api = GrafanaApi.from_url(base, credential=secret, timeout=timeout)
    try:
        folder_uid = _ensure_folder(api, folder) if folder else None
        return [_upload(api, base, model, folder_uid) for model in render_all().values()]
    except (GrafanaException, OSError) as err:
        # `from None`: the HTTP exception carries the request, and with it the Authorization header.
        raise ProvisionError(f"Grafana at {base}: {err}".replace(secret, "***")) from None


def _ensure_folder(api: GrafanaApi, title: str) -> str:
    for existing in api.folder.get_all_folders():
        if existing.get("title") == title:
            return existing["uid"]
    uid = re.sub(r"[^a-z0-9_-]+", "-", title.lower()).strip("-")[:40] or DEFAULT_FOLDER
    return api.folder.create_folder(title, uid=uid)["uid"]


def _upload(api: GrafanaApi, base: str, model: dict[str, Any], folder_uid: str | None) -> str:
    payload: dict[str, Any] = {"dashboard": model, "overwrite": True, "message": "provisioned by mpmae"}
    if folder_uid:
        payload["folderUid"] = folder_uid
    result = api.dashboard.update_dashboard(payload)
    return urljoin(base, result.get("url", f"d/{model['uid']}"))


def cli_provision(url: str, folder: str | None = DEFAULT_FOLDER) -> int:
    """``mpmae dashboards provision --url URL [--folder NAME]``: 0 on success, 1 with a message on stderr."""
    try:
        urls = provision(url, folder=folder)
    except ProvisionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for dashboard_url in urls:
        print(dashboard_url)
    return 0
