"""HTTP-date, strictly (RFC 9110 §5.6.7): the three formats a recipient must accept,
and nothing else.

    IMF-fixdate   Sun, 06 Nov 1994 08:49:37 GMT      (the one senders must use)
    rfc850-date   Sunday, 06-Nov-94 08:49:37 GMT     (obsolete)
    asctime-date  Sun Nov  6 08:49:37 1994           (obsolete; the day padded by a space)

Times are UTC ("GMT" is the only zone allowed, and asctime has none). Fields are
fixed-width digits (a one-digit hour is invalid), single spaces, a comma where the
format has one; the day must exist in its month; a second of 60 (a leap second) is
read as 59. An rfc850 two-digit year that would lie more than 50 years in the future
is the most recent past year with those digits (§5.6.7). What
`email.utils.parsedate_to_datetime` also accepts — other zones (`UTC`, `AEST` read as
local time), two-digit years in IMF form, missing commas, extra spaces — is invalid
here, and the caller decides what invalid means (an invalid Expires: already
expired, RFC 9111 §5.3).
"""

from __future__ import annotations

import calendar
import re
import time

__all__ = ["parse_http_date"]

_DAY = r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_DAY_LONG = r"(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTH = r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
_TIME = r"(\d{2}):(\d{2}):(\d{2})"
_IMF = re.compile(rf"{_DAY}, (\d{{2}}) {_MONTH} (\d{{4}}) {_TIME} GMT")
_RFC850 = re.compile(rf"{_DAY_LONG}, (\d{{2}})-{_MONTH}-(\d{{2}}) {_TIME} GMT")
_ASCTIME = re.compile(rf"{_DAY} {_MONTH} (\d{{2}}| \d) {_TIME} (\d{{4}})")
_MONTHS = {m: i for i, m in enumerate(
    ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"], 1)}


def parse_http_date(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds since the epoch, or None when `value` is not an HTTP-date."""
    if not value:
        return None
    text = value.strip(" \t")  # field values are trimmed of optional whitespace only
    match = _IMF.fullmatch(text)
    if match:
        day, month, year, hour, minute, second = match.groups()
        return _timestamp(int(year), month, int(day), hour, minute, second)
    match = _ASCTIME.fullmatch(text)
    if match:
        month, day, hour, minute, second, year = match.groups()
        return _timestamp(int(year), month, int(day.strip()), hour, minute, second)
    match = _RFC850.fullmatch(text)
    if match:
        day, month, yy, hour, minute, second = match.groups()
        this_year = time.gmtime(time.time() if now is None else now).tm_year
        year = this_year - this_year % 100 + int(yy)
        if year > this_year + 50:
            year -= 100
        return _timestamp(year, month, int(day), hour, minute, second)
    return None


def _timestamp(year: int, month_name: str, day: int, hour_s: str, minute_s: str,
               second_s: str) -> float | None:
    month = _MONTHS[month_name]
    hour, minute, second = int(hour_s), int(minute_s), int(second_s)
    if not (year >= 1 and 1 <= day <= calendar.monthrange(year, month)[1] and hour <= 23
            and minute <= 59 and second <= 60):
        return None
    return float(calendar.timegm((year, month, day, hour, minute, min(second, 59))))
