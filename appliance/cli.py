"""The `appliance` command line: run, check, plan, render.

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
from appliance.checks import file_warnings
from appliance.client import ClientError
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
    sub.add_parser("check", parents=[common], help="validate the inventory and summarise it")
    plan = sub.add_parser("plan", parents=[common], help="print the derived plan")
    plan.add_argument("--format", choices=("yaml", "json"), default="yaml")
    render = sub.add_parser(
        "render", parents=[common], help="print the equivalent classic configuration"
    )
    render.add_argument("--as", dest="kind", choices=("dnsmasq", "haproxy", "hosts"), required=True)
    reinstall = sub.add_parser(
        "reinstall", parents=[common], help="install NODE again at its next network boot"
    )
    reinstall.add_argument("node")
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
    plan = _load(args.config)
    print(f"{args.config}: OK")
    for line in _summary(plan):
        print(line)
    warnings = file_warnings(plan)
    for w in warnings:
        print(f"warning: {w}")
    return 0


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
