"""The composition root: which services this build has, and how each is started.

The only module of the framework that names a service (import-linter holds the rest of
appliance/ to that), and the reason services/<x>/__init__.py is only a docstring:
importing a service's pure core then never drags in its asyncio shell, aiohttp, sqlite3
or another service.
"""

from __future__ import annotations

from appliance.admin import SPEC as ADMIN
from appliance.plan import Plan
from appliance.service import ServiceSpec
from services.cluster.service import ClusterService
from services.dhcp.server import DhcpService
from services.dns.server import DnsService
from services.http.server import HttpService
from services.proxy.server import ProxyService, proxy_enabled
from services.tftp.server import TftpService


def _always(plan: Plan) -> bool:
    """The cluster loop has no listener: it runs whenever the daemon does (and waits
    quietly for a cluster)."""
    return True


DNS = ServiceSpec("dns", DnsService, listen_keys=("dns",))
DHCP = ServiceSpec("dhcp", DhcpService, listen_keys=("dhcp",), leader_only=True)
TFTP = ServiceSpec("tftp", TftpService, listen_keys=("tftp",))
HTTP = ServiceSpec("http", HttpService, listen_keys=("http",))
# The proxy re-binds moved listeners itself on reload, so its connections survive.
PROXY = ServiceSpec(
    "proxy",
    ProxyService,
    listen_keys=("api", "machine_config", "ingress_http", "ingress_https"),
    enabled=proxy_enabled,
    rebinds_itself=True,
)
CLUSTER = ServiceSpec("cluster", ClusterService, enabled=_always, leader_only=True)


def specs() -> list[ServiceSpec]:
    """Every service this build has, in start order (admin last: it reports on the rest)."""
    return [DNS, DHCP, TFTP, HTTP, PROXY, CLUSTER, ADMIN]


def render_rbac(plan: Plan) -> str:
    """The cluster loop's least-privilege RBAC objects, for `appliance render --as rbac`
    (the renderer is the framework's; what the loop needs is the cluster service's)."""
    from services.cluster import rbac

    return rbac.render(plan)
