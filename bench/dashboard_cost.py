"""The dashboard's cost to the request path: 1 KiB GETs through Bascule (one worker
pinned to CPU 0, its agent with it; metrics on) with no dashboard open, with one
dashboard polling /dashboard/state every 2 s (what the page does), and with a poll
every 0.25 s (eight open pages: an upper bound). Rounds interleave the three and
medians are compared, because the machine is noisy.

    python bench/dashboard_cost.py [--rounds 5] [--duration 5]
(also the last section of `make bench`)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Bench, backend_conf, free_port, pinned, wait_port, wrk

POLLS = {"closed": None, "open (2 s poll)": 2.0, "8 pages (0.25 s poll)": 0.25}


class Poller:
    """Asks for the dashboard's state every `interval` seconds, as the page does."""

    def __init__(self, url: str, interval: float) -> None:
        self.url, self.interval = url, interval
        self.stop = threading.Event()
        self.answers = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            with urllib.request.urlopen(self.url, timeout=5) as response:
                response.read()
            self.answers += 1
            self.stop.wait(self.interval)

    def __enter__(self) -> Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def dashboard_section(rounds: int, duration: int, connections: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bascule-bench-dash-"))
    work.chmod(0o755)
    static = work / "static"
    static.mkdir()
    (static / "1k").write_bytes(b"x" * 1024)
    bench = Bench(work)
    runs: dict[str, list[tuple[float, float, float]]] = {}
    polled: dict[str, int] = {}
    try:
        backend = free_port()
        bench.nginx("backend", backend_conf(backend, static), cpu=1)
        port, admin = free_port(), free_port()
        conf = work / "bascule.toml"
        conf.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = 1
access_log = "off"
[admin]
listen = "127.0.0.1:{admin}"
[[routes]]
upstream = "be"
[upstreams.be]
backends = ["127.0.0.1:{backend}"]
""")
        bench.start(pinned(0, [sys.executable, "-m", "proxy", "run", "-c", str(conf)]))
        for p in (backend, port, admin):
            wait_port(p)
        time.sleep(0.5)
        state = f"http://127.0.0.1:{admin}/dashboard/state"
        for rnd in range(rounds):
            for label, interval in POLLS.items():
                if interval is None:
                    r = wrk(f"http://127.0.0.1:{port}", "/1k", None, duration, connections,
                            work)
                else:
                    with Poller(state, interval) as poller:
                        time.sleep(min(interval, 1.0))  # the agent starts sampling
                        r = wrk(f"http://127.0.0.1:{port}", "/1k", None, duration,
                                connections, work)
                    polled[label] = polled.get(label, 0) + poller.answers
                runs.setdefault(label, []).append(r)
                print(f"round {rnd + 1} dashboard {label:22} {r[0]:9.0f} req/s "
                      f"p50 {r[1]:.2f}ms p99 {r[2]:.2f}ms", file=sys.stderr)
    finally:
        bench.stop_all()
    base = statistics.median(r[0] for r in runs["closed"])
    print(f"\ndashboard: bascule-1, 1KiB GET, medians of {rounds} rounds, {duration}s each, "
          f"{connections} connections\n")
    print("| dashboard | req/s | p50 ms | p99 ms | vs closed | state answers |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, rs in runs.items():
        rps = statistics.median(r[0] for r in rs)
        print(f"| {label} | {rps:.0f} | {statistics.median(r[1] for r in rs):.2f} | "
              f"{statistics.median(r[2] for r in rs):.2f} | {rps / base:.2f}x | "
              f"{polled.get(label, 0)} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    args = ap.parse_args()
    dashboard_section(args.rounds, args.duration, args.connections)
    return 0


if __name__ == "__main__":
    sys.exit(main())
