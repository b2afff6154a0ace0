"""Logging: readable lines by default, one JSON object per line for journald/containers."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

# Attributes every LogRecord has; anything else was passed through `extra=` and is data.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


# C0 and C1 controls, DEL and the Unicode line breaks: what a terminal or a log reader
# would take as the end of a line or a command. Clients choose much of what is logged
# (DHCP classes and hostnames, TFTP names, HTTP paths): a record stays one line.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_one(match: re.Match[str]) -> str:
    ch = match.group()
    return _NAMED.get(ch) or (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")


def escape(text: str) -> str:
    """`text` with every control character written as a backslash escape."""
    return _CONTROL.sub(_escape_one, text)


class TextFormatter(logging.Formatter):
    """One line per record; an exception's or stack's lines follow, indented, so no
    continuation line can pass for a record of its own."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        for block in (record.exc_text, record.stack_info and self.formatStack(record.stack_info)):
            if block:
                text += "".join("\n  " + escape(line) for line in block.splitlines())
        return text


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is noisy at info; services log what matters themselves.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def fields(
    *, node: str | None = None, mac: str | None = None, ip: object | None = None
) -> dict[str, str]:
    """Structured fields for a node-related line (`extra=`): with `--log-format json` they
    are keys of their own, so a log pipeline can select one machine's lines; the text
    format leaves them out (the message already names the node)."""
    out: dict[str, str] = {}
    if node:
        out["node"] = node
    if mac:
        out["mac"] = mac
    if ip is not None and ip != "":
        out["ip"] = str(ip)
    return out
