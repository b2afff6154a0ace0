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

DEFAULT_CONFIG = "/etc/appliance/inventory.yaml"  # unless APPLIANCE_CONFIG names another
EXIT_INVALID = 2  # the inventory (or the command line) is wrong
EXIT_FAILED = 1  # a valid inventory that could not be served


_CLIENT = (
    "Needs only the admin endpoint and its token: listen.admin and state_dir read leniently "
    "from --config (a half-edited file is fine), or --admin and --token-file."
)


def _global_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """Options valid before and after the subcommand. The subcommand's copies default to
    SUPPRESS so that one given before the subcommand is not reset by the subparser."""

    def default(value: str | None) -> str | None:
        return value if top else argparse.SUPPRESS

    p.add_argument(
        "--config",
        "-c",
        default=default(os.environ.get("APPLIANCE_CONFIG") or DEFAULT_CONFIG),
        help=f"inventory file (default: $APPLIANCE_CONFIG, else {DEFAULT_CONFIG})",
    )
    p.add_argument(
        "--log-format", choices=("text", "json"), default=default("text"), help="log lines"
    )
    p.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=default("info"),
        help="least severe log level shown",
    )
    p.add_argument(
        "--admin",
        metavar="URL",
        default=default(os.environ.get("APPLIANCE_ADMIN") or None),
        help="client commands: the admin endpoint, http://HOST:PORT "
        "(default: $APPLIANCE_ADMIN, else listen.admin of the inventory)",
    )
    p.add_argument(
        "--token-file",
        metavar="FILE",
        default=default(os.environ.get("APPLIANCE_TOKEN_FILE") or None),
        help="client commands: the admin token (default: $APPLIANCE_TOKEN_FILE, "
        "else <state_dir>/admin.token of the inventory)",
    )


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    p = argparse.ArgumentParser(
        prog="appliance",
        description="Bring up a bare-metal OpenShift/Kubernetes GPU cluster from one inventory.",
        epilog="Client commands (status, nodes, unknown, watch, drain, disable, enable, "
        "reinstall, reload, diff) need only the admin endpoint and its token: they work "
        "while the inventory file is being edited. Example: "
        "appliance status --admin http://127.0.0.1:9000",
    )
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    _global_options(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser(
        "run",
        parents=[common],
        help="serve every enabled service (foreground)",
        description="Validate the inventory, preflight this host and serve every enabled "
        "service in the foreground until SIGTERM/SIGINT. Exit 2: invalid inventory; 1: "
        "could not start.",
        epilog="example: appliance run --config /etc/appliance/inventory.yaml --log-format json",
    )
    run.add_argument(
        "--member",
        metavar="NAME",
        help="with an `ha` block: which of ha.members this host is (default: "
        "$APPLIANCE_MEMBER, else the member whose address is on a local interface)",
    )
    check = sub.add_parser(
        "check",
        parents=[common],
        help="validate the inventory, summarise it and preflight this host",
        description="Exit status 2: the inventory is invalid; 1: `appliance run` would "
        "refuse to start on this host (the `error:` lines). `warning:` lines are what it "
        "runs without.",
        epilog="example: appliance check --config inventory.yaml --user appliance",
    )
    check.add_argument(
        "--user",
        metavar="NAME",
        help="check file access for the user the daemon runs as (default: this user)",
    )
    plan = sub.add_parser(
        "plan",
        parents=[common],
        help="print the derived plan",
        description="Print the plan derived from the inventory: addresses, DNS records, "
        "boot files, load-balancer frontends; what every service reads.",
        epilog="example: appliance plan --format json | jq .dns",
    )
    plan.add_argument(
        "--format", choices=("yaml", "json"), default="yaml", help="output format (default: yaml)"
    )
    render = sub.add_parser(
        "render",
        parents=[common],
        help="print the equivalent classic configuration",
        description="Print what the inventory means in a classic tool's configuration, "
        "to compare with or fall back to.",
        epilog="example: appliance render --as haproxy > /tmp/haproxy.cfg",
    )
    render.add_argument(
        "--as",
        dest="kind",
        choices=("dnsmasq", "haproxy", "hosts", "rbac"),
        required=True,
        help="dnsmasq.conf, haproxy.cfg, /etc/hosts lines, or the Kubernetes RBAC the "
        "cluster loop needs",
    )
    reinstall = sub.add_parser(
        "reinstall",
        parents=[common],
        help="install NODE again at its next network boot",
        description="Tell the running appliance to install NODE again at its next network "
        "boot; with no daemon running (and a valid --config), record it for the next start.",
        epilog="example: appliance reinstall worker-3",
    )
    reinstall.add_argument("node", help="a node name of the inventory")
    status = sub.add_parser(
        "status",
        parents=[common],
        help="the running appliance's services",
        description=f"The running appliance's services, listeners and counters. {_CLIENT}",
        epilog="example: appliance status --admin http://127.0.0.1:9000",
    )
    status.add_argument("--json", action="store_true", help="the raw API answer")
    nodes = sub.add_parser(
        "nodes",
        parents=[common],
        help="every node's install progress",
        description=f"Every node's install progress and last stage. {_CLIENT}",
        epilog="example: appliance nodes --json",
    )
    nodes.add_argument("--json", action="store_true", help="the raw API answer")
    unknown = sub.add_parser(
        "unknown",
        parents=[common],
        help="machines that network-booted here but are not in the inventory",
        description=f"Machines that network-booted here but are not in the inventory. {_CLIENT}",
        epilog="example: appliance unknown --limit 20",
    )
    unknown.add_argument("--json", action="store_true", help="the raw API answer")
    unknown.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    unknown.add_argument("--offset", type=int, default=0, help="skip this many, newest first")
    watch = sub.add_parser(
        "watch",
        parents=[common],
        help="follow node stages live (Ctrl-C to quit)",
        description=f"Follow node stages live: a redrawn table on a terminal, one line per "
        f"event otherwise. {_CLIENT}",
        epilog="example: appliance watch --plain --timeout 600",
    )
    watch.add_argument("--once", action="store_true", help="print the current view and exit")
    watch.add_argument("--count", type=int, metavar="N", help="exit after N events")
    watch.add_argument("--timeout", type=float, metavar="SECONDS", help="exit after SECONDS")
    watch.add_argument(
        "--plain", action="store_true", help="one line per event, even on a terminal"
    )
    for action, what in (
        ("drain", "no new connections to NODE (open ones finish)"),
        ("disable", "no connections to NODE at all (open ones are closed)"),
        ("enable", "put NODE back into the pool"),
    ):
        cmd = sub.add_parser(
            action,
            parents=[common],
            help=f"{what}, in every frontend or one",
            usage=f"appliance {action} [options] [FRONTEND] NODE",
            description=f"{what[0].upper()}{what[1:]}: in every load-balancer frontend NODE "
            "is a backend of, or only in FRONTEND.",
            epilog=f"examples: appliance {action} worker-0; "
            f"appliance {action} ingress-http worker-0",
        )
        cmd.add_argument(
            "names",
            nargs="+",
            metavar="NODE",
            help="a backend (node) name; or FRONTEND NODE: only in that frontend (api, "
            "machine_config, ingress_http, ingress_https; '-' for '_' is fine)",
        )
    sub.add_parser(
        "reload",
        parents=[common],
        help="re-read the inventory in the running appliance",
        description="Ask the running appliance to re-read its inventory and print what "
        "changed. Exit 2 when it refuses the new file (one line per problem).",
        epilog="example: appliance reload",
    )
    sub.add_parser(
        "diff",
        parents=[common],
        help="what a reload would change (the running plan vs --config)",
        description="Compare the running appliance's plan with the plan of the --config "
        "file; change nothing. Exit 0: no differences, 1: differences, 2: the file is "
        "invalid.",
        epilog="example: appliance diff --config /etc/appliance/inventory.yaml.new",
    )
    backup = sub.add_parser(
        "backup",
        parents=[common],
        help="copy the state store and the inventory into one archive (daemon may run)",
        description="Write a tar.gz with a consistent copy of the state store (leases, "
        "install marks, CSR decisions, events, unknown machines, cluster state), the "
        "inventory file and a manifest with sha256 sums. Safe while the daemon runs. "
        "Ignition files, boot images, the admin token and the kubeconfig are NOT included.",
        epilog="example: appliance backup --config /etc/appliance/inventory.yaml "
        "/root/appliance-$(date +%F).tar.gz",
    )
    backup.add_argument("out", metavar="OUT", help="the archive to write (replaced atomically)")
    restore = sub.add_parser(
        "restore",
        parents=[common],
        help="put a backup's state store back (the daemon must be stopped)",
        description="Verify the archive (sha256 of every member, database integrity), "
        "keep the current store as appliance.db.before-restore and put the backup's store "
        "in the state_dir of --config. Refused while an appliance runs on that state_dir "
        "or when the backup is of another cluster.",
        epilog="example: systemctl stop appliance; appliance restore --config "
        "/etc/appliance/inventory.yaml /root/appliance-2026-12-01.tar.gz",
    )
    restore.add_argument("archive", metavar="IN", help="an archive `appliance backup` wrote")
    restore.add_argument(
        "--force", action="store_true", help="restore a backup of another cluster anyway"
    )
    restore.add_argument(
        "--inventory",
        action="store_true",
        help="also write the backup's inventory over --config (the old file is kept as "
        "<config>.before-restore); default: only the state store",
    )
    imp = sub.add_parser(
        "import",
        help="write an inventory (YAML on stdout) from a dnsmasq, hosts or helpernode setup",
        description="Read an existing setup and print an inventory: dnsmasq dhcp-host, "
        "host-record, addn-hosts files, address=/apps.../, etcd srv-host, dhcp-range, "
        "domain, and the boot section from <tftp-root>/pxelinux.cfg/default when present; or "
        "an /etc/hosts style file; or the helper-node playbooks' vars.yaml. "
        "Roles come from names (bootstrap, master-N, worker-N). Whatever cannot be mapped "
        "is listed as comments at the end, with file:line. Without a pxelinux menu the boot "
        "section is missing: add it, then run `appliance check`.",
        epilog="example: appliance import --from dnsmasq /etc/dnsmasq.conf > inventory.yaml",
    )
    imp.add_argument(
        "--from",
        dest="source",
        choices=("dnsmasq", "hosts", "helpernode"),
        required=True,
        help="the format of FILE: dnsmasq.conf, /etc/hosts style, or helpernode vars.yaml",
    )
    imp.add_argument("files", metavar="FILE", nargs="+", help="the file(s) to read")
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print a completion script generated from this command line: "
        "subcommands, options, their choices and file names.",
        epilog="examples: appliance completion bash > /etc/bash_completion.d/appliance; "
        "appliance completion zsh > ~/.zfunc/_appliance",
    )
    completion.add_argument("shell", choices=("bash", "zsh"), help="the shell to complete in")
    return p


