"""What the CLI client prints (pure: JSON views from the admin API in, lines out).

`appliance status`, `appliance nodes` and `appliance watch` format here, so the
layout is tested without a daemon or a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from appliance.logs import escape
from appliance.progress import progress_bar
from appliance.unknown import suggestion

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
GREEN, BLUE, DIM, BOLD, RESET = "\x1b[32m", "\x1b[34m", "\x1b[2m", "\x1b[1m", "\x1b[0m"
RED = "\x1b[31m"


def duration(seconds: float | None) -> str:
    """12s, 3m05s, 2h04m, 3d05h: short enough for a table column."""
    if seconds is None:
        return "-"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def clock(t: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t is not None else "--:--:--"


def stamp(t: float | None) -> str:
    """A date and time: unknown machines may have been seen days ago."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t is not None else "-"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [fmt(headers), *(fmt(r) for r in rows)]


def status_lines(status: Mapping[str, Any]) -> list[str]:
    plan = status.get("plan") or {}
    reloads = status.get("reloads") or {}
    lines = [
        f"appliance {status.get('version', '?')} serving {status.get('cluster')}: "
        f"{plan.get('nodes', status.get('nodes', 0))} nodes, up {duration(status.get('uptime'))}",
        f"reloads: {reloads.get('ok', 0)} ok, {reloads.get('failed', 0)} refused"
        + (f" (last: {reloads['last_error']})" if reloads.get("last_error") else ""),
    ]
    rows = []
    for name, svc in (status.get("services") or {}).items():
        listen = ", ".join(svc.get("listen") or []) or "-"
        rows.append([name, svc.get("state", "?"), listen, _service_note(name, svc)])
    lines.extend(_table(["SERVICE", "STATE", "LISTEN", "ACTIVITY"], rows))
    events = status.get("events") or {}
    lines.append(
        f"events: {events.get('published', 0)} published, {events.get('dropped', 0)} dropped"
    )
    store = status.get("store")
    if store:
        line = f"store: {store.get('written', 0)} writes, {store.get('queued', 0)} waiting"
        if store.get("locked_for"):
            line += f", locked by another process for {duration(store['locked_for'])}"
        for key in ("lost", "failed"):
            if store.get(key):
                line += f", {store[key]} {key}"
        lines.append(line)
    if status.get("ha"):
        lines.extend(ha_lines(status["ha"], status.get("time")))
    return lines


def ha_lines(ha: Mapping[str, Any], now: float | None = None) -> list[str]:
    """An HA pair's member: who leads and since when, the members, etcd's health."""
    me = ha.get("member", "?")
    leader = ha.get("leader")
    if ha.get("leading"):
        since = ha.get("since")
        held = f" for {duration(now - since)}" if now and since else ""
        role = f"leader{held}, holding {', '.join(ha.get('floating') or []) or '-'}"
    else:
        role = f"follower (leader: {leader or 'none'})"
    lines = [
        f"ha: {me} is {role}; members {', '.join(ha.get('members') or [])}; "
        f"{ha.get('leader_changes', 0)} leader changes, lease {ha.get('lease_ttl', '?')} s"
    ]
    if ha.get("floating_error"):
        lines.append(f"ha: floating addresses: {ha['floating_error']}")
    etcd = ha.get("etcd") or {}
    endpoints = etcd.get("endpoints") or {}
    healthy = [ep for ep, e in endpoints.items() if e.get("healthy")]
    line = f"etcd: {len(healthy)} of {len(endpoints)} members healthy"
    if not etcd.get("ok", True):
        line += f"; last election call failed: {etcd.get('error')}"
    lines.append(line)
    for ep, e in endpoints.items():
        if not e.get("healthy"):
            lines.append(f"etcd: {ep}: {e.get('error')}")
    return lines


def _service_note(name: str, svc: Mapping[str, Any]) -> str:
    """The few counters an operator looks at first, per service."""
    if svc.get("state") != "running":
        return ""
    c = svc.get("counters") or {}
    if name == "dns":
        return f"{c.get('queries', 0)} queries, {c.get('forwarded', 0)} forwarded"
    if name == "dhcp":
        return f"{c.get('received', 0)} received, {svc.get('leases_bound', 0)} leases bound"
    refused = sum((svc.get("boot_errors") or {}).values())
    boot_errors = f", {refused} boot files refused to nodes" if refused else ""
    if name == "tftp":
        done, sent = c.get("completed", 0), c.get("bytes", 0)
        return f"{done} transfers, {sent} bytes, {svc.get('transfers', 0)} open{boot_errors}"
    if name == "http":
        return f"{svc.get('requests', 0)} requests, {svc.get('bytes', 0)} bytes{boot_errors}"
    if name == "proxy":
        frontends = svc.get("frontends") or {}
        backends = [b for fe in frontends.values() for b in fe.get("backends", [])]
        up = sum(1 for b in backends if b.get("health") == "up")
        active = sum(int(fe.get("active", 0)) for fe in frontends.values())
        return f"{len(frontends)} frontends, {up}/{len(backends)} backends up, {active} open"
    if name == "admin":
        return f"{svc.get('requests', 0)} requests"
    return ""


