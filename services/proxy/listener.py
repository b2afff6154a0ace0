"""The frontends' listening socket: socket.accept(), without its per-connection enum cost.

socket.accept() (public API) builds the accepted socket from the listener's `family`
and `type`, and the stock properties convert both to enums on every call: about a
microsecond per connection, a few percent of the new-connections rate. Here they are
plain values, read once when the listener is made.
"""

from __future__ import annotations

import socket


class Listener(socket.socket):
    __slots__ = ("_family", "_kind")

    def __init__(self, sock: socket.socket) -> None:
        """Take over `sock` (bound, listening or about to): it is detached, not closed."""
        family, kind, timeout = sock.family, sock.type, sock.gettimeout()
        super().__init__(family, kind, sock.proto, sock.detach())
        self.settimeout(timeout)  # non-blocking stays non-blocking
        self._family, self._kind = family, kind

    @property
    def family(self) -> socket.AddressFamily:
        return self._family

    @property
    def type(self) -> socket.SocketKind:
        return self._kind
