"""RFC 9111 rules for a shared cache, as pure functions (no I/O, no clock of their
own): what may be stored, for how long it is fresh, how old a stored response is,
whether a request accepts it, how Vary keys it, and what an unsafe request
invalidates. Section numbers refer to RFC 9111 unless marked RFC 9110 or RFC 9213.

Targeted cache control (RFC 9213): `targeted` names fields such as
`CDN-Cache-Control`; the first one present with a valid, non-empty value replaces
Cache-Control *and* Expires for this cache's storing and freshness (§2.2). Dates are
read strictly (httpdate.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from plugins.cache.httpdate import parse_http_date

__all__ = [
    "HEURISTIC_STATUSES",
    "CacheControl",
    "Freshness",
    "accepts",
    "age_from",
    "age_inputs",
    "current_age",
    "freshness_lifetime",
    "invalidated_uris",
    "parse_cache_control",
    "request_accepts",
    "response_directives",
    "storable",
    "vary_key",
]

# RFC 9110 §15.1: status codes cacheable by default (heuristic freshness allowed).
HEURISTIC_STATUSES = frozenset({200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, 501})
# Status codes whose caching rules this cache implements (§3, §5.2.2.3 must-understand).
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | {302, 303, 307, 400, 403, 500, 502, 503, 504}
# RFC 9110 §9.2.1: every other method is unsafe or of unknown safety (§4.4).
_SAFE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_TOKEN = re.compile(r'\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^,\s]*))?\s*')

CacheControl = dict[str, str | None]


def parse_cache_control(values: Iterable[str]) -> CacheControl:
    """Directives of every Cache-Control field, names lower-cased (§5.2); quoted values
    unquoted. A directive repeated keeps its first value."""
    directives: CacheControl = {}
    for value in values:
        for part in _split_commas(value):
            match = _TOKEN.fullmatch(part)
            if not match:
                continue
            name, arg = match.group(1).lower(), match.group(2)
            if arg is not None and arg.startswith('"'):
                arg = re.sub(r"\\(.)", r"\1", arg[1:-1])
            directives.setdefault(name, arg)
    return directives


def _split_commas(value: str) -> list[str]:
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in value:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def _seconds(value: str | None) -> int | None:
    """A delta-seconds argument (§1.2.2); invalid means absent."""
    if value is None or not value.isdigit():
        return None
    return min(int(value), 2**31)


def _http_date(value: str | None) -> float | None:
    return parse_http_date(value)


def _combined(headers: Mapping[str, str] | Iterable[tuple[str, str]], name: str) -> str | None:
    """Every field line of `name` combined into one value (RFC 9110 §5.3), or None."""
    values = _get_all(headers, name)
    return ", ".join(values) if values else None


def response_directives(response_headers: Mapping[str, str],
                        targeted: tuple[str, ...] = ()) -> tuple[CacheControl, bool]:
    """The response's directives for this cache, and whether they came from a
    targeted field (RFC 9213 §2.2: the first listed field with a valid, non-empty
    value; then Cache-Control and Expires are ignored)."""
    for name in targeted:
        values = _get_all(response_headers, name.lower())
        if values:
            directives = parse_cache_control(values)
            if directives:
                return directives, True
    return parse_cache_control(_get_all(response_headers, "cache-control")), False


def _get(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _get_all(headers: Mapping[str, str] | Iterable[tuple[str, str]], name: str) -> list[str]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [v for k, v in items if k.lower() == name]


def storable(method: str, status: int, request_headers: Mapping[str, str],
             response_headers: Mapping[str, str], *, ignore_set_cookie: bool = False,
             heuristic: bool = True, targeted: tuple[str, ...] = ()) -> tuple[bool, str]:
    """(may a shared cache store this, why not) per §3 and §3.5; reasons are the
    Cache-Status `detail` values: method, status, no-store, private, authorization,
    set-cookie, vary-star, no-freshness."""
    if method != "GET":
        return False, "method"
    # §3: only a final status; 206 and 304 only if understood (this cache keeps whole
    # representations and makes 304s itself, so neither is stored).
    if status < 200 or status in (206, 304):
        return False, "status"
    req_cc = parse_cache_control(_get_all(request_headers, "cache-control"))
    resp_cc, from_target = response_directives(response_headers, targeted)
    understood = status in UNDERSTOOD_STATUSES
    if "must-understand" in resp_cc:
        # §5.2.2.3: only a cache that understands the status may store it, and that
        # cache ignores no-store.
        if not understood:
            return False, "status"
    elif "no-store" in resp_cc:
        return False, "no-store"
    if "no-store" in req_cc:
        return False, "no-store"
    if "private" in resp_cc:
        return False, "private"
    if _get(request_headers, "authorization") is not None and not (
            "public" in resp_cc or "s-maxage" in resp_cc or "must-revalidate" in resp_cc):
        return False, "authorization"  # §3.5
    if not ignore_set_cookie and _get(response_headers, "set-cookie") is not None:
        return False, "set-cookie"
    vary = _combined(response_headers, "vary")
    if vary is not None and "*" in [v.strip() for v in vary.split(",")]:
        return False, "vary-star"  # §4.1: never reusable without revalidation
    expires = not from_target and _get(response_headers, "expires") is not None
    explicit = "max-age" in resp_cc or "s-maxage" in resp_cc or "public" in resp_cc or expires
    validator = (_get(response_headers, "etag") is not None
                 or _get(response_headers, "last-modified") is not None)
    # §3: without explicit freshness, only a heuristically cacheable status may be
    # stored (to be revalidated by its validator, or heuristically fresh).
    heuristic_ok = status in HEURISTIC_STATUSES and (validator or (
        heuristic and _get(response_headers, "last-modified") is not None))
    if not (explicit or heuristic_ok):
        return False, "no-freshness"  # never a blanket default TTL
    return True, ""


@dataclass(frozen=True)
class Freshness:
    lifetime: float  # seconds (§4.2.1)
    heuristic: bool  # computed by the 10% rule (§4.2.2): warn-worthy, capped


def freshness_lifetime(response_headers: Mapping[str, str], *, heuristic: bool = True,
                       heuristic_cap: float = 86400.0, status: int = 200,
                       targeted: tuple[str, ...] = (),
                       received: float | None = None) -> Freshness:
    """s-maxage > max-age > Expires - Date > 10% of (Date - Last-Modified), capped.
    `received`: when the response arrived, the Date to use when its own is missing or
    invalid (§4.2.3 takes the time of receipt then; it must not make the response
    stale at once)."""
    cc, from_target = response_directives(response_headers, targeted)
    for directive in ("s-maxage", "max-age"):
        seconds = _seconds(cc.get(directive)) if directive in cc else None
        if seconds is not None:
            return Freshness(float(seconds), False)
        if directive in cc:
            return Freshness(0.0, False)  # invalid value: treat as stale (§4.2.1)
    date = _http_date(_get(response_headers, "date"))
    if date is None:
        date = received
    expires_lines = [] if from_target else _get_all(response_headers, "expires")
    if expires_lines:
        # §5.3: an invalid Expires, and more than one, mean "already expired"
        expires = _http_date(expires_lines[0]) if len(expires_lines) == 1 else None
        if expires is None or date is None:
            return Freshness(0.0, False)
        return Freshness(max(0.0, expires - date), False)
    modified = _http_date(_get(response_headers, "last-modified"))
    if heuristic and status in HEURISTIC_STATUSES and modified is not None and date is not None:
        return Freshness(min(heuristic_cap, max(0.0, (date - modified) / 10)), True)
    return Freshness(0.0, False)


def age_inputs(response_headers: Mapping[str, str]) -> tuple[float | None, int]:
    """(Date, Age) of a response as received, parsed once when it is stored (§4.2.3:
    the Age a cache upstream of us reported counts towards the stored age)."""
    return (_http_date(_get(response_headers, "date")),
            _seconds((_get(response_headers, "age") or "").strip()) or 0)


def current_age(response_headers: Mapping[str, str], request_time: float,
                response_time: float, now: float) -> float:
    """§4.2.3, with clocks as seconds since the epoch."""
    date, age_value = age_inputs(response_headers)
    return age_from(date, age_value, request_time, response_time, now)


def age_from(date: float | None, age_value: int, request_time: float, response_time: float,
             now: float) -> float:
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    response_delay = max(0.0, response_time - request_time)
    corrected_age_value = age_value + response_delay
    corrected_initial_age = max(apparent_age, corrected_age_value)
    return corrected_initial_age + max(0.0, now - response_time)


def request_accepts(request_headers: Mapping[str, str], age: float, lifetime: float,
                    response_headers: Mapping[str, str]) -> str:
    """What the request's directives (§5.2.1) allow for a stored response of this
    age: "fresh" (serve), "stale-ok" (serve stale, max-stale allows it),
    "revalidate" (ask the origin), or "only-if-cached" miss handling is left to the
    caller via the directive itself."""
    resp_cc = parse_cache_control(_get_all(response_headers, "cache-control"))
    return accepts(request_headers, age, lifetime, resp_cc)


def accepts(request_headers: Mapping[str, str], age: float, lifetime: float,
            resp_cc: CacheControl) -> str:
    """request_accepts() with the stored response's directives already parsed."""
    req_values = _get_all(request_headers, "cache-control")
    if not req_values and _get(request_headers, "pragma") is None:
        # the common request: no directives of its own
        if "no-cache" in resp_cc:
            return "revalidate"
        return "fresh" if age < lifetime else "revalidate"
    req_cc = parse_cache_control(req_values)
    if "no-cache" in req_cc or "no-cache" in resp_cc:
        return "revalidate"
    if _get(request_headers, "pragma") == "no-cache" and not req_values:
        return "revalidate"  # §5.4: Pragma only without Cache-Control
    max_age = _seconds(req_cc.get("max-age")) if "max-age" in req_cc else None
    if max_age is not None and age > max_age:
        return "revalidate"
    min_fresh = _seconds(req_cc.get("min-fresh")) or 0
    if age + min_fresh < lifetime:
        return "fresh"
    if "must-revalidate" in resp_cc or "proxy-revalidate" in resp_cc or "s-maxage" in resp_cc:
        return "revalidate"  # §5.2.2.2/§5.2.2.8/§5.2.2.10: never served stale
    if "max-stale" in req_cc:
        limit = _seconds(req_cc.get("max-stale"))
        if limit is None or age - lifetime <= limit:
            return "stale-ok"
    return "revalidate"


