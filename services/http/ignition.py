"""Who gets which ignition file over HTTP (pure: the plan and the runtime state in, a
decision out; the aiohttp handler reads the file and maps the decision to a response).

Ignition holds cluster secrets (bootstrap.ign above all), so:
- /ignition/<role>.ign goes only to the addresses of that role's nodes, and
  /ignition/node/<name>.ign only to that node's (its own file node/<name>.ign when there
  is one, else its role's); anyone else: 403, cause "not_owner";
- once bootstrap is complete (the cluster loop retired it) the bootstrap node gets 410,
  cause "bootstrap_retired": its ignition is served no more;
- an unknown role or node: 404, no cause (nobody's boot file);
- boot once: a GET served to its node is the "ignition" stage and, with
  boot.after_install "localboot", marks the node installed; a HEAD is a probe: neither.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Literal, Protocol

from appliance.plan import NodeInfo, Plan

ROLES = ("bootstrap", "master", "worker")
Target = tuple[Literal["role", "node"], str]  # /ignition/<role>.ign, /ignition/node/<name>.ign


class BootstrapState(Protocol):
    """What the decision reads of the runtime state (appliance.runtime.RuntimeState)."""

    @property
    def bootstrap_retired(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class IgnitionDecision:
    status: int  # 200: read `filename` below ignition_dir and serve it; 403, 404, 410
    filename: str = ""  # the file asked for ("" when the role or node is unknown)
    what: str = ""  # whose file, for the audit line: "master", "node master-0"
    node: NodeInfo | None = None  # the client's node (by address), if it is one
    cause: str | None = None  # a refusal's boot-error cause (booterrors.CAUSES)
    event: bool = False  # once served: the node reached the "ignition" stage
    mark_installed: bool = False  # once served: its next network boot is from disk


NOT_FOUND = IgnitionDecision(404)


def ignition_access(
    client: IPv4Address | None,
    target: Target,
    method: str,
    plan: Plan,
    runtime: BootstrapState,
    has_file: Callable[[str], bool],
) -> IgnitionDecision:
    """`client`: the requester's IPv4 address (None: not IPv4); `has_file(name)`: whether
    ignition_dir holds that file (asked only for a known node's own file)."""
    kind, name = target
    if kind == "role":
        if name not in ROLES:
            return NOT_FOUND
        owners = {n.ip for n in plan.nodes if n.role == name}
        filename, what = f"{name}.ign", name
    else:
        owner = plan.by_name.get(name)
        if owner is None:
            return NOT_FOUND
        own = f"node/{name}.ign"  # the contract path; its role's file without one
        filename = own if has_file(own) else f"{owner.role}.ign"
        owners, what = {owner.ip}, f"node {name}"
    node = plan.by_ip.get(client) if client is not None else None
    if client is None or client not in owners or node is None:
        return IgnitionDecision(403, filename, what, node, "not_owner")
    if runtime.bootstrap_retired and node.role == "bootstrap":
        return IgnitionDecision(410, filename, what, node, "bootstrap_retired")
    get = method == "GET"  # a HEAD (a probe: no body) installs nothing
    mark = get and plan.boot.after_install == "localboot"
    return IgnitionDecision(200, filename, what, node, None, get, mark)
