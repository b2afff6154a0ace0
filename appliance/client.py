"""The CLI's side of the admin API: talk to the running daemon, or act on the store.

A running daemon keeps state in memory, so changes go through its admin API;
when no daemon answers, the store is changed directly and the next start reads it.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from appliance.plan import Plan
from appliance.store import Store

TOKEN_FILE = "admin.token"  # in state_dir, mode 0600: the admin API's bearer token


class ClientError(Exception):
    pass


def _admin_url(plan: Plan) -> str | None:
    ep = plan.listen.get("admin")
    if ep is None:
        return None
    host = "127.0.0.1" if ep.is_wildcard else ep.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{ep.port}"


def _token(plan: Plan) -> str:
    try:
        return (plan.state_dir / TOKEN_FILE).read_text().strip()
    except OSError as exc:
        raise ClientError(
            f"cannot read the admin token {plan.state_dir / TOKEN_FILE}: {exc.strerror}"
        ) from None


def call(plan: Plan, method: str, path: str, body: Any = None) -> Any:
    """One admin API call; ConnectionRefusedError when no daemon listens."""
    base = _admin_url(plan)
    if base is None:
        raise ConnectionRefusedError("listen.admin is off")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    if method != "GET":
        req.add_header("Authorization", f"Bearer {_token(plan)}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read()).get("error", err.reason)
        except ValueError:
            detail = err.reason
        raise ClientError(f"{method} {path}: {err.code} {detail}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, ConnectionRefusedError):
            raise err.reason from None
        raise ClientError(f"cannot reach the admin endpoint {base}: {err.reason}") from None


def reinstall(plan: Plan, node: str) -> str:
    """Ask for a reinstall; say whether the daemon or the store took it."""
    if plan.listen.get("admin") is None:
        with Store.open(plan.state_dir) as store:
            store.request_reinstall(node, time.time())
        return (
            f"listen.admin is off: recorded in {plan.state_dir}; "
            "a running appliance sees it at its next start"
        )
    try:
        call(plan, "POST", f"/api/v1/nodes/{node}/reinstall")
        return "told the running appliance"
    except ConnectionRefusedError:
        with Store.open(plan.state_dir) as store:
            store.request_reinstall(node, time.time())
        return f"no appliance running: recorded in {plan.state_dir}"
