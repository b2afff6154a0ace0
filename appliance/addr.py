"""Address values every layer shares: `Endpoint` (host:port) and `normalize_mac`.

Kept free of pydantic (and of any I/O) so a service's pure core can name an endpoint or
a MAC without importing the inventory model; appliance.inventory re-exports both.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

_HEX12 = re.compile(r"^[0-9a-f]{12}$")


def normalize_mac(value: Any) -> str:
    """`52-54-00-AA-bb-cc`, `5254.00aa.bbcc`, `525400aabbcc` -> `52:54:00:aa:bb:cc`."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a MAC address: write it as a quoted string")
    text = value.strip().lower()
    parts = re.split(r"[:-]", text)
    if len(parts) == 6 and all(re.fullmatch(r"[0-9a-f]{1,2}", p) for p in parts):
        digits = "".join(p.zfill(2) for p in parts)
    else:
        digits = text.replace(".", "")
        if "." in text and not re.fullmatch(r"[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}", text):
            digits = ""
    if not _HEX12.match(digits):
        raise ValueError(f"{value!r} is not a MAC address (six hex pairs separated by ':' or '-')")
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A parsed `host:port` (IPv6 as `[addr]:port`)."""

    host: str
    port: int
    # A floating address of an HA pair (plan.ha): bound with IP_FREEBIND, so the listener
    # exists on every member while only the leader holds the address. Not part of
    # equality: moving a listener is about host and port.
    freebind: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        return ipaddress.ip_address(self.host).is_unspecified
