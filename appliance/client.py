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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from appliance import sse
from appliance.admintoken import TOKEN_FILE
from appliance.inventory import Endpoint, parse_endpoint
from appliance.plan import Plan
from appliance.store import Store

TIMEOUT = 30.0  # seconds for one request
DEFAULT_ADMIN = "127.0.0.1:9000"  # the inventory's default listen.admin
DEFAULT_STATE_DIR = "/var/lib/appliance"  # the inventory's default state_dir


class ClientError(Exception):
    pass


class NotRunning(ClientError):
    """Nothing answers on listen.admin."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where the admin API is and how to authenticate: all a client command needs.

    Built leniently (`target_for`), so a half-edited inventory does not lock the
    operator out of the daemon that is still running on the last good one.
    """

    base: str | None  # http://host:port; None: listen.admin is off
    token_file: Path | None
    config: Path | None = None  # the inventory named on the command line, if readable
    domain: str | None = None  # its cluster domain, when the file says
    where: str = "listen.admin"  # where `base` came from, for error messages


def _url(ep: Endpoint) -> str:
    host = "127.0.0.1" if ep.is_wildcard else ep.host
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{ep.port}"


def _admin_url(plan: Plan) -> str | None:
    ep = plan.listen.get("admin")
    return None if ep is None else _url(ep)


def plan_target(plan: Plan) -> Target:
    return Target(
        _admin_url(plan), plan.state_dir / TOKEN_FILE, plan.source, plan.domain, "listen.admin"
    )


def _top_level_blocks(text: str) -> dict[str, Any]:
    """Each top-level key parsed on its own, so a YAML error in one section spares the rest."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        starts = line[:1] not in ("", " ", "\t", "#", "-")
        if starts or not blocks:
            blocks.append([])
        blocks[-1].append(line)
    found: dict[str, Any] = {}
    for block in blocks:
        try:
            part = yaml.safe_load("\n".join(block))
        except yaml.YAMLError:
            continue
        if isinstance(part, dict):
            found.update({k: v for k, v in part.items() if isinstance(k, str)})
    return found


def lenient_fields(path: Path) -> tuple[dict[str, Any], str | None]:
    """The raw inventory mapping as far as it parses, and why it does not fully (or None)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return {}, f"cannot read {path}: {exc.strerror}"
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError:
        return _top_level_blocks(text), f"{path} is not valid YAML"
    return (raw if isinstance(raw, dict) else {}), None


def target_for(
    config: Path | None, admin: str | None = None, token_file: str | None = None
) -> Target:
    """The admin endpoint and token file: flags (or their environment variables) first,
    then `listen.admin` and `state_dir` read leniently from the inventory, then defaults."""
    raw: dict[str, Any] = {}
    problem: str | None = None
    if config is not None:
        raw, problem = lenient_fields(config)
    base_dir = config.resolve().parent if config is not None else Path.cwd()
    cluster = raw.get("cluster")
    domain = None
    if isinstance(cluster, dict):
        name, base_domain = cluster.get("name"), cluster.get("base_domain")
        if isinstance(name, str) and isinstance(base_domain, str):
            domain = f"{name}.{base_domain}"
    if admin is not None:
        base, where = _admin_flag(admin), "--admin"
    else:
        listen = raw.get("listen")
        value: Any
        if isinstance(listen, dict):
            value = listen.get("admin", DEFAULT_ADMIN)  # an explicit null: switched off
        elif "listen" not in raw and problem is None:
            value = DEFAULT_ADMIN
        else:
            why = problem or "listen is not a mapping"
            raise ClientError(
                f"cannot find listen.admin ({why}): "
                "name the endpoint with --admin URL (or APPLIANCE_ADMIN)"
            )
        if value is None:
            base = None
        else:
            try:
                base = _url(parse_endpoint(value))
            except ValueError as exc:
                raise ClientError(
                    f"listen.admin in {config}: {exc}; name the endpoint with --admin URL"
                ) from None
        where = "listen.admin"
    if token_file is not None:
        token = Path(token_file)
    else:
        state = raw.get("state_dir", DEFAULT_STATE_DIR)
        if not isinstance(state, str) or not state:
            state = DEFAULT_STATE_DIR
        p = Path(state).expanduser()
        token = (p if p.is_absolute() else base_dir / p) / TOKEN_FILE
    readable = (
        config if config is not None and not (problem or "").startswith("cannot read") else None
    )
    return Target(base, token, readable, domain, where)