def _normalise(value: str) -> str:
    """A request field value for the Vary key: list members trimmed, empty members
    dropped, whitespace collapsed, lower-cased ("en-US,  fr" and "en-us, fr" match;
    member order is kept: it states a preference)."""
    members = (" ".join(m.split()).lower() for m in value.split(","))
    return ",".join(m for m in members if m)


def vary_key(response_headers: Mapping[str, str],
             request_headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """The secondary key (§4.1): the request's values of the fields the response
    varies on (every Vary line: RFC 9110 §5.3), normalised, in a stable order."""
    vary = _combined(response_headers, "vary")
    if not vary:
        return ""
    names = sorted({n.strip().lower() for n in vary.split(",") if n.strip()})
    return "\n".join(f"{name}:" + ",".join(_normalise(v) for v in _get_all(request_headers, name))
                     for name in names)


def invalidated_uris(method: str, status: int, request_uri: str,
                     response_headers: Mapping[str, str]) -> list[str]:
    """§4.4: a non-error response to an unsafe request — any method not known to be
    safe (RFC 9110 §9.2.1), so `M-SEARCH` too — invalidates its target URI and the
    same-origin Location / Content-Location URIs."""
    if method in _SAFE or not 200 <= status < 400:
        return []
    origin = urlsplit(request_uri)
    uris = [request_uri]
    for name in ("location", "content-location"):
        value = _get(response_headers, name)
        if not value:
            continue
        target = urlsplit(value)
        if not target.netloc:  # relative: resolve against the request's origin
            path = value if value.startswith("/") else "/" + value
            uris.append(f"{origin.scheme}://{origin.netloc}{path}")
        elif (target.scheme, target.netloc) == (origin.scheme, origin.netloc):
            uris.append(value)
    return list(dict.fromkeys(uris))
