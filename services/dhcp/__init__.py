"""dhcp: DHCPv4 with PXE for every machine of the inventory, and proxyDHCP."""

from appliance.service import ServiceSpec
from services.dhcp.server import DhcpService

SPEC = ServiceSpec("dhcp", DhcpService, listen_keys=("dhcp",))

__all__ = ["SPEC", "DhcpService"]