def _cmd_completion(args: argparse.Namespace) -> int:
    from appliance import completion

    print(getattr(completion, args.shell)(_parser()), end="")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from appliance import importer

    got = importer.Imported()
    readers = {
        "dnsmasq": importer.import_dnsmasq,
        "hosts": importer.import_hosts,
        "helpernode": importer.import_helpernode,
    }
    try:
        for name in args.files:
            readers[args.source](got, Path(name).read_text(), name)
            # addn-hosts files named in a dnsmasq config, relative to the working dir
            # as dnsmasq reads them.
            while got.addn_hosts:
                extra = got.addn_hosts.pop(0)
                importer.import_hosts(got, Path(extra).read_text(), extra)
        # The article's BIOS boot menu, when the tftp-root the config names holds one.
        menu = Path(got.tftp_root or "/nonexistent") / "pxelinux.cfg" / "default"
        if got.tftp_root and menu.is_file():
            importer.import_pxelinux(got, menu.read_text(), str(menu))
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError) as exc:
        print(f"appliance import: {exc}", file=sys.stderr)
        return EXIT_INVALID
    sys.stdout.write(importer.to_yaml(*importer.inventory(got)))
    return 0


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
    if plan.ha is not None:
        ha = plan.ha
        lines.append(
            f"ha: members {', '.join(f'{m.name} {m.address}' for m in ha.members)}; floating "
            f"{', '.join(ha.floating)} on {ha.interface}; etcd {', '.join(ha.endpoints)} "
            f"under {ha.prefix}; lease_ttl {ha.lease_ttl} s"
        )
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


