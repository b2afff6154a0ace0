"""What a reload changed: a pure diff of two plans, for the operator's log.

`diff_plans(old, new)` lists nodes, DNS records, load-balancer backends and
listeners that were added, removed or changed, and every other setting whose
value moved (by its dotted path in the plan). Values derived from the ones
listed (the CSR allow-list, the SOA serial, lookup maps) are left out, so one
edited node reads as one node change plus its records and backends.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from appliance.plan import ARecord, DnsRecord, NsRecord, Plan, PtrRecord, SrvRecord

Action = Literal["added", "removed", "changed"]
KINDS = ("node", "record", "backend", "listen", "setting")
MAX_VALUE = 80  # characters of a value shown in a "changed" line

# Parts of the plan with a section of their own above, or derived from other parts.
_SKIP: Mapping[str, frozenset[str]] = {
    "": frozenset({"listen", "nodes", "frontends", "csr_allow"}),
    "dns": frozenset({"listen", "zones"}),
    "dhcp": frozenset({"listen", "reservations"}),
    "boot": frozenset({"nodes"}),
}


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # one of KINDS
    action: Action
    name: str
    detail: str = ""

    def line(self) -> str:
        text = f"{self.kind} {self.name} {self.action}"
        return f"{text}: {self.detail}" if self.detail else text


@dataclass(frozen=True, slots=True)
class PlanDiff:
    changes: tuple[Change, ...]

    def __bool__(self) -> bool:
        return bool(self.changes)

    def of(self, kind: str, action: Action | None = None) -> list[Change]:
        return [
            c for c in self.changes if c.kind == kind and (action is None or c.action == action)
        ]

    def summary(self) -> str:
        """One line: `nodes +1 -0 ~2, records +3 -0 ~1, ...`; `no changes` when empty."""
        if not self.changes:
            return "no changes"
        parts = []
        for kind in KINDS:
            found = self.of(kind)
            if found:
                counts = [sum(1 for c in found if c.action == a) for a in _ACTIONS]
                parts.append(f"{kind}s +{counts[0]} -{counts[1]} ~{counts[2]}")
        return ", ".join(parts)

    def lines(self, limit: int = 50) -> list[str]:
        """One line per change, at most `limit` (a changed domain touches every record)."""
        out = [c.line() for c in self.changes[:limit]]
        if len(self.changes) > limit:
            out.append(f"... and {len(self.changes) - limit} more changes")
        return out


_ACTIONS: tuple[Action, ...] = ("added", "removed", "changed")


def diff_plans(old: Plan, new: Plan) -> PlanDiff:
    changes: list[Change] = []
    changes += _nodes(old, new)
    changes += _records(old, new)
    changes += _backends(old, new)
    changes += _keyed(
        "listen",
        {k: str(v) for k, v in old.listen.items()},
        {k: str(v) for k, v in new.listen.items()},
    )
    changes += _settings("", old, new)
    for name, fe_new in {fe.name: fe for fe in new.frontends}.items():
        fe_old = next((fe for fe in old.frontends if fe.name == name), None)
        if fe_old is not None:
            changes += _settings(
                f"load_balancer.{name}", fe_old, fe_new, skip=frozenset({"listen", "backends"})
            )
    return PlanDiff(tuple(changes))


# --- sections -------------------------------------------------------------------------


def _nodes(old: Plan, new: Plan) -> list[Change]:
    def table(plan: Plan) -> dict[str, dict[str, Any]]:
        boots = {b.node: b for b in plan.boot.nodes}
        out: dict[str, dict[str, Any]] = {}
        for node in plan.nodes:
            fields = _fields(node)
            boot = boots.get(node.name)
            if boot is not None:  # install kernel, arguments, device and ignition
                fields.update((k, v) for k, v in _fields(boot).items() if k not in fields)
            fields.pop("node", None)
            out[node.name] = fields
        return out

    before, after = table(old), table(new)
    changes = [Change("node", "removed", n) for n in before if n not in after]
    for name, fields in after.items():
        was = before.get(name)
        if was is None:
            changes.append(
                Change("node", "added", name, f"{fields['role']} {fields['ip']} {fields['mac']}")
            )
        elif was != fields:
            moved = [
                f"{k} {_fmt(was.get(k))} -> {_fmt(v)}" for k, v in fields.items() if was.get(k) != v
            ]
            changes.append(Change("node", "changed", name, "; ".join(moved)))
    return changes


def _record_key(record: DnsRecord) -> tuple[str, str, str]:
    """(type, owner name, value): records that share type and owner are compared as a set."""
    if isinstance(record, ARecord):
        return ("A", record.name, str(record.address))
    if isinstance(record, PtrRecord):
        return ("PTR", record.name, record.target)
    if isinstance(record, SrvRecord):
        value = f"{record.priority} {record.weight} {record.port} {record.target}"
        return ("SRV", record.name, value)
    assert isinstance(record, NsRecord)
    return ("NS", record.name, record.target)


def _records(old: Plan, new: Plan) -> list[Change]:
    def table(plan: Plan) -> dict[str, str]:
        values: dict[str, list[str]] = {}
        for zone in plan.dns.zones:
            for record in zone.records:
                rtype, owner, value = _record_key(record)
                values.setdefault(f"{rtype} {owner}", []).append(value)
        return {key: ", ".join(sorted(v)) for key, v in values.items()}

    return _keyed("record", table(old), table(new))


def _backends(old: Plan, new: Plan) -> list[Change]:
    def table(plan: Plan) -> dict[str, str]:
        return {
            f"{fe.name}/{b.name}": f"{b.address}:{b.port}"
            for fe in plan.frontends
            if fe.listen is not None  # a frontend that is off has no live backends
            for b in fe.backends
        }

    return _keyed("backend", table(old), table(new))


def _keyed(kind: str, before: Mapping[str, str], after: Mapping[str, str]) -> list[Change]:
    changes = [Change(kind, "removed", k, v) for k, v in before.items() if k not in after]
    for key, value in after.items():
        if key not in before:
            changes.append(Change(kind, "added", key, value))
        elif before[key] != value:
            changes.append(Change(kind, "changed", key, f"{before[key]} -> {value}"))
    return changes


def _settings(path: str, old: Any, new: Any, skip: Iterable[str] | None = None) -> list[Change]:
    """Every field that differs, by dotted path; dataclasses are compared field by field."""
    skipped = frozenset(skip) if skip is not None else _SKIP.get(path, frozenset())
    changes: list[Change] = []
    for f in dataclasses.fields(old):
        if not f.compare or f.name in skipped:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name, None)
        if a == b:
            continue
        where = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(a) and type(a) is type(b):
            changes += _settings(where, a, b)
        else:
            changes.append(Change("setting", "changed", where, f"{_fmt(a)} -> {_fmt(b)}"))
    return changes


def _fields(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.compare}


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, tuple | list):
        text = "[" + ", ".join(_fmt(v) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 3] + "..."
