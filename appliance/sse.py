"""Server-Sent Events framing (sans-IO): encode on the server, parse in the CLI client.

The wire format is the WHATWG "text/event-stream": `field: value` lines, an event
ends at a blank line, lines starting with ':' are comments (used as keep-alives).
"""

from __future__ import annotations

from dataclasses import dataclass


def encode(data: str, *, id: int | None = None, event: str | None = None) -> bytes:
    """One event; a newline inside `data` becomes a second data line (as the format wants)."""
    lines = []
    if event:
        lines.append(f"event: {event}")
    if id is not None:
        lines.append(f"id: {id}")
    lines.extend(f"data: {line}" for line in data.split("\n"))
    return ("\n".join(lines) + "\n\n").encode()


def comment(text: str = "") -> bytes:
    """A comment line: browsers ignore it, proxies and idle timers see traffic."""
    return f": {text}\n\n".encode()


def retry(milliseconds: int) -> bytes:
    """Tell EventSource how long to wait before reconnecting."""
    return f"retry: {milliseconds}\n\n".encode()


def parse_event_id(value: str | None) -> int | None:
    """A Last-Event-ID (or `after`) value: a non-negative integer; ValueError otherwise."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 18:
        raise ValueError(f"{value!r} is not an event id (a non-negative integer)")
    return int(text)


@dataclass(frozen=True)
class Message:
    data: str
    event: str = "message"
    id: str | None = None


class Parser:
    """Feed decoded lines (without their line ending); complete messages come back."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""
        self.last_id: str | None = None

    def feed(self, line: str) -> Message | None:
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self.last_id = value
        return None  # retry and unknown fields: nothing to do for this client

    def _dispatch(self) -> Message | None:
        if not self._data:
            self._event = ""
            return None
        message = Message("\n".join(self._data), self._event or "message", self.last_id)
        self._data = []
        self._event = ""
        return message
