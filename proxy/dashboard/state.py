"""The document the dashboard polls (GET /dashboard/state): what /status says of this
worker's runtime, joined with the agent's last minute of traffic for the whole
Bascule, the listeners, each route's plugins, the plugins' own state and the recent
reloads. Every value goes to the page as JSON data, never as markup: the page
renders it with textContent only."""

from __future__ import annotations

import os
import time
from typing import Any

from proxy import __version__

__all__ = ["dashboard_state"]


async def dashboard_state(host: Any) -> dict[str, Any]:
    """`host`: the admin's AdminHost (server.Edge)."""
    runtime = host.runtime
    config = runtime.config
    document: dict[str, Any] = runtime.status()
    plugin_names = {id(plugin): name for name, plugin in runtime.plugins.items()}
    for route, entry in zip(runtime.routes.routes, document["routes"], strict=True):
        entry["plugins"] = [plugin_names.get(id(p), type(p).__name__)
                            for p in runtime.chains.get(route.name, ())]
    server = config.server
    document.update({
        "version": __version__, "now": time.time(),
        "worker": host.worker_id, "pid": os.getpid(), "workers": server.worker_count()
        if host.supervised else 1, "started_at": host.started_at,
        "draining": host.draining,
        "listeners": (
            [{"address": a, "kind": "http"} for a in server.listen]
            + [{"address": a, "kind": "https"}
               for a in (server.tls.listen if server.tls else [])]
            + [{"address": config.admin.listen, "kind": "admin"}]),
        "plugins": {name: plugin.status()
                    for name, plugin in runtime.seams.reporting.items()},
        "reloads": [r.as_dict() for r in reversed(host.reloader.history)],
        "tls": host.tls_status(),
        "metrics": host.metrics.enabled,
        "drains_last": "across reloads, until Bascule restarts",
        "traffic": await host.link.traffic() if host.metrics.enabled else None,
    })
    return document
