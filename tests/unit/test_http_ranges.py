"""The pure conditional-request and Range decisions of the http service (RFC 9110 13, 14)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from services.http.ranges import (
    MAX_RANGES,
    Outcome,
    Validators,
    evaluate,
    file_validators,
    http_date,
    multipart,
    parse_etags,
    parse_http_date,
    parse_range,
)

SIZE = 100
LM = 1_700_000_000
V = Validators('"abc-64"', LM)


def ev(method: str = "GET", **headers: str) -> Outcome:
    return evaluate(
        method, CIMultiDict((k.replace("_", "-"), x) for k, x in headers.items()), SIZE, V
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes=0-9", ((0, 9),)),
        ("bytes=0-9,20-29", ((0, 9), (20, 29))),
        ("BYTES = 0-9 , 20-29", None),  # no whitespace around '=' in ranges-specifier
        ("bytes=0-9 , 20-29", ((0, 9), (20, 29))),
        ("bytes=90-", ((90, 99),)),
        ("bytes=-10", ((90, 99),)),
        ("bytes=-1000", ((0, 99),)),
        ("bytes=50-1000", ((50, 99),)),
        ("bytes=0-" + "9" * 40, ((0, 99),)),  # a huge last-pos: to the end
        ("bytes=100-200", ()),  # unsatisfiable: 416
        ("bytes=-0", ()),
        ("bytes=100-200,0-0", ((0, 0),)),  # the satisfiable ones only
        ("items=0-9", None),  # unknown unit: ignored
        ("bytes=abc", None),
        ("bytes=9-3", None),  # last < first: invalid, ignored
        ("bytes=", None),
        ("bytes=,,", None),
        ("bytes=0-9,", ((0, 9),)),  # empty list elements are allowed by the # rule
        ("bytes=+1-2", None),
        ("bytes 0-9", None),
    ],
)
def test_parse_range(value: str, expected: tuple[tuple[int, int], ...] | None) -> None:
    assert parse_range(value, SIZE) == expected


def test_empty_body_has_no_satisfiable_range() -> None:
    assert parse_range("bytes=0-", 0) == ()
    assert parse_range("bytes=-5", 0) == ()


def test_multi_range_is_206_and_unknown_unit_is_200() -> None:
    assert ev(Range="bytes=0-9,20-29") == Outcome(206, ((0, 9), (20, 29)))
    assert ev(Range="items=0-9") == Outcome(200)
    assert ev(Range="bytes=200-") == Outcome(416)
    assert ev("HEAD", Range="bytes=0-9") == Outcome(206, ((0, 9),))  # HEAD mirrors GET
    assert ev("POST", Range="bytes=0-9") == Outcome(200)


def test_abusive_multi_ranges_get_the_whole_body() -> None:
    many = ",".join(f"{i}-{i}" for i in range(MAX_RANGES + 1))
    assert ev(Range=f"bytes={many}") == Outcome(200)
    assert ev(Range="bytes=0-99,0-99") == Outcome(200)  # more bytes than the body
    few = ",".join(f"{i}-{i}" for i in range(MAX_RANGES))
    assert ev(Range=f"bytes={few}").status == 206


def test_if_range_etag_and_date() -> None:
    assert ev(Range="bytes=0-9", If_Range='"abc-64"').status == 206
    assert ev(Range="bytes=0-9", If_Range='"old-64"') == Outcome(200)  # changed: whole
    assert ev(Range="bytes=0-9", If_Range='W/"abc-64"') == Outcome(200)  # weak never
    assert ev(Range="bytes=0-9", If_Range=http_date(LM)).status == 206
    assert ev(Range="bytes=0-9", If_Range=http_date(LM - 1)) == Outcome(200)
    assert ev(Range="bytes=0-9", If_Range=http_date(LM + 1)) == Outcome(200)  # exact only
    assert ev(Range="bytes=0-9", If_Range="yesterday") == Outcome(200)


def test_preconditions_in_rfc_order() -> None:
    assert ev(If_None_Match='"abc-64"') == Outcome(304)
    assert ev(If_None_Match='W/"abc-64"') == Outcome(304)  # weak comparison
    assert ev(If_None_Match='"x", "abc-64"') == Outcome(304)
    assert ev(If_None_Match="*") == Outcome(304)
    assert ev(If_None_Match='"x"') == Outcome(200)
    assert ev("HEAD", If_None_Match='"abc-64"') == Outcome(304)
    assert ev("POST", If_None_Match='"abc-64"') == Outcome(412)
    assert ev(If_Modified_Since=http_date(LM)) == Outcome(304)
    assert ev(If_Modified_Since=http_date(LM - 1)) == Outcome(200)
    assert ev(If_Modified_Since="not a date") == Outcome(200)
    # If-None-Match wins over If-Modified-Since (RFC 9110 13.2.2 step 3 before 4).
    assert ev(If_None_Match='"x"', If_Modified_Since=http_date(LM)) == Outcome(200)
    assert ev(If_Match='"abc-64"') == Outcome(200)
    assert ev(If_Match='W/"abc-64"') == Outcome(412)  # strong comparison
    assert ev(If_Match='"x"') == Outcome(412)
    assert ev(If_Match="*") == Outcome(200)
    assert ev(If_Unmodified_Since=http_date(LM - 1)) == Outcome(412)
    assert ev(If_Unmodified_Since=http_date(LM)) == Outcome(200)
    # A 304 comes before any Range.
    assert ev(If_None_Match='"abc-64"', Range="bytes=0-9") == Outcome(304)


def test_no_validators_no_conditions() -> None:
    """Generated responses without Last-Modified: a date condition does not apply."""
    headers = CIMultiDict({"If-Modified-Since": http_date(LM), "Range": "bytes=0-1"})
    headers["If-Range"] = http_date(LM)
    assert evaluate("GET", headers, SIZE, Validators('"h"')) == Outcome(200)


def test_dates() -> None:
    assert http_date(784111777) == "Sun, 06 Nov 1994 08:49:37 GMT"
    for text in (
        "Sun, 06 Nov 1994 08:49:37 GMT",
        "Sunday, 06-Nov-94 08:49:37 GMT",
        "Sun Nov  6 08:49:37 1994",
    ):
        assert parse_http_date(text) == 784111777
    assert parse_http_date("garbage") is None
    assert parse_http_date("Sun, 06 Nov 99999 08:49:37 GMT") is None
    assert parse_http_date("") is None


def test_last_modified_is_truncated_not_rounded_up() -> None:
    v = file_validators(1_700_000_000_900_000_000, 100)
    assert v.last_modified == 1_700_000_000
    assert v.etag == f'"{1_700_000_000_900_000_000:x}-64"'


def test_parse_etags() -> None:
    assert parse_etags('"a", W/"b" ,"c"') == [(False, '"a"'), (True, '"b"'), (False, '"c"')]
    assert parse_etags("*") == [(False, "*")]
    assert parse_etags("a") is None
    assert parse_etags('"a" junk') is None


def test_multipart_framing() -> None:
    parts, tail, total = multipart(((0, 9), (20, 29)), SIZE, "text/plain", "B")
    assert parts[0] == (
        b"\r\n--B\r\nContent-Type: text/plain\r\nContent-Range: bytes 0-9/100\r\n\r\n",
        0,
        9,
    )
    assert parts[1][0].endswith(b"Content-Range: bytes 20-29/100\r\n\r\n")
    assert tail == b"\r\n--B--\r\n"
    assert total == sum(len(h) + b - a + 1 for h, a, b in parts) + len(tail)
