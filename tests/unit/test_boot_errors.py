"""Boot errors and unknown machines, pure: which refusals count as a node's boot error,
the rate limit against retrying firmware, the timeline state a later stage clears, the
CLI's lines and the "did you mean" for a MAC a digit or two off."""

from __future__ import annotations

from ipaddress import IPv4Address
from typing import Any

import pytest

from appliance.events import BOOT_ERROR, STAGES, EventBus, blocked_stage, boot_error_detail
from appliance.metrics import StoreFacts, families
from appliance.plan import BootFiles, NodeBoot, NodeInfo
from appliance.progress import NodeFacts, timeline
from appliance.status import ApplianceStatus, ServiceEntry
from appliance.terminal import nodes_table, unknown_lines, watch_screen
from appliance.unknown import arch_name, closest, distance, suggestion
from services.booterrors import BootErrors, boot_file, tftp_cause
from services.http.status import HttpStatus
from services.tftp.status import TftpStatus

FILES = BootFiles()
BOOT = NodeBoot(
    node="worker-0", role="worker", mac="52:54:00:00:00:44", ip=IPv4Address("192.0.2.44"),
    firmware="auto", kernel="rhcos/kernel", initramfs="rhcos/initramfs.img",
    kernel_url="http://192.0.2.1:8080/images/rhcos/kernel",
    initramfs_url="http://192.0.2.1:8080/images/rhcos/initramfs.img",
    ignition_file="worker.ign", ignition_url="http://192.0.2.1:8080/ignition/worker.ign",
    install_device="/dev/sda", image_url=None,
    rootfs_url="http://192.0.2.1:8080/images/rhcos/rootfs.img", kernel_args=(),
)  # fmt: skip
WORKER = NodeFacts("worker-0", "worker", False)


def _node(i: int, name: str, mac: str) -> NodeInfo:
    return NodeInfo(name, f"{name}.demo", "worker", mac, IPv4Address(f"192.0.2.{10 + i}"), False)


NODES = (
    _node(0, "master-0", "52:54:00:00:00:50"),
    _node(1, "master-1", "52:54:00:00:00:60"),
    _node(2, "worker-0", "52:54:00:00:00:44"),
    _node(3, "worker-1", "52:54:00:aa:bb:45"),
)


# --- what a refused name is ------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "rel", "what"),
    [
        ("images", "rhcos/kernel", "kernel"),
        ("images", "/rhcos/initramfs.img", "initramfs"),
        ("images", "rhcos/rootfs.img", "rootfs"),
        ("images", "rhcos/other.img", "file"),  # nothing probes images_dir
        ("root", "undionly.kpxe", "loader"),
        ("root", "efi/ipxe.efi", "loader"),
        ("root", "ldlinux.c32", None),  # pxelinux probes: not finding it is normal
        ("root", "grub/x86_64-efi/command.lst", None),
        ("root", "pxelinux.cfg/C000022C", None),
    ],
)
def test_boot_file_names_what_the_node_asked_for(route: str, rel: str, what: str | None) -> None:
    assert boot_file(BOOT, FILES, route, rel) == what


def test_boot_file_of_an_unplanned_node_is_still_a_file_under_images() -> None:
    assert boot_file(None, FILES, "images", "rhcos/kernel") == "file"
    assert boot_file(None, FILES, "root", "ipxe.efi") == "loader"


def test_tftp_causes() -> None:
    assert tftp_cause(1, "file not found") == "missing"
    assert tftp_cause(2, "permission denied") == "unreadable"
    assert tftp_cause(2, "the path leaves the TFTP root") == "refused"


# --- one line per node, path and cause a window -----------------------------------------


def test_a_retrying_firmware_gets_one_line_then_one_with_the_count() -> None:
    errors = BootErrors(window=60)
    first = errors.refused("m0", "192.0.2.50", "kernel", "/images/k", "missing", "http 404", 0.0)
    assert first is not None
    assert first.detail == "kernel /images/k: missing (http 404)"
    assert first.line == "boot error: m0 (192.0.2.50) kernel /images/k: missing (http 404)"
    for t in range(1, 30):  # every 2 s for a minute: counted, not said
        assert (
            errors.refused("m0", "a", "kernel", "/images/k", "missing", "http 404", t * 2.0) is None
        )
    again = errors.refused("m0", "a", "kernel", "/images/k", "missing", "http 404", 61.0)
    assert again is not None and "29 more times" in again.line
    assert errors.counts["missing"] == 31 and errors.suppressed == 29
    # Another cause or path, or another node, is news at once.
    assert errors.refused("m0", "a", "kernel", "/images/k", "unreadable", "http 403", 62.0)
    assert errors.refused("m1", "b", "kernel", "/images/k", "missing", "http 404", 62.0)


