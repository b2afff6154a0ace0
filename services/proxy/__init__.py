"""proxy: the TCP load balancer for the api, machine_config and ingress frontends."""

from appliance.service import ServiceSpec
from services.proxy.server import ProxyService, proxy_enabled

# The proxy re-binds moved listeners itself on reload, so its connections survive.
SPEC = ServiceSpec(
    "proxy",
    ProxyService,
    listen_keys=("api", "machine_config", "ingress_http", "ingress_https"),
    enabled=proxy_enabled,
    rebinds_itself=True,
)

__all__ = ["SPEC", "ProxyService"]
