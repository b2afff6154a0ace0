"""The text log cannot be forged (issue 14, item 10): control characters in what a
client sent (DHCP classes and hostnames, TFTP names, HTTP paths) are escaped, in the
message and in an exception's text, so one record is always one line plus indented
continuation lines."""

from __future__ import annotations

import json
import logging
import sys

from appliance.logs import JsonFormatter, TextFormatter, escape


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad name 'x\n12:00:00 ERROR   forged: yes'")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("tftp", logging.WARNING, __file__, 1, msg, args, exc_info)


def test_escape() -> None:
    assert escape("a\r\nb\x1b[31mc\x00\x7f\x85\u2028\td") == (
        "a\\r\\nb\\x1b[31mc\\x00\\x7f\\x85\\u2028\\td"
    )
    assert escape("plain é ü 日本") == "plain é ü 日本"


def test_text_formatter_keeps_one_record_per_line() -> None:
    text = TextFormatter().format(
        _record("refused %r to %s: %s", "a\nb", "10.0.0.1", "x\r\n12:00:00 ERROR forged\x1b[2J")
    )
    assert "\n" not in text and "\x1b" not in text and "\r" not in text
    assert "forged" in text  # escaped, not dropped


def test_exception_text_cannot_start_a_line() -> None:
    text = TextFormatter().format(_record("failed", exc=True))
    _first, *rest = text.split("\n")
    assert rest and all(line.startswith("  ") for line in rest), text
    assert not any(line.startswith("12:00:00") for line in text.split("\n"))


def test_json_formatter_is_one_line() -> None:
    out = JsonFormatter().format(_record("name %s", "a\nb\x1b", exc=True))
    assert "\n" not in out
    assert json.loads(out)["msg"] == "name a\nb\x1b"  # JSON keeps the data exact
