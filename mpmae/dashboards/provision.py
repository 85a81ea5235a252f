"""Create or update the mpmae dashboards on a Grafana server through its HTTP API.

The token (a Grafana service account token that may write dashboards and folders) comes from
``GRAFANA_TOKEN`` and only ever reaches the HTTP client's Authorization header: it is never printed,
logged or put in an error message. It travels over https, or over plain http to a loopback address
(127.0.0.0/8, ::1, localhost) or when the caller says ``insecure``; TLS certificates are always verified.
The URL carries no credentials and no query string (grafana-client would read ``?verify=false`` as
"skip the certificate check"), and no message shows more of it than scheme, host, port and path.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from typing import Any
from urllib.parse import SplitResult, urljoin, urlsplit

from grafana_client import GrafanaApi
from grafana_client.client import GrafanaException

from mpmae.dashboards.files import render_all

TOKEN_ENV = "GRAFANA_TOKEN"
DEFAULT_FOLDER = "mpmae"


class ProvisionError(RuntimeError):
    """Provisioning failed; the message names the server and the reason, never the token."""


def provision(url: str, token: str | None = None, folder: str | None = DEFAULT_FOLDER,
              timeout: float = 10.0, insecure: bool = False) -> list[str]:
    """Create ``folder`` unless Grafana has one of that title (None: the General folder), then create or
    overwrite every mpmae dashboard in it; returns the dashboards' URLs.

    ``token`` defaults to ``$GRAFANA_TOKEN``; ``insecure`` allows plain http to a host that is not loopback.
    """
    secret = token or os.environ.get(TOKEN_ENV, "")
    if not secret:
        raise ProvisionError(f"no Grafana token: set {TOKEN_ENV} to a service account token")
    parts = check_url(url, insecure)
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    base = f"{parts.scheme}://{parts.netloc}{path}"
    # netloc as host: grafana-client would drop an IPv6 address's brackets; verify stays on.
    api = GrafanaApi(secret, host=parts.netloc, port=None, url_path_prefix=path.lstrip("/"),
                     protocol=parts.scheme, verify=True, timeout=timeout)
    try:
        folder_uid = _ensure_folder(api, folder) if folder else None
        return [_upload(api, base, model, folder_uid) for model in render_all().values()]
    except json.JSONDecodeError as err:  # a 2xx answer whose body is not JSON
        raise ProvisionError(f"Grafana at {base}: the answer is not JSON ({err})".replace(secret, "***")) from None
    except (GrafanaException, OSError, ValueError, ProvisionError) as err:
        # `from None`: the HTTP exception carries the request, and with it the Authorization header.
        raise ProvisionError(f"Grafana at {base}: {err}".replace(secret, "***")) from None


def check_url(url: str, insecure: bool = False) -> SplitResult:
    """The parts of a Grafana base URL that may carry the token, or a ProvisionError saying why not."""
    parts = urlsplit(url)
    shown = shown_url(parts)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProvisionError(f"{shown!r} is not an http(s) URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ProvisionError(f"{shown}: credentials in the URL are refused; give a service account token "
                             f"in {TOKEN_ENV}")
    if parts.query or parts.fragment:
        raise ProvisionError(f"{shown}: Grafana's base URL takes no query string or fragment "
                             "(grafana-client reads ?verify=false as 'skip the TLS certificate check')")
    try:
        parts.port  # noqa: B018 (parsing the port is the check)
    except ValueError:
        raise ProvisionError(f"{shown}: the port is not a number in [0, 65535]") from None
    if parts.scheme == "http" and not insecure and not is_loopback(parts.hostname):
        raise ProvisionError(f"{shown}: plain http would send the token in clear text to a host that is not "
                             "loopback; use https://, or --insecure on a network you trust")
    return parts


def shown_url(parts: SplitResult) -> str:
    """Scheme, host, port and path of a URL: what a message may show of it (no credentials, no query)."""
    host = parts.netloc.rpartition("@")[2]
    hidden = "***@" if "@" in parts.netloc else ""
    return f"{parts.scheme}://{hidden}{host}{parts.path}"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, as urlsplit's ``hostname`` gives it) is this machine's loopback."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _ensure_folder(api: GrafanaApi, title: str) -> str:
    folders = api.folder.get_all_folders()
    if not isinstance(folders, list) or not all(isinstance(f, dict) for f in folders):
        raise ProvisionError(_unexpected("GET api/folders", folders, "a list of folder objects"))
    for existing in folders:
        if existing.get("title") == title:
            return _uid(existing, "GET api/folders")
    uid = re.sub(r"[^a-z0-9_-]+", "-", title.lower()).strip("-")[:40] or DEFAULT_FOLDER
    return _uid(api.folder.create_folder(title, uid=uid), "POST api/folders")


def _uid(folder: Any, endpoint: str) -> str:
    if not isinstance(folder, dict) or not isinstance(folder.get("uid"), str) or not folder["uid"]:
        raise ProvisionError(_unexpected(endpoint, folder, "a folder object with a 'uid' string"))
    return folder["uid"]


def _upload(api: GrafanaApi, base: str, model: dict[str, Any], folder_uid: str | None) -> str:
    payload: dict[str, Any] = {"dashboard": model, "overwrite": True, "message": "provisioned by mpmae"}
    if folder_uid:
        payload["folderUid"] = folder_uid
    result = api.dashboard.update_dashboard(payload)
    if not isinstance(result, dict) or not isinstance(result.get("url", ""), str):
        raise ProvisionError(_unexpected("POST api/dashboards/db", result, "an object with a 'url' string"))
    return urljoin(base, result.get("url") or f"d/{model['uid']}")


def _unexpected(endpoint: str, body: Any, expected: str) -> str:
    """The error for a successful response of the wrong shape; the body's type only (it may be huge)."""
    return f"{endpoint} answered with {type(body).__name__}, expected {expected}"


def cli_provision(url: str, folder: str | None = DEFAULT_FOLDER, insecure: bool = False) -> int:
    """``mpmae dashboards provision --url URL [--folder NAME] [--insecure]``: 0 on success, 1 with a message
    on stderr."""
    try:
        urls = provision(url, folder=folder, insecure=insecure)
    except ProvisionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for dashboard_url in urls:
        print(dashboard_url)
    return 0
