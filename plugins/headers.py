"""`headers`: set, add and remove request fields (before forwarding) and response
fields (before the client sees them), and a `security` preset for responses.

Values may use `${client}` (the address proxy/client_address.py resolves),
`${request_id}`, `${route}`, `${upstream}`, `${scheme}` and `${host}`; they are split
into literal and variable parts once, at load. Refused at load, naming the option:
a name that is not a field-name token, a value with CR, LF or NUL (it could split a
head), an unknown variable, and any hop-by-hop field (RFC 9110 §7.6.1: Connection,
Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade) or
Content-Length — framing is Bascule's.

`set` replaces every value of a field, `add` appends one, `remove` deletes all;
per direction they apply in that order: remove, set, add. The `security` preset sets,
when the backend did not: `X-Content-Type-Options: nosniff`,
`Referrer-Policy: strict-origin-when-cross-origin`, `X-Frame-Options: SAMEORIGIN`
(with `frame_ancestors`, a `Content-Security-Policy: frame-ancestors …` instead), and
`Strict-Transport-Security: max-age=63072000; includeSubDomains` on answers over TLS
only (a browser ignores it over plain HTTP, and a plain answer must not pin hosts).

    [[plugins]]
    name = "shape"
    use = "headers"
    [plugins.options]
    request_set = { "X-Request-Start" = "${request_id}", "X-Client" = "${client}" }
    response_remove = ["Server", "X-Powered-By"]
    security = true
"""

from __future__ import annotations

import re
from typing import Any

from multidict import CIMultiDict

from proxy.plugin import Handler, ProxyRequest, ProxyResponse, refuse_unknown_options

__all__ = ["Headers"]

_OPTIONS = {f"{side}_{verb}" for side in ("request", "response")
            for verb in ("set", "add", "remove")} | {"security", "frame_ancestors"}
_VARIABLES = {"client", "request_id", "route", "upstream", "scheme", "host"}
_FORBIDDEN = {"connection", "keep-alive", "proxy-connection", "te", "trailer",
              "transfer-encoding", "upgrade", "content-length"}
_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_VARIABLE = re.compile(r"\$\{([^}]*)\}")

Template = tuple[tuple[bool, str], ...]  # (is a variable, text)


def _name(option: str, name: Any) -> str:
    if not isinstance(name, str) or not _TOKEN.match(name):
        raise ValueError(f"{option}: {name!r} is not a header field name")
    if name.lower() in _FORBIDDEN:
        raise ValueError(f"{option}: {name} is hop-by-hop or framing, which Bascule "
                         "manages itself; it cannot be set or removed here")
    return name


def _template(option: str, name: str, value: Any) -> Template:
    if not isinstance(value, str):
        raise ValueError(f"{option}: the value of {name} must be a string")
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"{option}: the value of {name} contains CR, LF or NUL")
    parts: list[tuple[bool, str]] = []
    at = 0
    for match in _VARIABLE.finditer(value):
        if match.group(1) not in _VARIABLES:
            raise ValueError(f"{option}: unknown variable ${{{match.group(1)}}} in {name} "
                             f"(known: {', '.join(sorted(_VARIABLES))})")
        if match.start() > at:
            parts.append((False, value[at:match.start()]))
        parts.append((True, match.group(1)))
        at = match.end()
    if at < len(value):
        parts.append((False, value[at:]))
    return tuple(parts)


def _fields(options: dict[str, Any], option: str) -> tuple[tuple[str, Template], ...]:
    table = options.get(option, {})
    if not isinstance(table, dict):
        raise ValueError(f'{option}: must be a table like {{ "X-Name" = "value" }}')
    return tuple((_name(option, name), _template(option, name, value))
                 for name, value in table.items())


def _names(options: dict[str, Any], option: str) -> tuple[str, ...]:
    names = options.get(option, [])
    if not isinstance(names, list):
        raise ValueError(f'{option}: must be a list like ["Server"]')
    return tuple(_name(option, name) for name in names)


class Headers:
    def __init__(self, options: dict[str, Any]) -> None:
        refuse_unknown_options(options, _OPTIONS)
        self.request_remove = _names(options, "request_remove")
        self.request_set = _fields(options, "request_set")
        self.request_add = _fields(options, "request_add")
        self.response_remove = _names(options, "response_remove")
        self.response_set = _fields(options, "response_set")
        self.response_add = _fields(options, "response_add")
        security = options.get("security", False)
        if not isinstance(security, bool):
            raise ValueError("security: must be true or false")
        ancestors = options.get("frame_ancestors")
        if ancestors is not None:
            ancestors = _template("frame_ancestors", "frame-ancestors", ancestors)
        self.preset: tuple[tuple[str, str], ...] = ()
        if security:
            frame = (("Content-Security-Policy",
                      "frame-ancestors " + "".join(t for _, t in ancestors))
                     if ancestors else ("X-Frame-Options", "SAMEORIGIN"))
            self.preset = (("X-Content-Type-Options", "nosniff"),
                           ("Referrer-Policy", "strict-origin-when-cross-origin"), frame)
        self.hsts = security
        self.touches_response = bool(self.response_remove or self.response_set
                                     or self.response_add or security)

    @staticmethod
    def _value(template: Template, request: ProxyRequest) -> str:
        if len(template) == 1 and not template[0][0]:
            return template[0][1]
        out = []
        for is_variable, text in template:
            if not is_variable:
                out.append(text)
            elif text == "client":
                out.append(request.client)
            elif text == "request_id":
                out.append(request.request_id)
            elif text == "route":
                out.append(request.route)
            elif text == "upstream":
                out.append(request.upstream)
            elif text == "scheme":
                out.append(request.scheme)
            else:
                out.append(request.headers.get("Host", ""))
        # A variable's value comes from the request: never let it split a head.
        return "".join(out).replace("\r", " ").replace("\n", " ").replace("\0", " ")

    def _apply(self, headers: CIMultiDict[str], remove: tuple[str, ...],
               set_: tuple[tuple[str, Template], ...], add: tuple[tuple[str, Template], ...],
               request: ProxyRequest) -> None:
        for name in remove:
            headers.popall(name, None)
        for name, template in set_:
            headers[name] = self._value(template, request)
        for name, template in add:
            headers.add(name, self._value(template, request))

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        self._apply(request.headers, self.request_remove, self.request_set,
                    self.request_add, request)
        response = await call_next(request)
        if not self.touches_response:
            return response
        headers = response.headers
        self._apply(headers, self.response_remove, self.response_set, self.response_add,
                    request)
        for name, value in self.preset:
            headers.setdefault(name, value)
        if self.hsts and request.scheme == "https":
            headers.setdefault("Strict-Transport-Security",
                               "max-age=63072000; includeSubDomains")
        return response
