"""HTTP-date parsing, strictly (RFC 9110 §5.6.7), table-driven."""

from __future__ import annotations

import calendar

import pytest

from plugins.cache.httpdate import parse_http_date

T = float(calendar.timegm((1994, 11, 6, 8, 49, 37)))
NOW_2026 = float(calendar.timegm((2026, 12, 2, 0, 0, 0)))


@pytest.mark.parametrize(("value", "expected"), [
    ("Sun, 06 Nov 1994 08:49:37 GMT", T),            # IMF-fixdate
    ("Sunday, 06-Nov-94 08:49:37 GMT", T),           # rfc850-date
    ("Sun Nov  6 08:49:37 1994", T),                 # asctime-date, day padded
    ("Sun Nov 06 08:49:37 1994", T),                 # asctime with two digits
    ("  Sun, 06 Nov 1994 08:49:37 GMT ", T),         # OWS around a field value
    ("Wed, 31 Dec 2025 23:59:60 GMT",                # a leap second: read as :59
     float(calendar.timegm((2025, 12, 31, 23, 59, 59)))),
])
def test_the_three_formats(value: str, expected: float) -> None:
    assert parse_http_date(value, now=NOW_2026) == expected


@pytest.mark.parametrize("value", [
    "Sun, 06 Nov 1994 08:49:37 UTC",      # only GMT
    "Sun, 06 Nov 1994 08:49:37 AEST",     # (email.utils reads it as local time)
    "Sun, 06 Nov 1994 08:49:37 +0000",
    "Sun, 06 Nov 94 08:49:37 GMT",        # two-digit year in IMF form
    "Sun 06 Nov 1994 08:49:37 GMT",       # missing comma
    "Sun,  06 Nov 1994 08:49:37 GMT",     # extra space
    "Sun, 06-Nov-1994 08:49:37 GMT",      # dashes in IMF form
    "Sun, 06 Nov 1994 08.49.37 GMT",      # dots in the time
    "Sun, 06 Nov 1994 8:49:37 GMT",       # one-digit hour
    "Sun, 31 Nov 1994 08:49:37 GMT",      # no such day
    "Sun, 06 Nov 1994 24:00:00 GMT",
    "Sun, 06 Nov 1994 08:60:00 GMT",
    "sun, 06 nov 1994 08:49:37 gmt",      # case-sensitive
    "0", "-1", "", "tomorrow",
])
def test_what_is_not_an_http_date(value: str) -> None:
    assert parse_http_date(value) is None


def test_rfc850_years_more_than_50_years_ahead_are_in_the_past() -> None:
    # §5.6.7: from 2026, "76" is 2076 (50 years ahead), "77" is 1977
    assert parse_http_date("Monday, 01-Jan-76 00:00:00 GMT", now=NOW_2026) == float(
        calendar.timegm((2076, 1, 1, 0, 0, 0)))
    assert parse_http_date("Saturday, 01-Jan-77 00:00:00 GMT", now=NOW_2026) == float(
        calendar.timegm((1977, 1, 1, 0, 0, 0)))
