"""Machines outside the inventory that ask for an address (sans-IO, time is an argument).

An operator wants to see the forgotten DGX that PXE-boots; an attacker sends DISCOVERs
from random MACs. So everything here is bounded: at most `capacity` MACs are tracked
(the least recently seen goes first, counted), at most `capacity` sightings wait for the
store, a MAC is written at most once per `note_every` seconds, and at most `log_burst`
new MACs per `log_window` get a log line of their own; the rest are summed up in one
line when the window ends (as a rate-limited syslog says "N messages suppressed").
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from services.dhcp.policy import ClientInfo

CAPACITY = 4096  # MACs tracked in memory; as many rows kept in the store
NOTE_EVERY = 60.0  # seconds between two store writes about one MAC
LOG_BURST = 10  # new unknown MACs logged one by one per window
LOG_WINDOW = 60.0  # seconds


@dataclass(slots=True)
class Sighting:
    """What the store is told about one MAC (seen: requests since the last write)."""

    mac: str
    first_seen: float
    last_seen: float
    seen: int
    vendor_class: str
    arch: str
    user_class: str
    hostname: str


@dataclass(slots=True)
class _Tracked:
    written: float  # when this MAC was last handed to the store
    unwritten: int  # requests seen since


class Strangers:
    def __init__(
        self,
        capacity: int = CAPACITY,
        note_every: float = NOTE_EVERY,
        log_burst: int = LOG_BURST,
        log_window: float = LOG_WINDOW,
    ) -> None:
        self.capacity = capacity
        self.note_every = note_every
        self.log_burst = log_burst
        self.log_window = log_window
        self.last_noted: OrderedDict[str, _Tracked] = OrderedDict()
        self.pending: dict[str, Sighting] = {}
        self.evicted = 0  # MACs forgotten to make room (and sightings never written)
        self.lost = 0  # new MACs never written (the store was behind): told to the store
        self.window_start: float | None = None
        self.logged = 0  # lines in the current window
        self.suppressed = 0  # new MACs not logged in the current window

    def seen(self, info: ClientInfo, now: float) -> str | None:
        """Record one request from `info.mac`; a line for the operator's log, or None."""
        tracked = self.last_noted.get(info.mac)
        line = None
        new = tracked is None
        if tracked is None:
            if len(self.last_noted) >= self.capacity:
                self.last_noted.popitem(last=False)
                self.evicted += 1
            tracked = self.last_noted[info.mac] = _Tracked(float("-inf"), 0)
            line = self._log_line(info, now)
        else:
            self.last_noted.move_to_end(info.mac)
        tracked.unwritten += 1
        if now - tracked.written >= self.note_every:
            self._note(info, now, tracked.unwritten, new)
            tracked.written, tracked.unwritten = now, 0
        return line

    def _log_line(self, info: ClientInfo, now: float) -> str | None:
        if self.window_start is None or (
            now - self.window_start >= self.log_window and not self.suppressed
        ):
            self.window_start, self.logged = now, 0
        if self.logged < self.log_burst:
            self.logged += 1
            return (
                f"unknown machine {info.mac} is network-booting ({info.describe()}): "
                "not in the inventory"
            )
        self.suppressed += 1
        return None

    def _note(self, info: ClientInfo, now: float, count: int, new: bool) -> None:
        waiting = self.pending.get(info.mac)
        if waiting is None and len(self.pending) >= self.capacity:
            self.evicted += 1  # the store is behind: this sighting is not kept
            self.lost += new
            return
        arch = "" if info.arch is None else str(info.arch)
        first = waiting.first_seen if waiting is not None else now
        seen = count + (waiting.seen if waiting is not None else 0)
        self.pending[info.mac] = Sighting(
            info.mac, first, now, seen, info.vendor_class, arch, info.user_class, info.hostname
        )

    def tick(self, now: float) -> str | None:
        """Call now and then: the summary of the new MACs not logged, once the window ends."""
        if not self.suppressed or self.window_start is None:
            return None
        if now - self.window_start < self.log_window:
            return None
        line = (
            f"{self.suppressed} more unknown machines network-booted in the last "
            f"{now - self.window_start:.0f} s (not logged one by one; GET "
            "/api/v1/unknown-machines lists them)"
        )
        self.window_start, self.logged, self.suppressed = now, 0, 0
        return line

    def take(self) -> tuple[list[Sighting], int]:
        """The sightings to write to the store now (oldest first), and how many new MACs
        were seen but could not wait for it (the store counts them as evicted)."""
        notes, lost = list(self.pending.values()), self.lost
        self.pending.clear()
        self.lost = 0
        return notes, lost

    def put_back(self, notes: list[Sighting], lost: int) -> None:
        """A write that failed (the state file locked by another process): its sightings
        wait for the next one, merged under newer ones, within the same bound."""
        self.lost += lost
        for note in notes:
            newer = self.pending.get(note.mac)
            if newer is not None:
                newer.first_seen = min(newer.first_seen, note.first_seen)
                newer.seen += note.seen
            elif len(self.pending) < self.capacity:
                self.pending[note.mac] = note
            else:
                self.evicted += 1