def _admin_flag(value: str) -> str:
    """`--admin` takes a URL (`http://host:port`) or a bare `host:port`."""
    text = value.strip().rstrip("/")
    if "://" in text:
        parts = urllib.parse.urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ClientError(f"--admin {value!r}: expected http://HOST:PORT")
        return f"{parts.scheme}://{parts.netloc}"
    try:
        return _url(parse_endpoint(text))
    except ValueError as exc:
        raise ClientError(f"--admin {value!r}: {exc}") from None


def _token(t: Target) -> str:
    if t.token_file is None:
        raise ClientError("no admin token file: name it with --token-file")
    try:
        return t.token_file.read_text().strip()
    except OSError as exc:
        raise ClientError(f"cannot read the admin token {t.token_file}: {exc.strerror}") from None


def _read_token(t: Target) -> str | None:
    """The token for reads: needed only off loopback, so a missing one is not an error here."""
    if t.token_file is None:
        return None
    try:
        return t.token_file.read_text().strip() or None
    except OSError:
        return None


def _request(t: Target, method: str, path: str, body: Any = None) -> urllib.request.Request:
    if t.base is None:
        raise NotRunning("listen.admin is off in the inventory: no admin endpoint to ask")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(t.base + path, data=data, method=method)
    token = _read_token(t)
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


def _unreachable(t: Target, reason: object) -> ClientError:
    base = t.base
    if isinstance(reason, ConnectionRefusedError):
        return NotRunning(f"no appliance is running: nothing answers on {base} ({t.where})")
    return ClientError(f"cannot reach the admin endpoint {base}: {reason}")


def call(t: Target, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = ()) -> Any:
    """One admin API call and its JSON body; NotRunning when no daemon listens.

    Statuses in `ok` (besides 2xx) return their body too (e.g. a refused reload's errors).
    """
    req = _request(t, method, path, body)
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        if err.code in ok:
            return json.loads(err.read() or b"null")
        if err.code == 401 and not req.has_header("Authorization"):
            _token(t)  # raises the one line that says why there is no token
        raise _http_error(method, path, err) from None
    except urllib.error.URLError as err:
        raise _unreachable(t, err.reason) from None
    except (ConnectionError, TimeoutError) as exc:
        raise _unreachable(t, exc) from None


def events(
    t: Target, *, after: int | None = None, keepalive: float = 15.0, node: str | None = None
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
    req = _request(t, "GET", path)
    try:
        resp = urllib.request.urlopen(req, timeout=keepalive * 3 + 5)
    except urllib.error.HTTPError as err:
        raise _http_error("GET", path, err) from None
    except urllib.error.URLError as err:
        raise _unreachable(t, err.reason) from None
    except (ConnectionError, TimeoutError) as exc:
        raise _unreachable(t, exc) from None
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
        call(
            plan_target(plan),
            "POST",
            f"/api/v1/nodes/{urllib.parse.quote(node, safe='')}/reinstall",
        )
        return "told the running appliance"
    except NotRunning:
        with Store.open(plan.state_dir) as store:
            store.request_reinstall(node, time.time())
        return f"no appliance running: recorded in {plan.state_dir}"


def dict_diff(old: Any, new: Any, path: str = "", limit: int = 200) -> list[str]:
    """What differs between two JSON plans, one line per leaf (`~ path: old -> new`, `+`, `-`).

    Lists of mappings with a `name` are matched by name, so one node added reads as one line.
    """
    out: list[str] = []
    _walk(old, new, path, out)
    if len(out) > limit:
        return [*out[:limit], f"... and {len(out) - limit} more"]
    return out


def _keyed(value: Any) -> dict[str, Any] | None:
    if isinstance(value, list) and all(isinstance(v, dict) and "name" in v for v in value):
        names = [str(v["name"]) for v in value]
        if len(set(names)) == len(names):
            return dict(zip(names, value, strict=True))
    return None


def _walk(old: Any, new: Any, path: str, out: list[str]) -> None:
    if old == new:
        return
    ko, kn = _keyed(old), _keyed(new)
    if ko is not None and kn is not None and (ko or kn):
        old, new = ko, kn
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in new:
                out.append(f"- {sub}")
            elif key not in old:
                out.append(f"+ {sub}: {json.dumps(new[key])[:80]}")
            else:
                _walk(old[key], new[key], sub, out)
        return
    out.append(f"~ {path}: {json.dumps(old)[:80]} -> {json.dumps(new)[:80]}")
