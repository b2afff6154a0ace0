"""One forwarded question as a state machine over bytes and `now` (sans-IO, as aioquic).

`Resolution` says what to send and to whom (`Send`: an upstream, the query with a fresh
ID, UDP or TCP) and when it is over (`Done`: the upstream's record, or None for
SERVFAIL). The asyncio shell (forwarder.py) moves the bytes, reports what came back
(`receive`) or what broke (`failed`), and arms one timer at `get_timer()` that calls
`handle_timer(now)`. Nothing here reads a clock or touches a socket.

Rules, in the order a reply is judged:
- from an address other than the upstream asked right now: dropped, counted
  (`upstream_wrong_source`);
- not a response (QR=0 echo, other opcode), not our ID, not our question (name without
  case, type and class exactly): dropped, counted (`upstream_mismatched`); over UDP we
  keep waiting for the real one (a spoofer must not make us give up), over TCP the
  connection carried its one answer, so the upstream has failed;
- TC over UDP: the same upstream, the same bytes, over TCP;
- unreadable, SERVFAIL or REFUSED: that upstream failed, the next one is asked (fresh ID);
- anything else is the answer.
Each try has TRY_TIMEOUT, all of them together TOTAL_TIMEOUT: after that, SERVFAIL.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dnslib import DNSError, DNSRecord

from appliance.addr import Endpoint
from services.dns.cache import UpstreamPicker
from services.dns.engine import Forward, cache_reply, servfail, truncate_reply
from services.dns.rcode import REFUSED, SERVFAIL

TRY_TIMEOUT = 1.5  # per upstream (a TC retry over TCP gets its own)
TOTAL_TIMEOUT = 4.0  # per client question, all upstreams together


@dataclass(frozen=True, slots=True)
class Send:
    """Send `data` to `upstream`: over UDP from a fresh socket, or over TCP (one message)."""

    upstream: Endpoint
    data: bytes
    tcp: bool = False


@dataclass(frozen=True, slots=True)
class Done:
    """The end: the upstream's answer, or None (every upstream failed or time ran out)."""

    record: DNSRecord | None


Action = Send | Done


def question_bytes(data: bytes) -> bytes:
    """The question section (name, type, class) of a parsed-OK query, lower-cased name."""
    pos = 12
    while data[pos]:
        pos += data[pos] + 1
    pos += 1  # the root label ends the name and belongs to it
    return data[12:pos].lower() + data[pos : pos + 4]


def same_question(reply: bytes, question: bytes) -> bool:
    """Does `reply` answer `question` (from question_bytes)? The name compares without
    case (0x20 mixing), type and class exactly: lower-casing those too would turn type
    65 (HTTPS, low byte 'A') into 97 and refuse every such answer."""
    end = 12 + len(question)
    return reply[12 : end - 4].lower() == question[:-4] and reply[end - 4 : end] == question[-4:]


def _same_address(source: tuple[Any, ...], ep: Endpoint) -> bool:
    if len(source) < 2 or source[1] != ep.port:
        return False
    host = str(source[0])
    if host == ep.host:
        return True
    try:  # "::1" and "0:0::1" are one address
        return ipaddress.ip_address(host.split("%", 1)[0]) == ipaddress.ip_address(ep.host)
    except ValueError:
        return False


def _new_id() -> int:
    return secrets.randbelow(65536)


