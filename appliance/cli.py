"""The `appliance` command line: run, check, plan, render, and the admin client.

The client commands (status, nodes, unknown, watch, reinstall, drain/disable/enable, reload)
talk to the running daemon's admin API, found through the same `--config`.

Every error is one line per problem on stderr and a non-zero exit; a traceback
is printed only when APPLIANCE_DEBUG is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import yaml

from appliance import __version__
from appliance.checks import (
    Finding,
    current_user,
    for_check,
    install_warnings,
    listener_endpoints,
    preflight,
    user_named,
)
from appliance.client import ClientError
from appliance.hostinfo import read_host, read_sockets, socket_owners
from appliance.inventory import InventoryError, load_inventory
from appliance.logs import setup_logging
from appliance.plan import ARecord, NsRecord, Plan, PtrRecord, SrvRecord, build_plan

DEFAULT_CONFIG = "config/example.yaml"
EXIT_INVALID = 2  # the inventory (or the command line) is wrong
EXIT_FAILED = 1  # a valid inventory that could not be served


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        default=DEFAULT_CONFIG,
        help=f"inventory file (default: {DEFAULT_CONFIG})",
    )
    p = argparse.ArgumentParser(
        prog="appliance",
        description="Bring up a bare-metal OpenShift/Kubernetes GPU cluster from one inventory.",
    )
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    p.add_argument("--log-format", choices=("text", "json"), default="text")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="serve every enabled service (foreground)")
    check = sub.add_parser(
        "check",
        parents=[common],
        help="validate the inventory, summarise it and preflight this host",
        description="Exit status 2: the inventory is invalid; 1: `appliance run` would "
        "refuse to start on this host (the `error:` lines). `warning:` lines are what it "
        "runs without.",
    )
    check.add_argument(
        "--user",
        metavar="NAME",
        help="check file access for the user the daemon runs as (default: this user)",
    )
    plan = sub.add_parser("plan", parents=[common], help="print the derived plan")
    plan.add_argument("--format", choices=("yaml", "json"), default="yaml")
    render = sub.add_parser(
        "render", parents=[common], help="print the equivalent classic configuration"
    )
    render.add_argument(
        "--as", dest="kind", choices=("dnsmasq", "haproxy", "hosts", "rbac"), required=True
    )
    reinstall = sub.add_parser(
        "reinstall", parents=[common], help="install NODE again at its next network boot"
    )
    reinstall.add_argument("node")
    status = sub.add_parser("status", parents=[common], help="the running appliance's services")
    status.add_argument("--json", action="store_true", help="the raw API answer")
    nodes = sub.add_parser("nodes", parents=[common], help="every node's install progress")
    nodes.add_argument("--json", action="store_true", help="the raw API answer")
    unknown = sub.add_parser(
        "unknown",
        parents=[common],
        help="machines that network-booted here but are not in the inventory",
    )
    unknown.add_argument("--json", action="store_true", help="the raw API answer")
    unknown.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    unknown.add_argument("--offset", type=int, default=0, help="skip this many, newest first")
    watch = sub.add_parser(
        "watch", parents=[common], help="follow node stages live (Ctrl-C to quit)"
    )
    watch.add_argument("--once", action="store_true", help="print the current view and exit")
    watch.add_argument("--count", type=int, metavar="N", help="exit after N events")
    watch.add_argument("--timeout", type=float, metavar="SECONDS", help="exit after SECONDS")
    watch.add_argument(
        "--plain", action="store_true", help="one line per event, even on a terminal"
    )
    for action, what in (
        ("drain", "no new connections to BACKEND (open ones finish)"),
        ("disable", "no connections to BACKEND at all (open ones are closed)"),
        ("enable", "put BACKEND back into the pool"),
    ):
        cmd = sub.add_parser(action, parents=[common], help=what)
        cmd.add_argument("frontend", help="api, machine_config, ingress_http or ingress_https")
        cmd.add_argument("backend", help="a backend (node) name")
    sub.add_parser(
        "reload", parents=[common], help="re-read the inventory in the running appliance"
    )
    return p


def _load(config: str) -> Plan:
    return build_plan(load_inventory(Path(config)))


def _summary(plan: Plan) -> list[str]:
    roles = Counter(n.role for n in plan.nodes)
    lines = [
        f"cluster {plan.domain}: {len(plan.nodes)} nodes "
        f"({', '.join(f'{roles[r]} {r}' for r in ('bootstrap', 'master', 'worker') if roles[r])})",
        "nodes:",
    ]
    width = max(len(n.name) for n in plan.nodes)
    for node, boot in zip(plan.nodes, plan.boot.nodes, strict=True):
        gpu = " gpu" if node.gpu else ""
        lines.append(
            f"  {node.name:<{width}}  {node.role:<9}  {node.mac}  {node.ip!s:<15}  "
            f"{boot.firmware:<4}  {boot.ignition_file}{gpu}"
        )
    kinds: Counter[str] = Counter()
    for zone in plan.dns.zones:
        kinds["SOA"] += 1
        for record in zone.records:
            kinds[_kind(record)] += 1
    listing = ", ".join(f"{kinds[k]} {k}" for k in ("SOA", "NS", "A", "PTR", "SRV") if kinds[k])
    lines.append(
        f"dns: {len(plan.dns.zones)} zones ({', '.join(z.origin for z in plan.dns.zones)})"
    )
    lines.append(f"  records: {listing}; *.apps.{plan.domain} -> {plan.load_balancer}")
    lines.append("pools:")
    for fe in plan.frontends:
        where = str(fe.listen) if fe.listen else "off"
        members = " ".join(f"{b.name}:{b.port}" for b in fe.backends) or "(none)"
        lines.append(f"  {fe.name:<14} {where:<22} -> {members}")
    dhcp = plan.dhcp
    pool = f"pool {dhcp.pool[0]}-{dhcp.pool[1]}" if dhcp.pool else "inventory MACs only"
    lines.append(f"dhcp: {dhcp.mode} mode, {len(dhcp.reservations)} reservations, {pool}")
    services = ", ".join(f"{k} {v}" for k, v in plan.listen.items())
    lines.append(f"listen: {services or 'nothing'}")
    return lines


def _kind(record: ARecord | PtrRecord | SrvRecord | NsRecord) -> str:
    return type(record).__name__.removesuffix("Record").upper()


def _cmd_check(args: argparse.Namespace) -> int:
    loaded = load_inventory(Path(args.config))
    plan = build_plan(loaded)
    print(f"{args.config}: OK")
    for line in _summary(plan):
        print(line)
    if args.user is None:
        user = current_user()
    else:
        try:
            user = user_named(args.user)
        except KeyError:
            print(f"appliance: --user {args.user}: no such user", file=sys.stderr)
            return EXIT_INVALID
    for w in loaded.warnings:
        print(f"warning: {w}")
    rows = read_sockets()
    ports = {ep.port for _, ep, _ in listener_endpoints(plan)}
    owners = socket_owners({r.inode for r in rows if r.port in ports})
    findings = for_check(preflight(plan, read_host(), user, rows, owners))
    findings += [Finding(p.path, p.message) for p in install_warnings(plan)]
    for finding in findings:
        print(f"{'error' if finding.error else 'warning'}: {finding}")
    # Exit 1: `run` would refuse to start on this host (the inventory itself is valid).
    return EXIT_FAILED if any(f.error for f in findings) else 0


def _cmd_plan(args: argparse.Namespace) -> int:
    data = _load(args.config).to_dict()
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def _cmd_render(args: argparse.Namespace) -> int:
    from appliance.render import render

    print(render(_load(args.config), args.kind), end="")
    return 0


def _cmd_reinstall(args: argparse.Namespace) -> int:
    from appliance import client

    plan = _load(args.config)
    if args.node not in plan.by_name:
        print(f"appliance: no node {args.node!r} in {args.config}", file=sys.stderr)
        return EXIT_INVALID
    how = client.reinstall(plan, args.node)
    print(f"{args.node}: its next network boot installs it again ({how})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from appliance import client
    from appliance.terminal import status_lines

    body = client.call(_load(args.config), "GET", "/api/v1/status")
    print(json.dumps(body, indent=2) if args.json else "\n".join(status_lines(body)))
    return 0


def _cmd_nodes(args: argparse.Namespace) -> int:
    from appliance import client
    from appliance.terminal import nodes_table

    body = client.call(_load(args.config), "GET", "/api/v1/nodes")
    print(json.dumps(body, indent=2) if args.json else "\n".join(nodes_table(body, body["time"])))
    return 0


def _cmd_unknown(args: argparse.Namespace) -> int:
    from appliance import client
    from appliance.terminal import unknown_lines

    if not 1 <= args.limit <= 1000 or args.offset < 0:
        print("appliance: --limit must be 1-1000 and --offset at least 0", file=sys.stderr)
        return EXIT_INVALID
    path = f"/api/v1/unknown-machines?limit={args.limit}&offset={args.offset}"
    body = client.call(_load(args.config), "GET", path)
    print(json.dumps(body, indent=2) if args.json else "\n".join(unknown_lines(body)))
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    from appliance.watch import Watch

    if args.count is not None and args.count < 1:
        print("appliance: --count must be at least 1", file=sys.stderr)
        return EXIT_INVALID
    if args.timeout is not None and not args.timeout > 0:
        print("appliance: --timeout must be a positive number of seconds", file=sys.stderr)
        return EXIT_INVALID
    tty = sys.stdout.isatty() and not args.plain
    watch = Watch(_load(args.config), tty=tty, count=args.count, timeout=args.timeout)
    return watch.run(once=args.once)


def _cmd_backend(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from appliance import client

    path = (
        f"/api/v1/frontends/{quote(args.frontend, safe='')}"
        f"/backends/{quote(args.backend, safe='')}/{args.command}"
    )
    body = client.call(_load(args.config), "POST", path)
    backend = body["backend"]
    print(
        f"{args.frontend}/{backend['name']}: {backend['admin']} "
        f"(health {backend['health']}, {backend['active']} open connections)"
    )
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    from appliance import client

    body = client.call(_load(args.config), "POST", "/api/v1/reload", ok=(422,))
    if not body["ok"]:
        for error in body["errors"]:
            print(f"appliance: reload refused: {error}", file=sys.stderr)
        return EXIT_FAILED
    changed = ", ".join(body["changed"]) or "nothing"
    print(f"reloaded: the new plan is in force (took it: {changed})")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from appliance.supervisor import run

    setup_logging(args.log_level, args.log_format)
    runner: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    try:
        import uvloop  # optional speed-up: the `speed` extra

        runner = uvloop.run
    except ImportError:
        pass
    return runner(run(Path(args.config)))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "run": _cmd_run,
        "check": _cmd_check,
        "plan": _cmd_plan,
        "render": _cmd_render,
        "reinstall": _cmd_reinstall,
        "status": _cmd_status,
        "nodes": _cmd_nodes,
        "unknown": _cmd_unknown,
        "watch": _cmd_watch,
        "drain": _cmd_backend,
        "disable": _cmd_backend,
        "enable": _cmd_backend,
        "reload": _cmd_reload,
    }
    try:
        return commands[args.command](args)
    except InventoryError as exc:
        for line in exc.lines():
            print(line, file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
    except ClientError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        return 0
    except Exception as exc:
        if os.environ.get("APPLIANCE_DEBUG"):
            raise
        print(
            f"appliance: internal error: {type(exc).__name__}: {exc} "
            "(set APPLIANCE_DEBUG=1 for a traceback)",
            file=sys.stderr,
        )
        return 70


if __name__ == "__main__":
    sys.exit(main())
