"""dhcp: DHCPv4 with PXE for every machine of the inventory, and proxyDHCP."""
