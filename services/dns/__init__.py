"""dns: the cluster's authoritative zones and a guarded forwarder."""

from appliance.service import ServiceSpec
from services.dns.server import DnsService

SPEC = ServiceSpec("dns", DnsService, listen_keys=("dns",))

__all__ = ["SPEC", "DnsService"]
