"""The dashboard's files, read once from package data, and the headers they are
served with.

The Content-Security-Policy allows this origin's script, style and fetches and
nothing else: no inline script or style (the page has no inline handlers), no
framing, no form posts. https://developer.mozilla.org/en-US/docs/Web/HTTP/CSP
"""

from __future__ import annotations

import hashlib
from importlib import resources

from aiohttp import web

__all__ = ["ASSETS", "SECURITY_HEADERS", "asset_response"]

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

_TYPES = {"html": "text/html; charset=utf-8", "js": "text/javascript; charset=utf-8",
          "css": "text/css; charset=utf-8", "svg": "image/svg+xml"}
_PATHS = {"/": "index.html", "/dashboard/app.js": "app.js", "/dashboard/app.css": "app.css",
          "/favicon.ico": "icon.svg"}


def _load() -> dict[str, tuple[bytes, str, str]]:
    static = resources.files("proxy.dashboard") / "static"
    assets = {}
    for path, name in _PATHS.items():
        body = (static / name).read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        assets[path] = (body, _TYPES[name.rsplit(".", 1)[1]], etag)
    return assets


ASSETS = _load()


def asset_response(request: web.BaseRequest) -> web.Response | None:
    """The file at the request's path, or None when the path is not one of them."""
    asset = ASSETS.get(request.path)
    if asset is None:
        return None
    body, content_type, etag = asset
    headers = {**SECURITY_HEADERS, "Content-Type": content_type, "ETag": etag,
               "Cache-Control": "no-cache"}  # revalidated: an upgrade shows at once
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=body if request.method != "HEAD" else None, headers=headers)
