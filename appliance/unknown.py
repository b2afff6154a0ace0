"""Machines outside the inventory, as the operator reads them (pure: values in, values out).

The usual reason a DGX PXE-boots and gets no answer is a MAC typed wrong in the
inventory (one digit off, two swapped). So each unknown machine is compared with the
inventory's MACs, hex digit by hex digit: one that differs in at most MAX_DISTANCE
digits is named, with its `nodes[i]` key path, as the likely typo.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from appliance.plan import NodeInfo

MAX_DISTANCE = 2  # hex digits that may differ for a "did you mean"

# RFC 4578 / IANA processor architecture types (DHCP option 93), as the DHCP service
# names them in its log lines.
ARCH_NAMES = {
    0: "bios", 6: "uefi-ia32", 7: "uefi-x64", 9: "uefi-x64", 10: "uefi-arm32",
    11: "uefi-arm64", 15: "uefi-ia32-http", 16: "uefi-x64-http", 19: "uefi-arm64-http",
}  # fmt: skip
_VENDOR_ARCH = re.compile(r"^(?:PXEClient|HTTPClient):Arch:(\d{1,5})")


def _digits(mac: str) -> str:
    return re.sub(r"[^0-9a-f]", "", mac.lower())


def distance(a: str, b: str) -> int | None:
    """Hex digits in which two MACs differ; None when they are not the same length."""
    x, y = _digits(a), _digits(b)
    if len(x) != len(y) or not x:
        return None
    return sum(1 for p, q in zip(x, y, strict=True) if p != q)


def closest(mac: str, nodes: Sequence[NodeInfo], limit: int = MAX_DISTANCE) -> list[dict[str, Any]]:
    """The inventory nodes whose MAC is nearest `mac` (1..limit hex digits off), the
    nearest first, ties in inventory order; [] when none is that close, or when `mac`
    itself is in the inventory."""
    found: list[tuple[int, int, NodeInfo]] = []
    for index, node in enumerate(nodes):
        d = distance(mac, node.mac)
        if d == 0:
            return []  # in the inventory now (seen before a fix or a reload): no typo
        if d is not None and d <= limit:
            found.append((d, index, node))
    if not found:
        return []
    best = min(d for d, _, _ in found)
    return [
        {"index": i, "key": f"nodes[{i}]", "name": n.name, "mac": n.mac, "distance": d}
        for d, i, n in sorted(found, key=lambda t: (t[0], t[1]))
        if d == best
    ]


def arch_name(arch: str, vendor_class: str = "") -> str:
    """The client's architecture by name: option 93 when it sent one, else the number in
    its PXE vendor class (`PXEClient:Arch:00007`), else ""."""
    code: int | None = int(arch) if arch.isdigit() else None
    if code is None and (m := _VENDOR_ARCH.match(vendor_class)) is not None:
        code = int(m.group(1))
    if code is None:
        return ""
    return ARCH_NAMES.get(code, f"arch {code}")


def suggestion(machine: dict[str, Any]) -> str:
    """`did you mean nodes[1] master-0 52:54:00:00:00:50?`, or ""."""
    near = machine.get("closest") or []
    if not near:
        return ""
    return "did you mean " + " or ".join(f"{c['key']} {c['name']} {c['mac']}" for c in near) + "?"
