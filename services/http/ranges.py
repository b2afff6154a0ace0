"""Conditional requests and byte ranges (RFC 9110 sections 13 and 14), sans-IO.

Plain functions over header values, a body size and the body's validators (ETag,
Last-Modified): what to answer (200, 206 with which ranges, 304, 412, 416) and the
multipart/byteranges framing. The http service's file and generated responses use them;
nothing here reads a clock, a file or a socket.

Where RFC 9110 leaves a choice, nginx's is taken: HEAD mirrors GET (a Range gives 206
headers), a multi-range request whose ranges add up to more than the body is answered
with the whole body, as is one with more than MAX_RANGES ranges (the "Apache killer"
request asks for thousands of overlapping ranges). Unlike nginx, a Range that is not
valid bytes syntax is ignored (200) rather than refused (416), as RFC 9110 14.2 allows:
a download tool that sent garbage still gets the file.
"""

from __future__ import annotations

import calendar
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_tz

MAX_RANGES = 16
_INT_RANGE = re.compile(r"(\d{1,19})-(\d*)")
_SUFFIX_RANGE = re.compile(r"-(\d{1,19})")
_ETAG = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


@dataclass(frozen=True)
class Validators:
    """What identifies one version of a body."""

    etag: str | None = None  # strong, quoted: '"5f1-64"'
    last_modified: int | None = None  # whole seconds since the epoch, as sent


@dataclass(frozen=True)
class Outcome:
    status: int  # 200, 206, 304, 412 or 416
    # 206: (first, last) byte positions, inclusive, in the order asked; one means no multipart.
    ranges: tuple[tuple[int, int], ...] = ()


def http_date(seconds: int) -> str:
    """IMF-fixdate: 'Sun, 06 Nov 1994 08:49:37 GMT'."""
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(seconds))


def parse_http_date(text: str | None) -> int | None:
    """Seconds since the epoch of an HTTP-date (any of the three forms), or None."""
    if not text:
        return None
    parts = parsedate_tz(text)
    if parts is None or not 1970 <= parts[0] <= 9999:
        return None
    try:
        return calendar.timegm(parts[:9]) - (parts[9] or 0)
    except (ValueError, OverflowError):
        return None