class Resolution:
    """The upstream exchange for one client question (`query`: the plain shape the engine
    forwards: one uncompressed question, at most an OPT)."""

    def __init__(
        self,
        query: bytes,
        picker: UpstreamPicker,
        now: float,
        counters: Counter[str],
        *,
        try_timeout: float = TRY_TIMEOUT,
        total_timeout: float = TOTAL_TIMEOUT,
        new_id: Callable[[], int] = _new_id,
    ) -> None:
        self.query = query
        self.question = question_bytes(query)
        self.picker = picker
        self.counters = counters
        self.try_timeout = try_timeout
        self.deadline = now + total_timeout
        self.new_id = new_id
        self._order = picker.order(now)
        self._next = 0  # index in _order of the upstream to ask next
        self._current: Send | None = None  # what is in flight
        self._try_deadline: float | None = None
        self.result: Done | None = None

    @property
    def current(self) -> Send | None:
        """The try in flight: events of a socket opened for another one are stale."""
        return self._current

    # --- the shell calls these ----------------------------------------------------------

    def start(self, now: float) -> Action:
        return self._ask_next(now)

    def get_timer(self) -> float | None:
        """When handle_timer must run next; None once done."""
        return None if self.result is not None else self._try_deadline

    def handle_timer(self, now: float) -> Action | None:
        """The try timed out (if its time has come): the next upstream, or the end."""
        if self.result is not None or self._try_deadline is None or now < self._try_deadline:
            return None
        return self._fail(now)

    def failed(self, now: float) -> Action | None:
        """The socket of the try in flight failed (ICMP unreachable, reset, EOF)."""
        if self.result is not None or self._current is None:
            return None
        return self._fail(now)

    def receive(
        self, data: bytes, source: tuple[Any, ...], now: float, *, tcp: bool = False
    ) -> Action | None:
        """A message that came back; None: dropped, still waiting."""
        current = self._current
        if self.result is not None or current is None or tcp != current.tcp:
            return None  # late (a socket not yet closed), or not the transport asked
        if not _same_address(source, current.upstream):
            self.counters["upstream_wrong_source"] += 1
            return None
        if (
            len(data) < 12
            or data[2] & 0xF8 != 0x80  # QR set, opcode QUERY: an echo of our query is not
            or data[:2] != current.data[:2]
            or not same_question(data, self.question)
        ):
            self.counters["upstream_mismatched"] += 1
            # Over TCP the connection brought its one answer, and it was not ours.
            return self._fail(now) if tcp else None
        if data[2] & 0x02 and not tcp:  # TC: the whole answer needs TCP
            self.counters["upstream_tcp"] += 1
            return self._send(Send(current.upstream, current.data, tcp=True), now)
        try:
            record = DNSRecord.parse(data)
        except (DNSError, ValueError, IndexError, KeyError, TypeError, UnicodeError, EOFError):
            return self._fail(now)
        if record.header.rcode in (SERVFAIL, REFUSED):  # this one cannot: try the next
            return self._fail(now)
        self.picker.succeeded(current.upstream)
        return self._finish(record)

    # --- inside ------------------------------------------------------------------------

    def _ask_next(self, now: float) -> Action:
        if self._next >= len(self._order) or now >= self.deadline:
            return self._finish(None)
        ep = self._order[self._next]
        self._next += 1
        qid = self.new_id() & 0xFFFF
        return self._send(Send(ep, qid.to_bytes(2, "big") + self.query[2:]), now)

    def _send(self, send: Send, now: float) -> Send:
        self._current = send
        self._try_deadline = min(now + self.try_timeout, self.deadline)
        return send

    def _fail(self, now: float) -> Action:
        assert self._current is not None
        self.counters["upstream_failures"] += 1
        self.picker.failed(self._current.upstream, now)
        return self._ask_next(now)

    def _finish(self, record: DNSRecord | None) -> Done:
        self._current = None
        self._try_deadline = None
        self.result = Done(record)
        return self.result


def client_reply(
    fwd: Forward, record: DNSRecord | None, age: int, tcp: bool, counters: Counter[str]
) -> bytes:
    """The reply for the client: `record` (aged by `age` seconds) as the answer to its own
    query, cut with TC when it exceeds the client's UDP size; SERVFAIL without a record."""
    out = cache_reply(fwd.data, record, age) if record is not None else None
    if out is None:
        counters["servfail"] += 1
        return servfail(fwd.data)
    if tcp or len(out) <= (fwd.udp_size if fwd.edns else 512):
        return out
    counters["truncated"] += 1
    return truncate_reply(out, fwd.edns)
