"""`rewrite`: change the request before it is forwarded — its path by regular
expression with groups (beyond a route's `strip_prefix`), its Host, its query.

- `path = [{ match = "^/api/v1/(.*)$", replace = "/v1/$1" }, …]`: the first rule
  whose pattern matches the path (as received, percent-encoded, without the query)
  replaces it. RE2 patterns: linear time whatever the path (plugins/patterns.py).
- `host = "internal.example"`: the Host sent upstream (with the route's
  `pass_host`, the default; without it the backend's address is sent anyway).
- `query_set = { k = "v" }`, `query_remove = ["debug"]`: parameters replaced or
  added, and removed (every occurrence); other parameters keep their order and bytes.

A rewritten path must still begin with "/" (a rule that would make anything else is
answered 500 and logged: the config, not the client, is wrong).

    [[plugins]]
    name = "v1"
    use = "rewrite"
    options = { path = [{ match = "^/api/v1/(.*)$", replace = "/v1/$1" }] }
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from multidict import CIMultiDict

from plugins.patterns import Template, compile_pattern, compile_template
from proxy.plugin import Handler, ProxyRequest, ProxyResponse, refuse_unknown_options

__all__ = ["Rewrite"]

log = logging.getLogger("bascule.rewrite")

_OPTIONS = {"path", "host", "query_set", "query_remove"}


class Rewrite:
    def __init__(self, options: dict[str, Any]) -> None:
        refuse_unknown_options(options, _OPTIONS)
        rules = options.get("path", [])
        if not isinstance(rules, list):
            raise ValueError('path: must be a list of { match = "…", replace = "…" }')
        self.rules: list[tuple[Any, Template]] = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict) or set(rule) != {"match", "replace"}:
                raise ValueError(f'path: rule {i} must be {{ match = "…", replace = "…" }}')
            pattern = compile_pattern(f"path[{i}].match", rule["match"])
            self.rules.append((pattern, compile_template(f"path[{i}].replace",
                                                         rule["replace"], pattern)))
        host = options.get("host")
        if host is not None and (not isinstance(host, str) or not host
                                 or any(c in host for c in " \t\r\n\0/")):
            raise ValueError("host: must be a host name (and optional :port)")
        self.host: str | None = host
        query_set = options.get("query_set", {})
        if not isinstance(query_set, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in query_set.items()):
            raise ValueError('query_set: must be a table like { key = "value" }')
        self.query_set = {quote(k, safe=""): quote(v, safe="") for k, v in query_set.items()}
        query_remove = options.get("query_remove", [])
        if not isinstance(query_remove, list) or not all(
                isinstance(k, str) and k for k in query_remove):
            raise ValueError('query_remove: must be a list like ["debug"]')
        self.query_drop = {quote(k, safe="") for k in query_remove} | set(self.query_set)
        if not (self.rules or self.host or self.query_set or self.query_drop):
            raise ValueError("path: give path rules, host, query_set or query_remove")

    def rewrite_target(self, target: str) -> str | None:
        """The new request-target, or None when a rule made an invalid path."""
        path, sep, query = target.partition("?")
        for pattern, template in self.rules:
            match = pattern.search(path)
            if match is not None:
                path = template.expand(match)
                if not path.startswith("/"):
                    return None
                break
        if self.query_drop:
            kept = [p for p in query.split("&") if p and p.partition("=")[0]
                    not in self.query_drop] if query else []
            kept += [f"{k}={v}" for k, v in self.query_set.items()]
            query, sep = "&".join(kept), "?" if kept else ""
        return path + sep + query

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        target = self.rewrite_target(request.target)
        if target is None:
            log.error("rewrite on route %s made a path that does not begin with '/' "
                      "from %r; answering 500", request.route, request.target)
            body = b"rewrite made an invalid path\n"
            return ProxyResponse(500, CIMultiDict({"Content-Type": "text/plain"}), body,
                                 length=len(body))
        request.target = target
        if self.host is not None:
            request.headers["Host"] = self.host
        return await call_next(request)