def _waiting(node: Mapping[str, Any], now: float) -> str:
    error = node.get("boot_error")
    if error:
        return f"{error.get('stage')}: BOOT ERROR"
    if node.get("complete"):
        return "complete"
    since = node.get("since")
    elapsed = f" for {duration(now - since)}" if since is not None else ""
    return f"{node.get('waiting_for')}{elapsed}"


def boot_error_lines(view: Mapping[str, Any]) -> list[str]:
    """One line per node whose latest boot file request was refused (under the table)."""
    return [
        f"{node['name']}: boot error at {clock(error.get('last'))}: {error.get('detail', '')}"
        for node in view.get("nodes", [])
        if (error := node.get("boot_error"))
    ]


def nodes_table(view: Mapping[str, Any], now: float) -> list[str]:
    """The table of `appliance nodes`, then a line per boot error."""
    errors = boot_error_lines(view)
    return _nodes_rows(view, now) + (["", *errors] if errors else [])


def _nodes_rows(view: Mapping[str, Any], now: float) -> list[str]:
    rows = []
    for node in view.get("nodes", []):
        fraction = float(node.get("progress", 0.0))
        rows.append(
            [
                node["name"],
                node["role"] + (" gpu" if node.get("gpu") else ""),
                node["ip"],
                f"{progress_bar(fraction, 10)} {round(fraction * 100):>3}%",
                node.get("current") or "-",
                _waiting(node, now),
                node.get("next_boot", "-"),
            ]
        )
    return _table(
        ["NODE", "ROLE", "IP", "PROGRESS", "LAST STAGE", "WAITING FOR", "NEXT BOOT"], rows
    )


def watch_screen(
    view: Mapping[str, Any],
    recent: Sequence[Mapping[str, Any]],
    now: float,
    *,
    title: str,
    color: bool = True,
) -> list[str]:
    """The whole screen of `appliance watch` on a terminal: a table and the latest events."""
    bold, dim, reset = (BOLD, DIM, RESET) if color else ("", "", "")
    lines = [f"{bold}{title}{reset}  {dim}{clock(now)}  (Ctrl-C to quit){reset}", ""]
    table = _nodes_rows(view, now)
    lines.append(f"{bold}{table[0]}{reset}")
    for line, node in zip(table[1:], view.get("nodes", []), strict=True):
        shade = (
            RED
            if node.get("boot_error")
            else GREEN
            if node.get("complete")
            else BLUE
            if node.get("current")
            else ""
        )
        lines.append(f"{shade}{line}{reset}" if color and shade else line)
    errors = boot_error_lines(view)
    if errors:
        red = RED if color else ""
        lines += ["", *(f"{red}{line}{reset}" for line in errors)]
    lines += ["", f"{bold}latest events{reset}"]
    if not recent:
        lines.append(f"{dim}(none yet){reset}")
    for ev in recent:
        lines.append(event_line(ev))
    return lines


def event_line(ev: Mapping[str, Any]) -> str:
    """One event as a plain line (also the whole output of `watch` when not on a terminal)."""
    node, stage, detail = ev.get("node", ""), ev.get("stage", ""), ev.get("detail", "")
    return f"{clock(ev.get('time'))}  {node:<14} {stage:<19} {detail}".rstrip()


def unknown_lines(body: Mapping[str, Any]) -> list[str]:
    """`appliance unknown`: machines that network-booted here but are not in the inventory,
    with the inventory MAC they are likely a typo of."""
    machines = body.get("machines") or []
    total, evicted = body.get("total", len(machines)), body.get("evicted", 0)
    head = f"{total} unknown machines"
    if len(machines) < total:
        head += f" ({len(machines)} shown, from {body.get('offset', 0)})"
    if evicted:
        head += f"; {evicted} forgotten to keep the list bounded"
    if not machines:
        return [head]
    rows = [
        [
            str(m.get("mac", "")),
            str(m.get("arch_name") or m.get("arch") or "-"),
            stamp(m.get("first_seen")),
            stamp(m.get("last_seen")),
            str(m.get("seen", "")),
            escape(str(m.get("vendor_class") or "-"))[:32],  # the client's words
            suggestion(m),
        ]
        for m in machines
    ]
    return [
        head,
        *_table(["MAC", "ARCH", "FIRST SEEN", "LAST SEEN", "SEEN", "VENDOR CLASS", "NOTE"], rows),
    ]
