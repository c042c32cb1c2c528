"""Writes bascule-dashboard.json, the Grafana dashboard for Bascule's metrics.

The JSON is checked in (import it in Grafana: Dashboards -> New -> Import); this
script is its source, so a panel is a line here rather than 60 lines of JSON.
tests/test_deploy.py checks the two agree and that every metric named exists in
Bascule's /metrics. Run: python deploy/grafana/build_dashboard.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SELECT = '{job=~"$job", instance=~"$instance"}'
SEL = 'job=~"$job", instance=~"$instance"'
RATE = "$__rate_interval"


def target(expr: str, legend: str = "", fmt: str = "time_series") -> dict[str, Any]:
    return {"datasource": {"type": "prometheus", "uid": "${datasource}"},
            "expr": expr, "legendFormat": legend, "format": fmt, "refId": "A"}


def panel(title: str, targets: list[dict[str, Any]], *, kind: str = "timeseries",
          unit: str = "short", width: int = 12, height: int = 8,
          description: str = "", options: dict[str, Any] | None = None,
          field: dict[str, Any] | None = None) -> dict[str, Any]:
    for index, t in enumerate(targets):
        t["refId"] = chr(ord("A") + index)
    return {"type": kind, "title": title, "description": description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "targets": targets, "gridPos": {"w": width, "h": height},
            "fieldConfig": {"defaults": {"unit": unit, **(field or {})}, "overrides": []},
            "options": options or {}}


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"w": 24, "h": 1}}


def variable(name: str, query: str, label: str) -> dict[str, Any]:
    return {"name": name, "label": label, "type": "query",
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "query": {"query": query, "refId": name}, "definition": query,
            "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]}}


def panels() -> list[dict[str, Any]]:
    return [
        row("Traffic"),
        panel("Requests per second by route", [target(
            f"sum by (route) (rate(bascule_requests_total{SELECT}[{RATE}]))", "{{route}}")],
            unit="reqps"),
        panel("5xx ratio by route", [target(
            f'sum by (route) (rate(bascule_requests_total{{{SEL}, code="5xx"}}[{RATE}]))'
            f" / sum by (route) (rate(bascule_requests_total{SELECT}[{RATE}]))",
            "{{route}}")], unit="percentunit"),
        panel("Answers by status class", [target(
            f"sum by (code) (rate(bascule_requests_total{SELECT}[{RATE}]))", "{{code}}")],
            unit="reqps", options={"legend": {"displayMode": "table"}}),
        panel("Latency p50 / p99 by route", [
            target(f"histogram_quantile(0.5, sum by (route, le) "
                   f"(rate(bascule_request_duration_seconds_bucket{SELECT}[{RATE}])))",
                   "p50 {{route}}"),
            target(f"histogram_quantile(0.99, sum by (route, le) "
                   f"(rate(bascule_request_duration_seconds_bucket{SELECT}[{RATE}])))",
                   "p99 {{route}}")], unit="s"),
        panel("Latency heatmap (all routes)", [target(
            f"sum by (le) (increase(bascule_request_duration_seconds_bucket{SELECT}[{RATE}]))",
            "{{le}}", fmt="heatmap")], kind="heatmap", width=24,
            options={"calculate": False, "yAxis": {"unit": "s"},
                     "color": {"scheme": "Oranges", "mode": "scheme"}}),
        row("Backends"),
        panel("Healthy backends per upstream", [
            target(f"sum by (upstream) (bascule_backend_up{SELECT})", "up {{upstream}}"),
            target(f"count by (upstream) (bascule_backend_up{SELECT})", "all {{upstream}}")],
            description="Up: passing active checks, not ejected, not drained."),
        panel("Backend state", [target(
            f"max by (upstream, backend) (bascule_backend_up{SELECT})",
            "{{upstream}} {{backend}}")], kind="state-timeline",
            field={"mappings": [{"type": "value", "options": {
                "0": {"text": "down", "color": "red"}, "1": {"text": "up", "color": "green"}}}]}),
        panel("In flight per backend", [target(
            f"sum by (upstream, backend) (bascule_backend_inflight{SELECT})",
            "{{upstream}} {{backend}}")]),
        panel("Backend latency p99", [target(
            f"histogram_quantile(0.99, sum by (upstream, backend, le) "
            f"(rate(bascule_upstream_request_duration_seconds_bucket{SELECT}[{RATE}])))",
            "{{upstream}} {{backend}}")], unit="s"),
        panel("Backend errors", [
            target(f"sum by (backend) (rate(bascule_backend_server_errors_total{SELECT}[{RATE}]))",
                   "5xx {{backend}}"),
            target(f"sum by (backend) (rate(bascule_backend_connect_errors_total{SELECT}[{RATE}]))",
                   "connect {{backend}}"),
            target(f"sum by (backend) (rate(bascule_backend_timeouts_total{SELECT}[{RATE}]))",
                   "timeout {{backend}}"),
            target(f"sum by (backend) "
                   f"(rate(bascule_backend_invalid_responses_total{SELECT}[{RATE}]))",
                   "invalid {{backend}}")], unit="reqps"),
        panel("Retries and state changes", [
            target(f"sum by (upstream) (rate(bascule_retries_total{SELECT}[{RATE}]))",
                   "retries {{upstream}}"),
            target(f"sum by (upstream, state) "
                   f"(increase(bascule_backend_state_changes_total{SELECT}[{RATE}]))",
                   "{{state}} {{upstream}}")]),
        row("Cache"),
        panel("Cache hit ratio by route", [target(
            f'sum by (route) (rate(bascule_cache_lookups_total{{{SEL}, result="hit"}}[{RATE}]))'
            f" / sum by (route) (rate(bascule_cache_lookups_total{SELECT}[{RATE}]))",
            "{{route}}")], unit="percentunit"),
        panel("Cache lookups and store errors", [
            target(f"sum by (result) (rate(bascule_cache_lookups_total{SELECT}[{RATE}]))",
                   "{{result}}"),
            target(f"sum by (store) (rate(bascule_cache_store_errors_total{SELECT}[{RATE}]))",
                   "store errors {{store}}")], unit="reqps"),
        row("Discovery, config and TLS"),
        panel("Discovery stale", [target(
            f"max by (upstream, source) (bascule_discovery_stale{SELECT})",
            "{{upstream}} ({{source}})")], kind="state-timeline", width=8,
            field={"mappings": [{"type": "value", "options": {
                "0": {"text": "current", "color": "green"},
                "1": {"text": "stale", "color": "red"}}}]}),
        panel("Discovery: seconds since last success", [target(
            f"max by (upstream) (bascule_discovery_last_success_age_seconds{SELECT})",
            "{{upstream}}")], unit="s", width=8),
        panel("Discovery updates and errors", [
            target(f"sum by (upstream) (increase(bascule_discovery_updates_total{SELECT}[{RATE}]))",
                   "updates {{upstream}}"),
            target(f"sum by (upstream) (increase(bascule_discovery_errors_total{SELECT}[{RATE}]))",
                   "errors {{upstream}}")], width=8),
        panel("Config reloads", [target(
            f"sum by (result) (increase(bascule_config_reloads_total{SELECT}[{RATE}]))",
            "{{result}}")], kind="barchart", width=8),
        panel("Config loaded (hash per instance)", [target(
            f"max by (instance, hash) (bascule_config_info{SELECT})", "", fmt="table")],
            kind="table", width=8),
        panel("Certificates: days left", [target(
            f"(max by (name) (bascule_tls_certificate_expiry_timestamp_seconds{SELECT})"
            " - time()) / 86400", "{{name}}")], kind="bargauge", unit="d", width=8,
            field={"thresholds": {"mode": "absolute", "steps": [
                {"color": "red", "value": None}, {"color": "orange", "value": 3},
                {"color": "green", "value": 14}]}}),
        panel("Open client connections", [target(
            f"sum by (instance) (bascule_open_connections{SELECT})", "{{instance}}")]),
        panel("TLS handshakes and failures", [
            target(f"sum by (version) (rate(bascule_tls_handshakes_total{SELECT}[{RATE}]))",
                   "{{version}}"),
            target(f"sum by (reason) "
                   f"(rate(bascule_tls_handshake_failures_total{SELECT}[{RATE}]))",
                   "failed: {{reason}}")], unit="reqps"),
    ]


def layout(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Place panels left to right, wrapping at Grafana's 24 columns."""
    x = y = row_height = 0
    for index, item in enumerate(items, start=1):
        grid = item["gridPos"]
        if item["type"] == "row" or x + grid["w"] > 24:
            x, y, row_height = 0, y + row_height, 0
        grid.update({"x": x, "y": y})
        item["id"] = index
        x += grid["w"]
        row_height = max(row_height, grid["h"])
        if item["type"] == "row":
            x, y, row_height = 0, y + grid["h"], 0
    return items


def dashboard() -> dict[str, Any]:
    return {
        "title": "Bascule", "uid": "bascule-overview", "tags": ["bascule", "proxy"],
        "description": "Bascule reverse proxy: traffic, backends, cache, discovery, "
                       "config and TLS (deploy/grafana in the Bascule repository).",
        "editable": True, "schemaVersion": 39, "version": 1, "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"}, "timezone": "",
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource",
             "query": "prometheus", "current": {}},
            variable("job", "label_values(bascule_build_info, job)", "Job"),
            variable("instance", 'label_values(bascule_build_info{job=~"$job"}, instance)',
                     "Instance"),
        ]},
        "annotations": {"list": []},
        "panels": layout(panels()),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    out = Path(__file__).with_name("bascule-dashboard.json")
    out.write_text(render())
    print(f"wrote {out}")