def test_spoofed_names_from_one_address_cannot_flood() -> None:
    errors = BootErrors(window=60, burst=8, keep=100)
    said = [
        errors.refused("m0", "a", "file", f"images/x{i}", "missing", "tftp error 1", i * 0.01)
        for i in range(1000)
    ]
    assert sum(r is not None for r in said) == 8
    assert errors.counts["missing"] == 1000
    assert len(errors._last) <= 100
    # The next window: the node may speak again.
    assert errors.refused("m0", "a", "kernel", "images/k", "missing", "tftp error 1", 100.0)


def test_the_reason_says_where_or_why() -> None:
    errors = BootErrors()
    missing = errors.refused("m0", "a", "kernel", "/images/k", "missing", "http 404", 0, "/srv/i")
    assert (
        missing is not None and missing.detail == "kernel /images/k: missing in /srv/i (http 404)"
    )
    refused = errors.refused("m0", "a", "file", "images/.ign", "refused", "tftp error 2", 0, "no")
    assert refused is not None and "refused: no" in refused.detail
    owner = errors.refused(
        "m0", "a", "ignition", "/ignition/master.ign", "not_owner", "http 403", 0
    )
    assert owner is not None and "not the owner" in owner.detail


# --- the event and the timeline ----------------------------------------------------------


def test_boot_error_is_an_event_but_not_a_stage() -> None:
    bus = EventBus()
    ev = bus.publish("m0", BOOT_ERROR, boot_error_detail("kernel", "/k", "missing", "http 404"))
    assert ev.stage == "boot-error" and BOOT_ERROR not in STAGES
    with pytest.raises(ValueError):
        bus.publish("m0", "booted")
    assert blocked_stage("kernel /k: missing (http 404)") == "kernel"
    assert blocked_stage("loader undionly.kpxe: missing (tftp error 1)") == "bootloader"
    assert blocked_stage("rootfs /images/r: missing (http 404)") == "ignition"
    assert blocked_stage("nonsense") == "ignition"


def _view(reached: dict[str, tuple[float, float, str]], facts: NodeFacts = WORKER) -> Any:
    return timeline(facts, reached, now=100.0)


def _entry(view: Any, stage: str) -> Any:
    return next(e for e in view["timeline"] if e["stage"] == stage)


KERNEL_404 = "kernel /images/k: missing in /srv/images (http 404)"


def test_a_boot_error_marks_its_stage_and_leaves_progress_alone() -> None:
    reached = {
        "dhcp-ack": (10.0, 10.0, ""),
        "bootloader": (11.0, 11.0, ""),
        BOOT_ERROR: (12.0, 12.0, KERNEL_404),
    }
    view = _view(reached)
    assert view["boot_error"] == {"stage": "kernel", "detail": KERNEL_404, "last": 12.0}
    kernel = _entry(view, "kernel")
    assert kernel["state"] == "error" and kernel["error"] == KERNEL_404
    assert view["current"] == "bootloader" and view["waiting_for"] == "kernel"
    assert view["since"] == 11.0  # waiting since its last progress, not since the error
    assert (
        view["progress"] == _view({k: v for k, v in reached.items() if k != BOOT_ERROR})["progress"]
    )
    assert [e["stage"] for e in view["timeline"]] == [
        e["stage"] for e in _view({})["timeline"]
    ]  # boot-error is no step of its own