def file_validators(mtime_ns: int, size: int) -> Validators:
    """A file's ETag and Last-Modified. The ETag keeps the nanoseconds (a file rewritten in
    the same second is a new version); Last-Modified is truncated to the second, as
    nginx does: rounding up would announce a time the file has not reached yet."""
    return Validators(f'"{mtime_ns:x}-{size:x}"', mtime_ns // 1_000_000_000)


def parse_etags(value: str) -> list[tuple[bool, str]] | None:
    """The entity-tags of an If-Match / If-None-Match list as (weak, opaque-tag); `*` is
    [(False, "*")]; None when the list is not valid (the header is then ignored)."""
    if value.strip() == "*":
        return [(False, "*")]
    tags: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(value):
        if value[pos] in " \t,":
            pos += 1
            continue
        match = _ETAG.match(value, pos)
        if match is None:
            return None
        tags.append((match.group(1) is not None, match.group(2)))
        pos = match.end()
    return tags or None


def _matches(tags: list[tuple[bool, str]], etag: str | None, *, strong: bool) -> bool:
    if tags == [(False, "*")]:
        return True  # the representation exists
    if etag is None:
        return False
    return any(tag == etag and not (strong and weak) for weak, tag in tags)


def parse_range(value: str, size: int) -> tuple[tuple[int, int], ...] | None:
    """The satisfiable byte ranges of a Range value: a tuple (empty: none satisfiable,
    416), or None when the header is to be ignored (another unit, not valid syntax)."""
    unit, eq, spec = value.partition("=")
    if not eq or unit.lower() != "bytes":  # unit names are case-insensitive
        return None
    out: list[tuple[int, int]] = []
    seen = 0
    for item in spec.split(","):
        item = item.strip(" \t")
        if not item:
            continue
        seen += 1
        if (m := _INT_RANGE.fullmatch(item)) is not None:
            first = int(m.group(1))
            digits = m.group(2)
            # A last-pos too long to be a position means "to the end" (and keeps int()
            # away from thousands of digits).
            last = None if not digits or len(digits) > 19 else int(digits)
            if last is not None and last < first:
                return None  # invalid (RFC 9110 14.1.1): ignore the whole header
            if first < size:
                out.append((first, size - 1 if last is None else min(last, size - 1)))
        elif (m := _SUFFIX_RANGE.fullmatch(item)) is not None:
            length = int(m.group(1))
            if length > 0 and size > 0:
                out.append((max(0, size - length), size - 1))
        else:
            return None
    if seen == 0:
        return None
    return tuple(out)


def evaluate(method: str, headers: Mapping[str, str], size: int, v: Validators) -> Outcome:
    """RFC 9110 13.2.2: the preconditions in order, then Range (with If-Range)."""
    get_or_head = method in ("GET", "HEAD")
    if_match = headers.get("If-Match")
    if if_match is not None:
        tags = parse_etags(if_match)
        if tags is not None and not _matches(tags, v.etag, strong=True):
            return Outcome(412)
    else:
        since = parse_http_date(headers.get("If-Unmodified-Since"))
        if since is not None and v.last_modified is not None and v.last_modified > since:
            return Outcome(412)
    if_none_match = headers.get("If-None-Match")
    if if_none_match is not None:
        tags = parse_etags(if_none_match)
        if tags is not None and _matches(tags, v.etag, strong=False):
            return Outcome(304 if get_or_head else 412)
    elif get_or_head:
        since = parse_http_date(headers.get("If-Modified-Since"))
        if since is not None and v.last_modified is not None and v.last_modified <= since:
            return Outcome(304)
    wanted = headers.get("Range")
    if wanted is None or not get_or_head or not _if_range(headers.get("If-Range"), v):
        return Outcome(200)
    ranges = parse_range(wanted, size)
    if ranges is None:
        return Outcome(200)
    if not ranges:
        return Outcome(416)
    if len(ranges) > 1 and (len(ranges) > MAX_RANGES or sum(b - a + 1 for a, b in ranges) > size):
        return Outcome(200)  # cheaper and no less correct than what was asked
    return Outcome(206, ranges)


def _if_range(value: str | None, v: Validators) -> bool:
    """True when a Range may be honoured: no If-Range, or it names the current version
    (an ETag by strong comparison; a date only when it equals Last-Modified exactly)."""
    if value is None:
        return True
    text = value.strip()
    if text.startswith(('"', "W/")):
        tags = parse_etags(text)
        return tags is not None and len(tags) == 1 and _matches(tags, v.etag, strong=True)
    date = parse_http_date(text)
    return date is not None and v.last_modified is not None and date == v.last_modified


def content_range(first: int, last: int, size: int) -> str:
    return f"bytes {first}-{last}/{size}"


def multipart(
    ranges: tuple[tuple[int, int], ...], size: int, content_type: str, boundary: str
) -> tuple[list[tuple[bytes, int, int]], bytes, int]:
    """multipart/byteranges framing (RFC 9110 14.6): each part's head with its range,
    the closing delimiter, and the whole body's length (its Content-Length)."""
    parts: list[tuple[bytes, int, int]] = []
    total = 0
    for first, last in ranges:
        head = (
            f"\r\n--{boundary}\r\nContent-Type: {content_type}\r\n"
            f"Content-Range: {content_range(first, last, size)}\r\n\r\n"
        ).encode("latin-1")
        parts.append((head, first, last))
        total += len(head) + last - first + 1
    tail = f"\r\n--{boundary}--\r\n".encode("latin-1")
    return parts, tail, total + len(tail)
