"""The readings of a request path that routing must agree on (pure).

A path-prefix route protects nothing if a spelling of its prefix can miss it, so
routes are matched on normalised paths, never on the raw bytes (the raw bytes are
still what is forwarded, unless a route opts into `normalise_path`). Backends do not
all normalise alike, so one normal form is not enough; each function here is one
reading a real backend may apply:

- `rfc3986`: RFC 3986 §6.2.2 — percent-encoded unreserved characters decoded
  (`%61` → `a`, `%2E` → `.`), then dot segments removed (§5.2.4). `%2F`, `//` and
  `;` are data. What a strict URI library does.
- `decoded`: nginx's location matching (`merge_slashes on`): every percent-encoding
  decoded, `//` merged, dot segments removed — plus `\\` as a separator, as IIS and
  some frameworks read it.
- `no_params`: Tomcat/Jetty: `;params` cut from each segment before dot segments are
  removed (`/public/..;/admin` is `/admin` there: a classic bypass of front proxies).

`readings(path)` gives the distinct results; routing picks a route only when every
reading picks the same one, and answers 400 otherwise (`/admin/..%2Fpublic`,
`//admin`, `/public/..;/admin` would each reach one backend reading through the
other's route). A path with nothing to normalise (no `%`, `\\`, `;`, `//` or dot
segment) has one reading, itself, found with a few substring tests: the common case
costs no allocation.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["needs_normalising", "normal_form", "readings", "remove_dot_segments"]

# RFC 3986 §2.3 unreserved characters
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_SLASHES = re.compile(r"/{2,}")
_PARAMS = re.compile(r";[^/]*")


def needs_normalising(path: str) -> bool:
    """False for a path every reading leaves as it is."""
    return ("%" in path or "/." in path or "//" in path or "\\" in path or ";" in path
            or path.startswith("."))


def remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, on a path that starts with "/" (the result does too)."""
    out: list[str] = []
    segments = path.split("/")
    for i, seg in enumerate(segments[1:], 1):
        last = i == len(segments) - 1
        if seg == "..":
            if len(out) > 0:
                out.pop()
            if last:
                out.append("")
        elif seg == ".":
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _decode_unreserved(path: str) -> str:
    def one(m: re.Match[str]) -> str:
        char = chr(int(m.group(1), 16))
        return char if char in _UNRESERVED else "%" + m.group(1).upper()
    return _PERCENT.sub(one, path)


def rfc3986(path: str) -> str:
    return remove_dot_segments(_decode_unreserved(path))


def decoded(path: str) -> str:
    text = unquote(path, encoding="utf-8", errors="surrogateescape").replace("\\", "/")
    return remove_dot_segments(_SLASHES.sub("/", text))


def no_params(path: str) -> str:
    return remove_dot_segments(_PARAMS.sub("", _decode_unreserved(path)))


def readings(path: str) -> tuple[str, ...]:
    """The distinct readings of `path` (the path part of a target, starting with
    "/"); one element when there is nothing to normalise."""
    if not needs_normalising(path):
        return (path,)
    first = rfc3986(path)
    out = [first]
    for reading in (decoded(path), no_params(path)):
        if reading not in out:
            out.append(reading)
    return tuple(out)


def normal_form(path: str) -> str:
    """What a route forwards with `normalise_path`: the RFC 3986 reading with `//`
    merged (percent-encodings other than unreserved characters are kept, so `%2F`
    stays data)."""
    if not needs_normalising(path):
        return path
    return _SLASHES.sub("/", rfc3986(path))
