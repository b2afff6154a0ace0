"""The admin endpoint's pure parts: node timelines, SSE framing, metric families, CLI text."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from appliance import sse
from appliance.admin import AdminStatus
from appliance.events import STAGES
from appliance.metrics import StoreFacts, families
from appliance.progress import NodeFacts, expected_stages, progress_bar, timeline
from appliance.status import ApplianceStatus, ServiceEntry, ServiceStatus
from appliance.terminal import duration, event_line, nodes_table, status_lines, watch_screen
from services.dhcp.status import DhcpStatus
from services.dns.status import DnsStatus
from services.http.status import HttpStatus
from services.proxy.status import BackendStatus, FrontendStatus, ProxyStatus

T0 = 1_700_000_000.0

# --- timelines ---------------------------------------------------------------------------


def _states(view: dict[str, Any]) -> dict[str, str]:
    return {e["stage"]: e["state"] for e in view["timeline"]}


def test_expected_stages_by_role_and_gpu() -> None:
    boot = expected_stages("bootstrap", False)
    assert boot[0] == "dhcp-offer" and "ignition" in boot
    assert "node-ready" not in boot and "machine-config" not in boot
    master = expected_stages("master", False)
    assert master[-1] == "node-ready" and "gpu-validated" not in master
    gpu = expected_stages("worker", True)
    assert gpu[-1] == "gpu-validated" and "bootstrap-complete" not in gpu
    # Always in install order.
    for stages in (boot, master, gpu):
        assert list(stages) == sorted(stages, key=STAGES.index)


def test_untouched_node_waits_for_its_first_stage() -> None:
    view = timeline(NodeFacts("m0", "master", False), {}, T0)
    assert view["current"] is None and view["waiting_for"] == "dhcp-offer"
    assert view["since"] is None and view["waiting_seconds"] is None
    assert view["progress"] == 0.0 and not view["complete"]
    assert _states(view)["dhcp-offer"] == "next"
    assert set(_states(view).values()) == {"next", "pending"}
    assert view["next_boot"] == "install"


def test_timeline_marks_done_skipped_next_and_pending() -> None:
    # proxyDHCP: another server leased, so dhcp-offer/ack never happened here.
    reached = {
        "bootloader": (T0, T0 + 1, "tftp undionly.kpxe"),
        "kernel": (T0 + 5, T0 + 5, "http /images/k"),
    }
    view = timeline(NodeFacts("m0", "master", False), reached, T0 + 65)
    states = _states(view)
    assert states["dhcp-offer"] == states["dhcp-ack"] == "skipped"
    assert states["bootloader"] == states["kernel"] == "done"
    assert states["initramfs"] == "next" and states["ignition"] == "pending"
    assert view["current"] == "kernel" and view["waiting_for"] == "initramfs"
    assert view["since"] == T0 + 5 and view["waiting_seconds"] == 60.0
    assert view["progress"] == pytest.approx(4 / 10)
    entry = next(e for e in view["timeline"] if e["stage"] == "bootloader")
    assert (
        entry["first"] == T0 and entry["last"] == T0 + 1 and entry["detail"] == "tftp undionly.kpxe"
    )


def test_bootstrap_and_gpu_nodes_complete_at_their_own_last_stage() -> None:
    boot_stages = expected_stages("bootstrap", False)
    done = {s: (T0 + i, T0 + i, "") for i, s in enumerate(boot_stages)}
    view = timeline(NodeFacts("bootstrap", "bootstrap", False), done, T0 + 100)
    assert view["complete"] and view["waiting_for"] is None and view["progress"] == 1.0
    assert view["waiting_seconds"] is None
    worker = {s: (T0, T0, "") for s in expected_stages("worker", False)}
    view = timeline(NodeFacts("w0", "worker", True), worker, T0)
    assert not view["complete"] and view["waiting_for"] == "gpu-discovered"


def test_unexpected_stage_still_shows() -> None:
    # A GPU event on a node the inventory does not mark gpu: shown, not hidden.
    reached = {"gpu-discovered": (T0, T0, "8x A100")}
    view = timeline(NodeFacts("w0", "worker", False), reached, T0)
    assert view["current"] == "gpu-discovered"
    assert "gpu-discovered" in _states(view)


def test_reinstall_request_starts_a_new_install() -> None:
    reached = {
        "kernel": (T0, T0, "old"),
        "ignition": (T0 + 10, T0 + 10, "http master.ign"),
    }
    node = NodeFacts("m0", "master", False, installed_at=None, reinstall_requested=T0 + 20)
    view = timeline(node, reached, T0 + 30)
    states = _states(view)
    assert states["kernel"] == states["ignition"] == "previous"
    assert view["current"] is None and view["waiting_for"] == "dhcp-offer"
    assert view["since"] == T0 + 20 and view["waiting_seconds"] == 10.0
    assert view["next_boot"] == "install"
    # The new install's first fetch counts again.
    reached["kernel"] = (T0, T0 + 25, "new")
    view = timeline(node, reached, T0 + 30)
    assert _states(view)["kernel"] == "done" and view["current"] == "kernel"


def test_next_boot_follows_after_install() -> None:
    installed = NodeFacts("m0", "master", False, installed_at=T0)
    assert timeline(installed, {}, T0)["next_boot"] == "local"
    always = NodeFacts("m0", "master", False, installed_at=T0, after_install="reinstall")
    assert timeline(always, {}, T0)["next_boot"] == "install"


def test_progress_bar_bounds() -> None:
    assert progress_bar(0.0, 4) == "[....]"
    assert progress_bar(0.5, 4) == "[##..]"
    assert progress_bar(7.0, 4) == "[####]"
    assert progress_bar(-1.0, 4) == "[....]"


# --- SSE --------------------------------------------------------------------------------


def test_sse_encode_and_parse_round_trip() -> None:
    wire = sse.encode('{"a": 1}\nsecond line', id=42, event="stage")
    assert wire == b'event: stage\nid: 42\ndata: {"a": 1}\ndata: second line\n\n'
    parser = sse.Parser()
    got = [parser.feed(line) for line in wire.decode().split("\n")]
    messages = [m for m in got if m is not None]
    assert messages == [sse.Message('{"a": 1}\nsecond line', "stage", "42")]
    assert parser.last_id == "42"


def test_sse_parser_ignores_comments_and_keeps_last_id() -> None:
    parser = sse.Parser()
    lines = [": keep-alive", "", "retry: 2000", "", "data:x", "", "id: 7", "data: y", ""]
    messages = [m for m in map(parser.feed, lines) if m is not None]
    assert messages == [sse.Message("x", "message", None), sse.Message("y", "message", "7")]
    assert sse.comment("keep-alive") == b": keep-alive\n\n"
    assert sse.retry(1500) == b"retry: 1500\n\n"


@pytest.mark.parametrize("value", ["", " ", "-1", "abc", "1.5", "9" * 19, " 3x", "\u00b2"])
def test_bad_event_ids_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="not an event id"):
        sse.parse_event_id(value)


def test_event_id_values() -> None:
    assert sse.parse_event_id(None) is None
    assert sse.parse_event_id(" 12 ") == 12


# --- metrics ----------------------------------------------------------------------------


def _running(detail: ServiceStatus) -> ServiceEntry:
    return ServiceEntry("running", (), detail)


STATUS = ApplianceStatus(
    version="0.1.0",
    cluster="demo.example.com",
    uptime=12.5,
    nodes=3,
    reloads={"ok": 2, "failed": 1},
    events_published=9,
    events_dropped=0,
    services={
        "dns": _running(DnsStatus(
            counters={"queries": 10, "fast": 7, "malformed": 2, "forwarded": 1},
            rcodes={"NOERROR": 8, "NXDOMAIN": 2},
            cache_entries=1,
            tcp_connections=0,
        )),
        "dhcp": _running(DhcpStatus(
            counters={
                "received": 4, "discover": 2, "request": 2, "sent": 4, "malformed": 1,
                "ping_silent": 2, "ping_in_use": 1,
            },
            leases_bound=1,
        )),
        "tftp": ServiceEntry("off"),
        "http": _running(HttpStatus(counters={"ignition_served": 1}, requests=5, bytes=900)),
        "proxy": _running(ProxyStatus(
            frontends={
                "api": FrontendStatus(
                    active=1,
                    counters={"accepted": 3},
                    backends=(
                        BackendStatus("m0", health="up", admin="drain", active=1,
                                      total=3, failures=0, bytes_in=10, bytes_out=20),
                    ),
                )
            },
        )),
        "admin": _running(AdminStatus(requests=4, streams=1)),
    },
)  # fmt: skip


def _scrape(metrics: list[Metric]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)

    class Fixed:
        def collect(self) -> list[Metric]:
            return metrics

    registry.register(Fixed())
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_metric_families_from_status_and_store() -> None:
    facts = StoreFacts(
        events={"kernel": 3, "csr-client": 2},
        nodes_reached={"kernel": 2},
        leases={"bound": 1},
        csr_decisions={"approve": 2, "deny": 1},
        unknown_machines=4,
    )
    got = _scrape(families(STATUS, facts))
    assert got[("appliance_uptime_seconds", ())] == 12.5
    assert got[("appliance_reloads_total", (("result", "failed"),))] == 1
    assert got[("appliance_service_up", (("service", "tftp"),))] == 0
    assert got[("appliance_dns_queries_total", ())] == 10
    assert got[("appliance_dns_responses_total", (("rcode", "NXDOMAIN"),))] == 2
    assert got[("appliance_malformed_packets_total", (("service", "dns"),))] == 2
    assert got[("appliance_malformed_packets_total", (("service", "dhcp"),))] == 1
    assert got[("appliance_dhcp_messages_total", (("type", "discover"),))] == 2
    assert got[("appliance_dhcp_leases", (("state", "bound"),))] == 1
    assert got[("appliance_dhcp_unknown_machines", ())] == 4
    assert got[("appliance_dhcp_ping_checks_total", (("result", "in_use"),))] == 1
    assert got[("appliance_dhcp_ping_checks_total", (("result", "silent"),))] == 2
    assert got[("appliance_http_bytes_total", ())] == 900
    assert got[("appliance_events_total", (("stage", "kernel"),))] == 3
    assert got[("appliance_events_total", (("stage", "ignition"),))] == 0  # the series exists
    assert got[("appliance_csr_approvals_total", (("kind", "client"),))] == 2
    assert got[("appliance_csr_decisions_total", (("decision", "deny"),))] == 1
    be = (("backend", "m0"), ("frontend", "api"))
    assert got[("appliance_lb_backend_admin_state", (*be, ("state", "drain")))] == 1
    assert got[("appliance_lb_backend_admin_state", (*be, ("state", "enabled")))] == 0
    assert got[("appliance_lb_backend_health", (*be, ("state", "up")))] == 1
    assert got[("appliance_lb_backend_bytes_total", (*be[:1], ("direction", "out"), be[1]))] == 20
    assert got[("appliance_lb_connections_total", (("frontend", "api"),))] == 3
    # A service that is off has no series of its own.
    assert not any(name.startswith("appliance_tftp_") for name, _ in got)


def test_metric_families_show_the_store_queue() -> None:
    """A state file locked by another process: the writes waiting, the busy retries."""
    store = {"queued": 12, "queue_peak": 40, "oldest_wait": 3.5, "locked_for": 3.6,
             "written": 100, "commits": 7, "busy": 30, "retries": 31, "errors": 1,
             "failed": 0, "overflow": 2, "lost": 0}  # fmt: skip
    got = _scrape(families(dataclasses.replace(STATUS, store=store), StoreFacts()))
    assert got[("appliance_store_queue_depth", ())] == 12
    assert got[("appliance_store_queue_peak", ())] == 40
    assert got[("appliance_store_locked_seconds", ())] == 3.6
    assert got[("appliance_store_oldest_write_seconds", ())] == 3.5
    assert got[("appliance_store_busy_total", ())] == 30
    assert got[("appliance_store_retries_total", ())] == 31
    assert got[("appliance_store_writes_total", ())] == 100
    assert got[("appliance_store_overflow_total", ())] == 2
    assert got[("appliance_store_lost_total", ())] == 0


def test_metric_families_survive_an_empty_status() -> None:
    got = _scrape(families(ApplianceStatus(), StoreFacts()))
    assert got[("appliance_uptime_seconds", ())] == 0
    assert got[("appliance_events_total", (("stage", "dhcp-offer"),))] == 0


# --- what the CLI prints --------------------------------------------------------------------


def _nodes_view() -> dict[str, Any]:
    reached = {"kernel": (T0, T0, "tftp k")}
    return {
        "time": T0 + 90,
        "nodes": [
            {"name": "master-0", "role": "master", "ip": "10.0.0.5", "gpu": False,
             **timeline(NodeFacts("master-0", "master", False), reached, T0 + 90)},
            {"name": "worker-0", "role": "worker", "ip": "10.0.0.6", "gpu": True,
             **timeline(NodeFacts("worker-0", "worker", True), {}, T0 + 90)},
        ],
    }  # fmt: skip


def test_nodes_table() -> None:
    lines = nodes_table(_nodes_view(), T0 + 90)
    assert lines[0].split() == [
        "NODE", "ROLE", "IP", "PROGRESS", "LAST", "STAGE", "WAITING", "FOR", "NEXT", "BOOT",
    ]  # fmt: skip
    assert "master-0" in lines[1] and "kernel" in lines[1] and "initramfs for 1m30s" in lines[1]
    assert "[####......]  40%" in lines[1]
    assert "worker gpu" in lines[2] and "dhcp-offer" in lines[2]


def test_watch_screen_and_event_lines() -> None:
    ev = {"time": T0, "node": "master-0", "stage": "kernel", "detail": "tftp k"}
    plain = watch_screen(_nodes_view(), [ev], T0 + 90, title="watch", color=False)
    assert plain[0].startswith("watch") and "Ctrl-C" in plain[0]
    assert any("master-0" in line and "40%" in line for line in plain)
    assert plain[-1] == event_line(ev)
    assert event_line(ev).split()[1:] == ["master-0", "kernel", "tftp", "k"]
    colored = watch_screen(_nodes_view(), [], T0 + 90, title="watch")
    assert "\x1b[" in colored[0] and any("(none yet)" in line for line in colored)


def test_status_lines() -> None:
    lines = status_lines({**STATUS.to_json(), "plan": {"nodes": 3}})
    assert lines[0] == "appliance 0.1.0 serving demo.example.com: 3 nodes, up 12s"
    assert lines[1] == "reloads: 2 ok, 1 refused"
    dns = next(line for line in lines if line.startswith("dns "))
    assert "10 queries" in dns
    proxy = next(line for line in lines if line.startswith("proxy "))
    assert "1/1 backends up" in proxy
    store = {"written": 100, "queued": 12, "locked_for": 75.0, "lost": 0, "failed": 1}
    lines = status_lines({**STATUS.to_json(), "store": store})
    locked = "locked by another process for 1m15s"
    assert lines[-1] == f"store: 100 writes, 12 waiting, {locked}, 1 failed"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (0, "0s"), (59.4, "59s"), (61, "1m01s"), (3600, "1h00m"), (200000, "2d07h")],
)
def test_duration(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


def test_dashboard_files_are_package_data() -> None:
    """Every file of the page is matched by pyproject's package-data (wheels carry it)."""
    import fnmatch
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["appliance"]
    files = sorted(p.relative_to(root / "appliance").as_posix()
                   for p in (root / "appliance" / "dashboard").iterdir())  # fmt: skip
    assert files == ["dashboard/app.js", "dashboard/index.html", "dashboard/style.css"]
    for name in files:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), name
