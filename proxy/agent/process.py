"""The agent process: one per Bascule, forked and restarted by the supervisor
(proxy/workers.py), serving a Hub to the workers over a Unix socket.

The supervisor makes the listening socket once, in a directory only it can enter
(0700), before forking anything; every agent it starts inherits it. So a worker
that connects while the agent restarts waits in the socket's backlog instead of
failing, and a worker that starts late or restarts finds the agent where it was.
A worker that sends something malformed is disconnected and logged (it will
reconnect); a worker that stops reading is disconnected once MAX_BUFFERED bytes wait
for it, rather than letting the agent's memory grow.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from typing import Any

from proxy.agent.hub import Hub
from proxy.agent.wire import Message, encode, read_message
from proxy.metrics import multiprocess_families

__all__ = ["MAX_BUFFERED", "serve_agent"]

log = logging.getLogger("bascule.agent")

MAX_BUFFERED = 64 * 1024 * 1024


async def serve_agent(listening: socket.socket,
                      stop_requested: list[int] | None = None) -> None:
    """Serve until SIGTERM/SIGINT. `stop_requested` holds signals that arrived
    before the loop's handlers existed."""
    loop = asyncio.get_running_loop()
    # the dashboard's traffic window reads the metrics every worker writes
    hub = Hub(multiprocess_families if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else None)
    counter = 0
    writers: set[asyncio.StreamWriter] = set()
    handlers: set[asyncio.Task[Any]] = set()

    async def serve_client(reader: asyncio.StreamReader,
                           writer: asyncio.StreamWriter) -> None:
        nonlocal counter
        counter += 1
        name = f"worker link {counter}"

        def send(message: Message) -> None:
            if writer.is_closing():
                return
            writer.write(encode(message))
            if writer.transport.get_write_buffer_size() > MAX_BUFFERED:
                log.warning("%s is not reading; disconnecting it", name)
                writer.close()

        client = hub.attach(send, name)
        writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            handlers.add(task)
        try:
            while (message := await read_message(reader)) is not None:
                hub.handle(client, message)
        except (ValueError, OSError, EOFError) as exc:
            log.warning("%s: %s; disconnecting it", name, exc)
        finally:
            hub.detach(client)
            writers.discard(writer)
            writer.close()

    options: dict[str, Any] = {}
    if sys.version_info >= (3, 13):
        options["cleanup_socket"] = False  # the supervisor owns the path
    server = await asyncio.start_unix_server(serve_client, sock=listening, **options)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if stop_requested:
        stop.set()
    log.info("discovery agent serving the workers")
    await stop.wait()
    server.close()
    # Let each worker's handler end on its own (EOF), not be cancelled at the loop's
    # end: Python 3.11's stream callback logs a cancelled handler as an error.
    for writer in list(writers):
        writer.transport.abort()
    if handlers:
        await asyncio.wait(handlers, timeout=2.0)
    await hub.close()
    log.info("discovery agent stopped")
