"""Plugins used by the suite (loaded by dotted path), written as a third party would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from multidict import CIMultiDict

from proxy.plugin import Handler, ProxyRequest, ProxyResponse


class Tag:
    """Adds a request header on the way in and appends its name to a response header
    on the way out, so a test sees the chain's order."""

    def __init__(self, options: dict[str, Any]) -> None:
        unknown = set(options) - {"label"}
        if unknown:
            raise ValueError(f"{sorted(unknown)[0]}: unknown option")
        label = options.get("label")
        if not isinstance(label, str) or not label:
            raise ValueError("label: must be a non-empty string")
        self.label = label

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        request.headers.add("X-Chain", self.label)
        response = await call_next(request)
        response.headers.add("X-Chain-Out", self.label)
        return response


class Deny:
    """Answers 403 itself for paths under `prefix`, never calling the backend."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.prefix = str(options.get("prefix", "/private"))

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        if request.target.startswith(self.prefix):
            return ProxyResponse(403, CIMultiDict({"Content-Type": "text/plain"}),
                                 b"denied\n", "Forbidden")
        return await call_next(request)


class Count:
    """Counts the body bytes streaming through, without buffering them (a tee)."""

    seen: list[int] = []

    def __init__(self, options: dict[str, Any]) -> None:
        pass

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        response = await call_next(request)
        body = response.body
        if isinstance(body, bytes):
            Count.seen.append(len(body))
            return response

        async def counted() -> AsyncIterator[bytes]:
            total = 0
            async for chunk in body:  # type: ignore[union-attr]
                total += len(chunk)
                yield chunk
            Count.seen.append(total)

        response.body = counted()
        return response


class MethodOverride:
    """Sends the method named in X-HTTP-Method-Override upstream instead of the
    client's (a common API-gateway rule), removing the field."""

    def __init__(self, options: dict[str, Any]) -> None:
        pass

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        override = request.headers.popone("X-HTTP-Method-Override", None)
        if override:
            request.method = override
        return await call_next(request)


class FailingStart:
    """A plugin whose start raises (say its auth server is down); counts closes."""

    closed = 0

    def __init__(self, options: dict[str, Any]) -> None:
        pass

    async def start(self, context: Any) -> None:
        raise RuntimeError("cannot reach the auth server")

    async def aclose(self) -> None:
        FailingStart.closed += 1

    async def __call__(self, request: ProxyRequest, call_next: Handler) -> ProxyResponse:
        return await call_next(request)