def test_a_retry_cycle_does_not_clear_it_the_kernel_does() -> None:
    reached = {
        BOOT_ERROR: (12.0, 12.0, KERNEL_404),
        "dhcp-ack": (10.0, 20.0, ""),  # the firmware tried again: DHCP, the loader ...
        "bootloader": (11.0, 21.0, ""),
    }
    assert _view(reached)["boot_error"] is not None
    reached["kernel"] = (22.0, 22.0, "http /images/k")
    view = _view(reached)
    assert view["boot_error"] is None and _entry(view, "kernel")["state"] == "done"
    # A later stage clears it too (the kernel came by another way, unseen).
    later = {BOOT_ERROR: (12.0, 12.0, KERNEL_404), "ignition": (30.0, 30.0, "")}
    assert _view(later)["boot_error"] is None


def test_an_error_on_a_stage_already_done_shows_on_it() -> None:
    # Installed once, then the kernel vanished and the node was refused it.
    reached = {
        "kernel": (5.0, 5.0, ""),
        "initramfs": (6.0, 6.0, ""),
        BOOT_ERROR: (40.0, 40.0, KERNEL_404),
    }
    view = _view(reached)
    assert _entry(view, "kernel")["state"] == "error"
    assert view["current"] == "initramfs"


def test_a_boot_error_before_a_reinstall_request_is_forgotten() -> None:
    facts = NodeFacts("worker-0", "worker", False, reinstall_requested=50.0)
    view = _view({BOOT_ERROR: (12.0, 12.0, KERNEL_404)}, facts)
    assert view["boot_error"] is None
    assert all(e["state"] != "error" for e in view["timeline"])


# --- CLI and metrics ---------------------------------------------------------------------


def _nodes_view(error: Any) -> dict[str, Any]:
    node = {
        "name": "worker-0", "role": "worker", "gpu": False, "ip": "192.0.2.44",
        "progress": 0.1, "current": "bootloader", "waiting_for": "kernel", "since": 90.0,
        "complete": False, "next_boot": "install", "boot_error": error,
    }  # fmt: skip
    return {"nodes": [node]}


def test_nodes_table_shows_the_boot_error_in_the_row_and_below() -> None:
    error = {"stage": "kernel", "detail": KERNEL_404, "last": 12.0}
    lines = nodes_table(_nodes_view(error), 100.0)
    assert "kernel: BOOT ERROR" in lines[1]
    assert lines[-1].startswith("worker-0: boot error at ") and lines[-1].endswith(KERNEL_404)
    clean = nodes_table(_nodes_view(None), 100.0)
    assert len(clean) == 2 and "BOOT ERROR" not in "\n".join(clean)
    screen = watch_screen(_nodes_view(error), [], 100.0, title="t", color=True)
    assert any("\x1b[31m" in line and "BOOT ERROR" in line for line in screen)


def test_boot_error_metrics_by_service_and_cause() -> None:
    http = HttpStatus(boot_errors={"missing": 5, "not_owner": 1})
    tftp = TftpStatus(boot_errors={"missing": 2})
    status = ApplianceStatus(
        services={
            "http": ServiceEntry("running", (), http),
            "tftp": ServiceEntry("running", (), tftp),
        }
    )
    fams = {f.name: f for f in families(status, StoreFacts(events={"boot-error": 3}))}
    samples = {tuple(s.labels.values()): s.value for s in fams["appliance_boot_errors"].samples}
    assert samples[("http", "missing")] == 5 and samples[("http", "not_owner")] == 1
    assert samples[("tftp", "missing")] == 2 and samples[("tftp", "unreadable")] == 0
    events = {s.labels["stage"]: s.value for s in fams["appliance_events"].samples}
    assert events["boot-error"] == 3


# --- unknown machines: did you mean ------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "d"),
    [
        ("52:54:00:00:00:45", "52:54:00:00:00:44", 1),
        ("52-54-00-00-00-45", "52:54:00:00:00:44", 1),  # separators and case do not count
        ("52:54:00:AA:BB:45", "52:54:00:aa:bb:45", 0),
        ("52:54:00:00:00:54", "52:54:00:00:00:45", 2),  # two digits swapped
        ("52:54:00:00:00:45", "52:54:00:00:00", None),  # not comparable
    ],
)
def test_hex_digit_distance(a: str, b: str, d: int | None) -> None:
    assert distance(a, b) == d


