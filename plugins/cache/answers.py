"""What the cache answers from a stored entry, and the small pieces of its answers:
a hit (with Age, RFC 9211 Cache-Status, a 304 for a client's matching conditional,
a 206/416 for a range), the conditional request that revalidates an entry, and the
504 of only-if-cached."""

from __future__ import annotations

import dataclasses

from multidict import CIMultiDict

from plugins.cache.httpdate import parse_http_date
from plugins.cache.policy import parse_cache_control
from plugins.cache.ranges import RangeAnswer, answer_range
from plugins.cache.store import Entry
from proxy.plugin import ProxyRequest, ProxyResponse

__all__ = ["add_status", "conditional_copy", "gateway_timeout", "mark", "not_modified",
           "plain_request", "ranged", "serve"]


def serve(request: ProxyRequest, entry: Entry, age: float, status: str) -> ProxyResponse:
    """A stored entry as the answer to `request`: `status` is its Cache-Status."""
    headers: CIMultiDict[str] = CIMultiDict(entry.headers)
    headers["Age"] = str(int(age))
    add_status(headers, f"bascule; {status}")
    if ("If-None-Match" in request.headers or "If-Modified-Since" in request.headers) \
            and not_modified(request.headers, headers):
        return ProxyResponse(304, CIMultiDict(
            (k, v) for k, v in headers.items()
            if k.lower() not in ("content-type", "content-encoding", "content-language",
                                 "content-length")),
            b"", "Not Modified")
    range_header = request.headers.get("Range")
    if range_header is not None and request.method == "GET" and entry.status == 200:
        answer = answer_range(range_header, request.headers.get("If-Range"), entry)
        if answer is not None:
            return ranged(headers, entry, answer)
    return ProxyResponse(entry.status, headers, entry.body, entry.reason, len(entry.body))


def plain_request(headers: CIMultiDict[str]) -> bool:
    """No request directive that would forbid a stale answer (no-cache, max-age...)."""
    if "Cache-Control" not in headers and "Pragma" not in headers:
        return True
    cc = parse_cache_control(headers.getall("Cache-Control", []))
    return not ({"no-cache", "max-age", "min-fresh"} & cc.keys()) and (
        headers.get("Pragma") != "no-cache" or bool(cc))


def conditional_copy(request: ProxyRequest, stored: CIMultiDict[str]) -> ProxyRequest:
    """The request to revalidate with: the stored validators instead of the client's
    (the client's conditionals are answered by us from the refreshed entry)."""
    headers = request.headers.copy()
    for header, source in (("If-None-Match", "ETag"), ("If-Modified-Since", "Last-Modified")):
        headers.popall(header, None)
        if source in stored:
            headers[header] = stored[source]
    headers.popall("Range", None)
    headers.popall("If-Range", None)
    return dataclasses.replace(request, headers=headers)


def ranged(headers: CIMultiDict[str], entry: Entry, answer: RangeAnswer) -> ProxyResponse:
    headers.popall("Content-Length", None)
    if answer.status == 416:
        headers.popall("Content-Type", None)
        headers["Content-Range"] = f"bytes */{len(entry.body)}"
        return ProxyResponse(416, headers, b"", "Range Not Satisfiable", 0)
    headers["Content-Range"] = f"bytes {answer.start}-{answer.end}/{len(entry.body)}"
    part = entry.body[answer.start:answer.end + 1]
    return ProxyResponse(206, headers, part, "Partial Content", len(part))


def add_status(headers: CIMultiDict[str], value: str) -> None:
    # RFC 9211: caches append themselves, the one nearest the client last
    existing = headers.get("Cache-Status")
    headers["Cache-Status"] = f"{existing}, {value}" if existing else value


def mark(response: ProxyResponse, status: str) -> ProxyResponse:
    add_status(response.headers, f"bascule; {status}")
    return response


def gateway_timeout(detail: str) -> ProxyResponse:
    headers: CIMultiDict[str] = CIMultiDict({"Content-Type": "text/plain"})
    add_status(headers, f"bascule; fwd=miss; detail={detail}")
    return ProxyResponse(504, headers, b"not in cache\n", "Gateway Timeout")


def _strip_weak(tag: str) -> str:
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def not_modified(request_headers: CIMultiDict[str], headers: CIMultiDict[str]) -> bool:
    """RFC 9110 §13.1.2/§13.1.3 for a client's conditional GET on a stored response."""
    inm = request_headers.get("If-None-Match")
    etag = headers.get("ETag")
    if inm is not None:
        if etag is None:
            return False
        return inm.strip() == "*" or _strip_weak(etag) in {_strip_weak(t) for t in inm.split(",")}
    # §13.1.3: an If-Modified-Since that is not a valid HTTP-date is ignored
    since = parse_http_date(request_headers.get("If-Modified-Since"))
    modified = parse_http_date(headers.get("Last-Modified"))
    return since is not None and modified is not None and modified <= since
