"""The CLI's side of the admin API: talk to the running daemon, or act on the store.

The admin address and the token come from the inventory (`listen.admin`,
`<state_dir>/admin.token`), so every command takes the same `--config` as `run`.
A running daemon keeps state in memory, so changes go through its admin API;
`reinstall` falls back to the store when no daemon answers, and the next start
reads it. Every failure is a ClientError with one line for the operator.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

from appliance import sse
from appliance.plan import Plan
from appliance.store import Store

TOKEN_FILE = "admin.token"  # in state_dir, mode 0600: the admin API's bearer token
TIMEOUT = 30.0  # seconds for one request


class ClientError(Exception):
    pass


class NotRunning(ClientError):
    """Nothing answers on listen.admin."""


def _admin_url(plan: Plan) -> str | None:
    ep = plan.listen.get("admin")
    if ep is None:
        return None
    host = "127.0.0.1" if ep.is_wildcard else ep.host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{ep.port}"


def _token(plan: Plan) -> str:
    try:
        return (plan.state_dir / TOKEN_FILE).read_text().strip()
    except OSError as exc:
        raise ClientError(
            f"cannot read the admin token {plan.state_dir / TOKEN_FILE}: {exc.strerror}"
        ) from None


def _read_token(plan: Plan) -> str | None:
    """The token for reads: needed only off loopback, so a missing one is not an error here."""
    try:
        return (plan.state_dir / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def _request(plan: Plan, method: str, path: str, body: Any = None) -> urllib.request.Request:
    base = _admin_url(plan)
    if base is None:
        raise NotRunning("listen.admin is off in the inventory: no admin endpoint to ask")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method)
    token = _read_token(plan)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    return req


def _http_error(method: str, path: str, err: urllib.error.HTTPError) -> ClientError:
    try:
        detail = json.loads(err.read()).get("error", err.reason)
    except (ValueError, AttributeError, OSError):
        detail = err.reason
    return ClientError(f"{detail} ({method} {path}: HTTP {err.code})")


def _unreachable(plan: Plan, reason: object) -> ClientError:
    base = _admin_url(plan)
    if isinstance(reason, ConnectionRefusedError):
        return NotRunning(f"no appliance is running: nothing answers on {base} (listen.admin)")
    return ClientError(f"cannot reach the admin endpoint {base}: {reason}")


def call(plan: Plan, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = ()) -> Any:
    """One admin API call and its JSON body; NotRunning when no daemon listens.

    Statuses in `ok` (besides 2xx) return their body too (e.g. a refused reload's errors).
    """
    req = _request(plan, method, path, body)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        if err.code in ok:
            return json.loads(err.read() or b"null")
        if err.code == 401 and not req.has_header("Authorization"):
            _token(plan)  # raises the one line that says why there is no token
        raise _http_error(method, path, err) from None
    except urllib.error.URLError as err:
        raise _unreachable(plan, err.reason) from None
    except (ConnectionError, TimeoutError) as exc:
        raise _unreachable(plan, exc) from None


def events(
    plan: Plan, *, after: int | None = None, keepalive: float = 15.0, node: str | None = None
) -> Iterator[sse.Message | None]:
    """Follow /api/v1/events: each message, and None for every keep-alive comment.

    The None lets a caller redraw or check its own deadline while nothing happens.
    Ends when the daemon closes the stream; NotRunning when it is not there.
    """
    query: dict[str, str] = {"keepalive": str(keepalive)}
    if after is not None:
        query["after"] = str(after)
    if node is not None:
        query["node"] = node
    path = "/api/v1/events?" + urllib.parse.urlencode(query)
    req = _request(plan, "GET", path)
    try:
        resp = urllib.request.urlopen(req, timeout=keepalive * 3 + 5)
    except urllib.error.HTTPError as err:
        raise _http_error("GET", path, err) from None
    except urllib.error.URLError as err:
        raise _unreachable(plan, err.reason) from None
    except (ConnectionError, TimeoutError) as exc:
        raise _unreachable(plan, exc) from None
    parser = sse.Parser()
    with resp:
        while True:
            try:
                raw = resp.readline()
            except TimeoutError:
                silent = keepalive * 3 + 5
                raise ClientError(f"the events stream went silent for {silent:.0f} s") from None
            except (ConnectionError, OSError) as exc:
                raise ClientError(f"the events stream broke: {exc}") from None
            if not raw:
                return  # the daemon closed the stream (stopping, or the admin moved)
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith(":"):
                yield None
                continue
            message = parser.feed(line)
            if message is not None:
                yield message


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
        call(plan, "POST", f"/api/v1/nodes/{urllib.parse.quote(node, safe='')}/reinstall")
        return "told the running appliance"
    except NotRunning:
        with Store.open(plan.state_dir) as store:
            store.request_reinstall(node, time.time())
        return f"no appliance running: recorded in {plan.state_dir}"
