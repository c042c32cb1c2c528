"""`redirect`: answer with a redirect instead of forwarding — by regular expression
with groups, or from plain HTTP to HTTPS.

- `rules = [{ match = "^/docs/(.*)$", to = "https://docs.example.com/$1",
  status = 301 }, …]`: the first rule whose pattern matches the path (as received,
  without the query) answers `status` (301, 302, 303, 307 or 308; default 302) with
  `Location` = `to` with its groups filled in, plus the original query unless
  `keep_query = false` on the rule. RE2 patterns: linear time whatever the path.
- `https = true`: a request that came over plain HTTP is answered 308 (the method
  and body are kept, RFC 9110 §15.4.9) with the same URL over https; `https_port`
  when the TLS listener is not on 443.

    [[plugins]]
    name = "moved"
    use = "redirect"
    options = { https = true, rules = [{ match = "^/old/(.*)$", to = "/new/$1", status = 301 }] }
"""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict

from plugins.patterns import Template, compile_pattern, compile_template
from proxy.plugin import Handler, ProxyRequest, ProxyResponse, refuse_unknown_options

__all__ = ["Redirect"]

_OPTIONS = {"rules", "https", "https_port"}
_STATUSES = {301, 302, 303, 307, 308}


def _without_port(host: str) -> str:
    if host.startswith("["):  # an IPv6 literal
        return host[:host.find("]") + 1] if "]" in host else ""
    return host.rpartition(":")[0] if ":" in host else host


class Redirect:
    def __init__(self, options: dict[str, Any]) -> None:
        refuse_unknown_options(options, _OPTIONS)
        rules = options.get("rules", [])
        if not isinstance(rules, list):
            raise ValueError('rules: must be a list of { match = "…", to = "…" }')
        self.rules: list[tuple[Any, Template, int, bool]] = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict) or not {"match", "to"} <= set(rule) or \
                    not set(rule) <= {"match", "to", "status", "keep_query"}:
                raise ValueError(f'rules: rule {i} must be {{ match = "…", to = "…", '
                                 "status = 301, keep_query = true }")
            pattern = compile_pattern(f"rules[{i}].match", rule["match"])
            status = rule.get("status", 302)
            if status not in _STATUSES:
                raise ValueError(f"rules[{i}].status: must be one of "
                                 f"{', '.join(map(str, sorted(_STATUSES)))}")
            keep = rule.get("keep_query", True)
            if not isinstance(keep, bool):
                raise ValueError(f"rules[{i}].keep_query: must be true or false")
            self.rules.append((pattern, compile_template(f"rules[{i}].to", rule["to"],
                                                         pattern), status, keep))
        self.https = options.get("https", False)
        if not isinstance(self.https, bool):
            raise ValueError("https: must be true or false")
        port = options.get("https_port", 443)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError("https_port: must be a port number")
        self.https_port = port
        if not self.rules and not self.https:
            raise ValueError("rules: give rules, or https = true")

    def location(self, request: ProxyRequest) -> tuple[int, str] | None:
        path, _, query = request.target.partition("?")
        if self.https and request.scheme != "https":
            host = _without_port(request.headers.get("Host", ""))
            if not host:
                return None
            authority = host if self.https_port == 443 else f"{host}:{self.https_port}"
            return 308, f"https://{authority}{request.target}"
        for pattern, template, status, keep in self.rules:
            match = pattern.search(path)
            if match is not None:
                location = template.expand(match)
                if keep and query:
                    location += ("&" if "?" in location else "?") + query
                return status, location
        return None

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        found = self.location(request)
        if found is None:
            return await call_next(request)
        status, location = found
        body = f"{location}\n".encode("latin-1", "replace")
        return ProxyResponse(status, CIMultiDict({
            "Location": location, "Content-Type": "text/plain; charset=utf-8"}), body,
            length=len(body))
