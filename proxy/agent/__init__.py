"""The discovery agent: Consul watches, active health checks and outlier ejection
decisions, run once per Bascule process tree and shared with every worker
(DESIGN.md §3, "Workers"). `hub.py` holds that state; `process.py` serves it to the
workers over a Unix socket; `link.py` is the worker's end."""