def _target(args: argparse.Namespace) -> Any:
    from appliance import client

    return client.target_for(Path(args.config), args.admin, args.token_file)


def _answered(target: Any, status: dict[str, Any] | None = None) -> dict[str, Any]:
    """The daemon's status; one warning line when it serves another inventory than named."""
    from appliance import client

    body: dict[str, Any] = status or client.call(target, "GET", "/api/v1/status")
    plan = body.get("plan") or {}
    theirs, source = plan.get("domain"), plan.get("source")
    why = []
    if target.domain and theirs and theirs != target.domain:
        why.append(f"cluster {theirs}, not {target.domain}")
    if source and target.config is not None and not _same_file(Path(source), target.config):
        why.append(f"file {source}, not {target.config}")
    if why:
        print(
            f"appliance: warning: the daemon at {target.base} serves another inventory "
            f"({'; '.join(why)})",
            file=sys.stderr,
        )
    return body


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)  # a bind mount or a symlink names the same file
    except OSError:
        return a.resolve() == b.resolve()


def _cmd_reinstall(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from appliance import client

    try:
        plan = _load(args.config)
    except InventoryError:
        plan = None  # a half-edited file: the running daemon decides (and knows the nodes)
    if plan is not None and args.admin is None and args.token_file is None:
        if args.node not in plan.by_name:
            print(f"appliance: no node {args.node!r} in {args.config}", file=sys.stderr)
            return EXIT_INVALID
        how = client.reinstall(plan, args.node)
    else:
        target = _target(args)
        _answered(target)
        client.call(target, "POST", f"/api/v1/nodes/{quote(args.node, safe='')}/reinstall")
        how = "told the running appliance"
    print(f"{args.node}: its next network boot installs it again ({how})")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from appliance import client
    from appliance.terminal import status_lines

    target = _target(args)
    body = _answered(target, client.call(target, "GET", "/api/v1/status"))
    print(json.dumps(body, indent=2) if args.json else "\n".join(status_lines(body)))
    return 0


def _cmd_nodes(args: argparse.Namespace) -> int:
    from appliance import client
    from appliance.terminal import nodes_table

    target = _target(args)
    _answered(target)
    body = client.call(target, "GET", "/api/v1/nodes")
    print(json.dumps(body, indent=2) if args.json else "\n".join(nodes_table(body, body["time"])))
    return 0


def _cmd_unknown(args: argparse.Namespace) -> int:
    from appliance import client
    from appliance.terminal import unknown_lines

    if not 1 <= args.limit <= 1000 or args.offset < 0:
        print("appliance: --limit must be 1-1000 and --offset at least 0", file=sys.stderr)
        return EXIT_INVALID
    target = _target(args)
    _answered(target)
    path = f"/api/v1/unknown-machines?limit={args.limit}&offset={args.offset}"
    body = client.call(target, "GET", path)
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
    target = _target(args)
    domain = str((_answered(target).get("plan") or {}).get("domain") or "")
    watch = Watch(target, tty=tty, count=args.count, timeout=args.timeout, domain=domain)
    return watch.run(once=args.once)


def _cmd_backend(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from appliance import client

    if len(args.names) > 2:
        print(f"appliance {args.command}: give NODE or FRONTEND NODE", file=sys.stderr)
        return EXIT_INVALID
    target = _target(args)
    _answered(target)
    frontends: dict[str, Any] = client.call(target, "GET", "/api/v1/backends")["frontends"]
    node = args.names[-1]
    if len(args.names) == 2:
        wanted = args.names[0].replace("-", "_")
        if wanted not in frontends:
            valid = ", ".join(sorted(frontends)) or "none (the load balancer is off)"
            print(
                f"appliance: no frontend {args.names[0]!r}; the frontends: {valid}",
                file=sys.stderr,
            )
            return EXIT_INVALID
        names = [wanted]
    else:
        names = [
            name
            for name, fe in frontends.items()
            if any(b.get("name") == node for b in fe.get("backends", []))
        ]
        if not names:
            known = sorted({b["name"] for fe in frontends.values() for b in fe["backends"]})
            print(
                f"appliance: {node!r} is a backend of no frontend; the backends: "
                f"{', '.join(known) or 'none'}",
                file=sys.stderr,
            )
            return EXIT_INVALID
    for name in names:
        path = (
            f"/api/v1/frontends/{quote(name, safe='')}"
            f"/backends/{quote(node, safe='')}/{args.command}"
        )
        backend = client.call(target, "POST", path)["backend"]
        print(
            f"{name}/{backend['name']}: {backend['admin']} "
            f"(health {backend['health']}, {backend['active']} open connections)"
        )
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    from appliance import client

    target = _target(args)
    _answered(target)
    body = client.call(target, "POST", "/api/v1/reload", ok=(422,))
    if not body["ok"]:
        for error in body["errors"]:
            print(f"appliance: reload refused: {error}", file=sys.stderr)
        return EXIT_INVALID
    changed = ", ".join(body["changed"]) or "nothing"
    print(f"reloaded: the new plan is in force (took it: {changed})")
    diff = body.get("diff") or {}
    print(f"changes: {diff.get('summary', 'unknown (an older daemon)')}")
    for line in diff.get("lines", []):
        print(f"  {line}")
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from appliance import client

    new = _load(args.config).to_dict()  # the file must be valid: a reload would need it
    target = _target(args)  # no warning: comparing another file is the point
    running = client.call(target, "GET", "/api/v1/plan")
    new = json.loads(json.dumps(new, default=str))
    for plan in (running, new):
        plan.pop("source", None)  # the file's name: not part of what a reload changes
    lines = client.dict_diff(running, new)
    for line in lines:
        print(line)
    if not lines:
        print("no changes: a reload would keep the running plan")
    return 1 if lines else 0


def _cmd_backup(args: argparse.Namespace) -> int:
    from appliance.backup import cmd_backup

    return cmd_backup(args)


def _cmd_restore(args: argparse.Namespace) -> int:
    from appliance.backup import cmd_restore

    return cmd_restore(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from appliance.supervisor import run

    setup_logging(args.log_level, args.log_format)
    runner: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    try:
        import uvloop  # optional speed-up: the `speed` extra

        runner = uvloop.run
    except ImportError:
        pass
    # The flag only: the supervisor chooses (appliance.plan.choose_member) with the
    # environment and the local addresses, from the plan it loads.
    return runner(run(Path(args.config), member=args.member))


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
        "diff": _cmd_diff,
        "backup": _cmd_backup,
        "restore": _cmd_restore,
        "import": _cmd_import,
        "completion": _cmd_completion,
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
