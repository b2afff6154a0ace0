"""DNS response codes (RFC 1035 4.1.1, RFC 6891 9): the one place their numbers live.

The engine, the forwarder and the server use these names instead of literals or dnslib's
lookup tables, so "is this SERVFAIL?" reads the same everywhere.
"""

from __future__ import annotations

from typing import Final

NOERROR: Final = 0
FORMERR: Final = 1
SERVFAIL: Final = 2
NXDOMAIN: Final = 3
NOTIMP: Final = 4
REFUSED: Final = 5
BADVERS: Final = 16  # extended: 1 in the OPT TTL's high byte, 0 in the header's 4 bits

# Header RCODEs by number, as the status and metrics show them; others print as digits.
NAMES: Final = ("NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED")


def name(rcode: int) -> str:
    """The mnemonic of a header RCODE (0-15), or its number as text."""
    return NAMES[rcode] if 0 <= rcode < len(NAMES) else str(rcode)