def test_closest_names_the_key_path_and_the_node() -> None:
    near = closest("52:54:00:aa:bb:46", NODES)
    assert near == [
        {
            "index": 3,
            "key": "nodes[3]",
            "name": "worker-1",
            "mac": "52:54:00:aa:bb:45",
            "distance": 1,
        }
    ]
    assert suggestion({"closest": near}) == "did you mean nodes[3] worker-1 52:54:00:aa:bb:45?"


def test_closest_keeps_only_the_nearest_and_ties_in_inventory_order() -> None:
    near = closest("52:54:00:00:00:40", NODES)  # 50 and 44: one digit each; 60: one too
    assert [c["name"] for c in near] == ["master-0", "master-1", "worker-0"]
    two = closest("52:54:00:00:01:5f", NODES)  # 00:50 -> 2 digits, 00:44 and 00:60 -> 3
    assert [(c["name"], c["distance"]) for c in two] == [("master-0", 2)]


def test_closest_is_empty_when_nothing_is_near() -> None:
    assert closest("02:00:00:de:ad:01", NODES) == []
    assert closest("52:54:00:00:07:77", NODES) == []  # three digits off
    assert closest("52:54:00:00:00:50", NODES) == []  # in the inventory now: no typo
    assert suggestion({"closest": []}) == ""


def test_arch_names() -> None:
    assert arch_name("7") == "uefi-x64"
    assert arch_name("11") == "uefi-arm64"
    assert arch_name("", "PXEClient:Arch:00000:UNDI:002001") == "bios"
    assert arch_name("", "HTTPClient:Arch:00019") == "uefi-arm64-http"
    assert arch_name("42") == "arch 42"
    assert arch_name("", "") == ""


def test_unknown_lines() -> None:
    body = {
        "total": 3, "evicted": 1, "limit": 2, "offset": 0,
        "machines": [
            {"mac": "52:54:00:aa:bb:46", "arch": "7", "arch_name": "uefi-x64",
             "first_seen": 0.0, "last_seen": 60.0, "seen": 4, "vendor_class": "PXEClient",
             "closest": closest("52:54:00:aa:bb:46", NODES)},
            {"mac": "02:00:00:de:ad:01", "arch": "", "arch_name": "", "first_seen": 0.0,
             "last_seen": 0.0, "seen": 1, "vendor_class": "\x1b]0;owned\x07", "closest": []},
        ],
    }  # fmt: skip
    lines = unknown_lines(body)
    assert lines[0] == "3 unknown machines (2 shown, from 0); 1 forgotten to keep the list bounded"
    assert lines[1].split()[:3] == ["MAC", "ARCH", "FIRST"]
    assert lines[2].startswith("52:54:00:aa:bb:46  uefi-x64")
    assert lines[2].endswith("did you mean nodes[3] worker-1 52:54:00:aa:bb:45?")
    assert lines[3].startswith("02:00:00:de:ad:01  -") and "did you mean" not in lines[3]
    assert "\x1b" not in lines[3] and "\\x1b]0;owned" in lines[3]  # escaped, not obeyed
    assert unknown_lines({"total": 0, "evicted": 0, "machines": []}) == ["0 unknown machines"]


def test_a_hostile_path_cannot_reach_a_terminal_raw_or_grow_the_store() -> None:
    errors = BootErrors()
    said = errors.refused("m0", "a", "file", "images/\x1b[2J\r\nx", "missing", "tftp error 1", 0)
    assert said is not None and "\x1b" not in said.detail and "\n" not in said.line
    assert "\\x1b[2J\\r\\nx" in said.detail
    long = errors.refused("m0", "a", "file", "images/" + "a" * 4000, "missing", "http 404", 0)
    assert long is not None and len(long.detail) < 300


def test_status_says_how_many_boot_files_were_refused() -> None:
    from appliance.terminal import status_lines

    status = {
        "services": {
            "http": {"state": "running", "requests": 9, "bytes": 0, "boot_errors": {"missing": 3}},
            "tftp": {"state": "running", "counters": {}, "boot_errors": {}},
        }
    }
    lines = status_lines(status)
    http = next(line for line in lines if line.startswith("http"))
    tftp = next(line for line in lines if line.startswith("tftp"))
    assert http.endswith("9 requests, 0 bytes, 3 boot files refused to nodes")
    assert "refused" not in tftp
