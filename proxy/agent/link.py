"""A worker's end of the hub: subscriptions by key, fanned out to the runtimes that
asked (two during a reload), remembered so that they can be sent again.

`SocketLink` talks to the agent process over its Unix socket and reconnects when the
agent restarts: it sends every subscription again, and the agent answers with the
current state, so a restarted agent (or worker) is current at once. While it is
away, the worker serves what it last knew. `LocalLink` talks to a Hub in the same
process (one unsupervised worker, tests); replies are delivered on the next loop
iteration, never inside the caller, exactly as from a socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from proxy.agent.hub import Hub
from proxy.agent.wire import Message, encode, read_message

__all__ = ["AGENT_SOCKET_ENV", "Link", "Listener", "LocalLink", "SocketLink"]

log = logging.getLogger("bascule.agent")

AGENT_SOCKET_ENV = "BASCULE_AGENT_SOCKET"
Listener = Callable[[Message], None]


class Link:
    def __init__(self) -> None:
        self._watch_specs: dict[str, Any] = {}
        self._watchers: dict[str, list[Listener]] = {}
        self._last: dict[str, Message] = {}  # last backends message per watch key
        self._health: dict[str, tuple[Any, list[Any], Listener]] = {}
        self._outlier_specs: dict[str, Any] = {}
        self._outlier_listeners: dict[str, list[Listener]] = {}
        self._fresh: list[Listener] = []
        # The operator's drains as the agent last sent them; sent back to the agent
        # on every connect, so an agent restart does not forget them.
        self.drained: frozenset[tuple[str, str]] = frozenset()
        self._drain_listeners: list[Listener] = []
        # asks for the dashboard's traffic, answered in order by the agent
        self._traffic_asks: deque[asyncio.Future[Any]] = deque()

    def _send(self, message: Message) -> None:
        raise NotImplementedError

    # -- subscriptions ------------------------------------------------------------------

    def watch(self, items: list[tuple[str, Any, Listener]]) -> None:
        """Subscribe `listener` to Consul watch `key` (spec: wire.py). A key already
        answered is delivered at once."""
        new = []
        loop = asyncio.get_running_loop()
        for key, spec, listener in items:
            if key not in self._watchers:
                self._watch_specs[key] = spec
                new.append([key, spec])
            self._watchers.setdefault(key, []).append(listener)
            last = self._last.get(key)
            if last is not None:
                loop.call_soon(listener, last)
        if new:
            self._send(["watch", new])

    def unwatch(self, items: list[tuple[str, Listener]]) -> None:
        gone = []
        for key, listener in items:
            listeners = self._watchers.get(key)
            if listeners is None:
                continue
            if listener in listeners:
                listeners.remove(listener)
            if not listeners:
                del self._watchers[key]
                self._watch_specs.pop(key, None)
                self._last.pop(key, None)
                gone.append(key)
        if gone:
            self._send(["unwatch", gone])

    def on_fresh(self, listener: Listener) -> None:
        self._fresh.append(listener)

    def off_fresh(self, listener: Listener) -> None:
        if listener in self._fresh:
            self._fresh.remove(listener)

    def set_health(self, sub: str, check: Any, targets: list[Any],
                   listener: Listener) -> None:
        """Active checks of `targets` ([id, host, port, up]) with `check`; replaces
        what `sub` had."""
        self._health[sub] = (check, targets, listener)
        self._send(["health", sub, check, targets])

    def drop_health(self, sub: str) -> None:
        if self._health.pop(sub, None) is not None:
            self._send(["unhealth", sub])

    def subscribe_outliers(self, okey: str, spec: Any, listener: Listener) -> None:
        first = okey not in self._outlier_listeners
        self._outlier_specs[okey] = spec
        self._outlier_listeners.setdefault(okey, []).append(listener)
        if first:
            self._send(["outliers", okey, spec])

    def unsubscribe_outliers(self, okey: str, listener: Listener) -> None:
        listeners = self._outlier_listeners.get(okey)
        if listeners is None:
            return
        if listener in listeners:
            listeners.remove(listener)
        if not listeners:
            del self._outlier_listeners[okey]
            self._outlier_specs.pop(okey, None)
            self._send(["unoutliers", okey])

    def report_outlier(self, okey: str, backend_id: str, backends: int) -> None:
        self._send(["outlier", okey, backend_id, backends])

    def on_drains(self, listener: Listener) -> None:
        self._drain_listeners.append(listener)

    def off_drains(self, listener: Listener) -> None:
        if listener in self._drain_listeners:
            self._drain_listeners.remove(listener)

    def drain(self, upstream: str, backend_id: str, drained: bool) -> None:
        """Drain (or re-enable) a backend in every worker, through the agent."""
        self._send(["drain", upstream, backend_id, drained])

    async def traffic(self, timeout: float = 1.0) -> dict[str, Any] | None:
        """The agent's last minute of traffic (proxy/agent/traffic.py), or None when
        it cannot say (metrics off, agent away or slow)."""
        if len(self._traffic_asks) >= 32:  # the agent is not answering: do not pile up
            return None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._traffic_asks.append(future)
        self._send(["traffic"])
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return None

    def _forget_asks(self) -> None:
        """The connection is gone: its answers will not come."""
        while self._traffic_asks:
            future = self._traffic_asks.popleft()
            if not future.done():
                future.set_result(None)

    def subscriptions(self) -> list[Message]:
        """Everything subscribed, as messages: sent again after a reconnect."""
        messages: list[Message] = []
        if self._watch_specs:
            messages.append(["watch", [[k, s] for k, s in self._watch_specs.items()]])
        for sub, (check, targets, _) in self._health.items():
            messages.append(["health", sub, check, targets])
        for okey, spec in self._outlier_specs.items():
            messages.append(["outliers", okey, spec])
        messages.append(["drains", sorted([u, b] for u, b in self.drained)])
        return messages

    # -- delivery -----------------------------------------------------------------------

    def deliver(self, message: Message) -> None:
        op = message[0]
        if op in ("backends", "stale"):
            key = message[1]
            if op == "backends":
                self._last[key] = message
            for listener in list(self._watchers.get(key, ())):
                listener(message)
        elif op == "health":
            entry = self._health.get(message[1])
            if entry is not None:
                entry[2](message)
        elif op == "eject":
            for listener in list(self._outlier_listeners.get(message[1], ())):
                listener(message)
        elif op == "traffic":
            if self._traffic_asks:
                future = self._traffic_asks.popleft()
                if not future.done():
                    future.set_result(message[1])
        elif op == "drained":
            self.drained = frozenset((str(u), str(b)) for u, b in message[1])
            for listener in list(self._drain_listeners):
                listener(message)
        elif op == "fresh":
            for listener in list(self._fresh):
                listener(message)
        else:
            log.warning("discovery agent sent an unknown message %r", op)

    async def close(self) -> None:
        pass


class LocalLink(Link):
    """To a Hub in this process; owns it."""

    def __init__(self, hub: Hub | None = None) -> None:
        super().__init__()
        self.hub = hub or Hub()
        self._client = self.hub.attach(self._reply, "local")

    def _reply(self, message: Message) -> None:
        asyncio.get_running_loop().call_soon(self.deliver, message)

    def _send(self, message: Message) -> None:
        self.hub.handle(self._client, message)

    async def close(self) -> None:
        self.hub.detach(self._client)
        await self.hub.close()


class SocketLink(Link):
    """To the agent process over its Unix socket, reconnecting as needed."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.connected = asyncio.Event()
        self.connections = 0
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def _send(self, message: Message) -> None:
        # Not connected: dropped, since subscriptions are sent again on connect; an
        # outlier report is lost (the next failure streak reports again).
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode(message))
        elif message[0] == "traffic":
            self._forget_asks()

    async def _run(self) -> None:
        delay = 0.05
        lost_logged = False
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(self.path)
            except OSError as exc:
                if not lost_logged:
                    log.warning("discovery agent at %s unreachable (%s); retrying",
                                self.path, exc.strerror or exc)
                    lost_logged = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            self.connections += 1
            if lost_logged or self.connections > 1:
                log.info("discovery agent connected again")
            lost_logged, delay = False, 0.05
            self._writer = writer
            for message in self.subscriptions():
                writer.write(encode(message))
            self.connected.set()
            try:
                while (received := await read_message(reader)) is not None:
                    self.deliver(received)
            except (ValueError, OSError, EOFError) as exc:
                log.warning("discovery agent link broken: %s", exc)
            finally:
                self.connected.clear()
                self._writer = None
                self._forget_asks()
                writer.close()
            log.warning("lost the discovery agent; serving the last known state "
                        "until it is back")
            lost_logged = True
            await asyncio.sleep(delay)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
