"""A node's install progress as a timeline of stages (sans-IO: plain values, `now` passed in).

The admin API, the dashboard and `appliance watch` show the same story: which stages
a node has reached and when, which stage comes next and how long the node has been
waiting for it. Which stages a node goes through depends on what it is: the bootstrap
machine never joins the cluster (it ends when the bootstrap is complete), and only
GPU nodes go through the GPU stages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from appliance.events import BOOT_ERROR, STAGES, STATES, blocked_stage

INSTALL_STAGES = STAGES[: STAGES.index("ignition") + 1]
JOIN_STAGES = STAGES[STAGES.index("machine-config") : STAGES.index("node-ready") + 1]
GPU_STAGES = STAGES[STAGES.index("gpu-discovered") :]
# The bootstrap machine's last act: the cluster runs without it (when this build knows it).
BOOTSTRAP_STAGES = INSTALL_STAGES + tuple(s for s in ("bootstrap-complete",) if s in STAGES)

# node -> stage -> (first time, last time, detail), as Store.progress() returns it
Progress = Mapping[str, Mapping[str, tuple[float, float, str]]]


def expected_stages(role: str, gpu: bool) -> tuple[str, ...]:
    """The stages a node of this role goes through, in install order."""
    if role == "bootstrap":
        return BOOTSTRAP_STAGES
    return INSTALL_STAGES + JOIN_STAGES + (GPU_STAGES if gpu else ())


@dataclass(frozen=True)
class NodeFacts:
    """What the timeline needs to know about a node (from the plan and the store)."""

    name: str
    role: str
    gpu: bool
    installed_at: float | None = None
    reinstall_requested: float | None = None
    after_install: str = "localboot"  # boot.after_install: localboot | reinstall


def timeline(
    node: NodeFacts, reached: Mapping[str, tuple[float, float, str]], now: float
) -> dict[str, Any]:
    """The node's stages, the one it waits for and its progress, as JSON-able values.

    A stage seen before the last reinstall request belongs to the previous install:
    it is shown as "previous", and the new install starts from the beginning.
    Each stage's state is one of done, skipped (a later stage happened without it,
    e.g. no dhcp-offer under proxyDHCP), next (what the node waits for), pending or
    previous; or error: the node's latest request for that stage's file was refused
    (`boot_error` says how), until the node gets past it.
    """
    expected = expected_stages(node.role, node.gpu)
    since_reinstall = node.reinstall_requested or 0.0
    current = {s: v for s, v in reached.items() if v[1] >= since_reinstall}
    # Stages outside the expected list (a GPU event on a node not marked gpu) still count.
    extra = tuple(s for s in STAGES if s in current and s not in expected)
    order = tuple(s for s in STAGES if s in expected or s in extra)
    done = [i for i, s in enumerate(order) if s in current]
    last_index = done[-1] if done else -1
    waiting_for = order[last_index + 1] if last_index + 1 < len(order) else None
    # A boot error is no progress: the node still waits since its last stage.
    latest = max((v[1] for s, v in current.items() if s not in STATES), default=None)
    error = _boot_error(current)
    stages: list[dict[str, Any]] = []
    for i, stage in enumerate(order):
        entry: dict[str, Any] = {"stage": stage, "first": None, "last": None, "detail": ""}
        if stage in current:
            first, last, detail = current[stage]
            entry.update(state="done", first=first, last=last, detail=detail)
        elif stage in reached:
            first, last, detail = reached[stage]
            entry.update(state="previous", first=first, last=last, detail=detail)
        elif i < last_index:
            entry["state"] = "skipped"
        elif stage == waiting_for:
            entry["state"] = "next"
        else:
            entry["state"] = "pending"
        if error is not None and stage == error["stage"]:
            entry.update(state="error", error=error["detail"], error_time=error["last"])
        stages.append(entry)
    # Waiting since the latest stage, or since the reinstall request (or never started).
    since = latest if latest is not None else node.reinstall_requested
    return {
        "timeline": stages,
        "current": order[last_index] if last_index >= 0 else None,
        "waiting_for": waiting_for,
        "since": since,
        "waiting_seconds": round(now - since, 3) if since is not None and waiting_for else None,
        "progress": round((last_index + 1) / len(order), 4) if order else 0.0,
        "complete": waiting_for is None,
        "next_boot": _next_boot(node),
        "boot_error": error,
    }


def _boot_error(current: Mapping[str, tuple[float, float, str]]) -> dict[str, Any] | None:
    """The node's boot error while it stands: none of the stages from the one it blocks
    on happened after it (a retrying firmware's DHCP or loader fetch does not clear a
    missing kernel; the kernel, or anything after it, does)."""
    seen = current.get(BOOT_ERROR)
    if seen is None:
        return None
    # Only the latest boot error counts (its time and detail): the row's first time may
    # be an older error, long cleared.
    _first, last, detail = seen
    blocked = blocked_stage(detail)
    start = STAGES.index(blocked)
    if any(current[s][1] >= last for s in STAGES[start:] if s in current):
        return None
    return {"stage": blocked, "detail": detail, "last": last}


def _next_boot(node: NodeFacts) -> str:
    # Mirrors services.bootconfig: an installed node boots from disk unless the
    # inventory says to install every time (a reinstall request clears installed_at).
    installed = node.installed_at is not None and node.after_install == "localboot"
    return "local" if installed else "install"


def progress_bar(fraction: float, width: int = 20) -> str:
    """A text bar for a terminal: [#######.............]."""
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"
