"""The one error tree. Each class carries the HTTP status a client sees for it;
aiohttp/asyncio exceptions are translated into these at the forwarding boundary."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AmbiguousPath",
    "BadRequestBody",
    "BasculeError",
    "BodyTooLarge",
    "ClientBodyTimeout",
    "ClientGone",
    "ConfigError",
    "ConfigProblem",
    "NoBackendError",
    "NoRouteError",
    "PluginError",
    "UpstreamBusy",
    "UpstreamConnectError",
    "UpstreamInvalidResponse",
    "UpstreamProtocolError",
    "UpstreamTimeout",
]


class BasculeError(Exception):
    status = 500
    public_message = "internal error"


class NoRouteError(BasculeError):
    status = 404
    public_message = "no route for this request"


class AmbiguousPath(BasculeError):
    """Readings of the request path that backends may apply route differently
    (proxy/pathnorm.py): refused rather than guessed."""

    status = 400
    public_message = "ambiguous request path"


class NoBackendError(BasculeError):
    status = 503
    public_message = "no backend available"


class UpstreamConnectError(BasculeError):
    status = 502
    public_message = "could not connect to any backend"


class UpstreamProtocolError(BasculeError):
    """The backend broke the connection or sent something that is not HTTP/1.1."""

    status = 502
    public_message = "bad response from backend"


class UpstreamInvalidResponse(UpstreamProtocolError):
    """The backend's response is malformed or over a limit (head size, field count):
    answered 502, the connection closed, and counted per backend."""


class UpstreamTimeout(BasculeError):
    status = 504
    public_message = "backend timed out"


class BodyTooLarge(BasculeError):
    status = 413
    public_message = "request body too large"


class ClientBodyTimeout(BasculeError):
    status = 408
    public_message = "request body timed out"


class BadRequestBody(BasculeError):
    """The request body broke off or its chunked framing is invalid."""

    status = 400
    public_message = "bad request body"


class ClientGone(BasculeError):
    """The client disconnected or sent a broken body: nobody to answer."""

    status = 499


class UpstreamBusy(BasculeError):
    """max_inflight reached: answered at once rather than queued."""

    status = 503
    public_message = "upstream at capacity"


class PluginError(BasculeError):
    status = 500
    public_message = "plugin error"


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with one config file, printed as `FILE: key.path: message`."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.message}" if self.path else (
            f"{self.file}: {self.message}"
        )


class ConfigError(BasculeError):
    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
