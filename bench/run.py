"""wrk-driven benchmark: Bascule (1 worker and "auto") against a direct backend and,
when installed, nginx and HAProxy configured equivalently (keep-alive upstream pools,
round robin over the same backend). Targets are interleaved over several rounds and
medians reported, because shared machines are noisy; compare ratios, not absolutes.

Bascule runs with metrics on and access logs off (as nginx here); `--observability`
adds one-worker variants with metrics off and with access logging on.

The proxy under test runs pinned to CPU 0 (nginx/HAProxy/Bascule-1 alike); the
backend (nginx, static answers) and wrk share the other core. `auto` uses all cores.

    python bench/run.py [--rounds 3] [--duration 5] [--connections 50]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIOS = {
    "1KiB GET": ("/1k", None),
    "1MiB GET": ("/1m", None),
    "64KiB POST": ("/post", 64 * 1024),
}


STICKY_SECRET = "bench-sticky-secret-0123456789"


def sticky_cookie(backend_port: int) -> str:
    """The pin Bascule gives the bench's one backend (so wrk's requests are hits)."""
    sys.path.insert(0, str(HERE.parent))
    from proxy.config import StickyConfig
    from proxy.sticky import StickySessions

    pins = StickySessions(StickyConfig(cookie="pin", secret=STICKY_SECRET))
    return f"pin={pins.token(f'127.0.0.1:{backend_port}')}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def pinned(cpu: int | None, argv: list[str]) -> list[str]:
    if cpu is None or not shutil.which("taskset") or (os.cpu_count() or 1) < 2:
        return argv
    return ["taskset", "-c", str(cpu), *argv]


class Bench:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, **kw)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    def nginx(self, name: str, body: str, cpu: int | None) -> None:
        root = self.work / name
        (root / "logs").mkdir(parents=True, exist_ok=True)
        conf = root / "nginx.conf"
        conf.write_text(f"""
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log crit;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {root}/body; proxy_temp_path {root}/proxy;
  fastcgi_temp_path {root}/fcgi; uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
  keepalive_requests 1000000;
  {body}
}}
""")
        self.start(pinned(cpu, ["nginx", "-c", str(conf), "-p", str(root)]))


def backend_conf(port: int, static: Path) -> str:
    return f"""
server {{
  listen 127.0.0.1:{port};
  root {static};
  expires 1h;  # Cache-Control: max-age=3600, so a caching proxy can serve hits
  location /post {{ client_max_body_size 10m; client_body_buffer_size 128k;
                   return 200 "ok"; }}
}}"""


def wrk(url: str, path: str, body_size: int | None, duration: int, connections: int,
        work: Path, *, new_connections: bool = False, cpu: int | None = 1,
        auth: str = "", accept: str = "", cookie: str = "") -> tuple[float, float, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency"]
    if new_connections:  # a new connection (and, over TLS, a full handshake) per request
        argv += ["-H", "Connection: close"]
    if auth:
        argv += ["-H", f"Authorization: Basic {auth}"]
    if accept:
        argv += ["-H", f"Accept-Encoding: {accept}"]
    if cookie:
        argv += ["-H", f"Cookie: {cookie}"]
    if body_size:
        script = work / "post.lua"
        script.write_text('wrk.method = "POST"\n'
                          f'wrk.body = string.rep("x", {body_size})\n'
                          'wrk.headers["Content-Type"] = "application/octet-stream"\n')
        argv += ["-s", str(script)]
    out = subprocess.run(pinned(cpu, [*argv, url + path]), capture_output=True, text=True,
                         timeout=duration + 30).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"  warning: {errors.group(1)} non-2xx responses from {url}{path}", file=sys.stderr)
    return rps, pct("50"), pct("99")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--json", type=Path, help="also write raw results here")
    ap.add_argument("--only", action="append", help="scenario(s) to run, e.g. '1KiB GET'")
    ap.add_argument("--targets", help="comma-separated subset of targets")
    ap.add_argument("--observability", action="store_true",
                    help="add bascule-1 with metrics off, and with JSON access logs on")
    ap.add_argument("--no-tls", action="store_true", help="skip the TLS section")
    ap.add_argument("--no-dashboard", action="store_true",
                    help="skip the dashboard section (bench/dashboard_cost.py)")
    ap.add_argument("--no-compress", action="store_true",
                    help="skip the compression section")
    ap.add_argument("--no-plugins", action="store_true",
                    help="skip the access plugin rows (ip_filter, basic_auth)")
    ap.add_argument("--cache", action="store_true",
                    help="add bascule-1 with the cache (memory and Redis stores: GETs become "
                         "hits) and nginx with proxy_cache; prints hit/uncached ratios")
    args = ap.parse_args()
    scenarios = {k: v for k, v in SCENARIOS.items() if not args.only or k in args.only}
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool):
            print(f"bench needs {tool}: apt-get install wrk nginx haproxy", file=sys.stderr)
            return 2

    work = Path(tempfile.mkdtemp(prefix="bascule-bench-"))
    work.chmod(0o755)  # nginx workers run as nobody and must read the static files
    static = work / "static"
    static.mkdir()
    (static / "1k").write_bytes(b"x" * 1024)
    (static / "1m").write_bytes(b"y" * 1024 * 1024)
    bench = Bench(work)
    targets: dict[str, int] = {}
    try:
        backend = free_port()
        bench.nginx("backend", backend_conf(backend, static), cpu=1)
        wait_port(backend)
        targets["direct"] = backend

        port = free_port()
        bench.nginx("nginx", f"""
upstream be {{ server 127.0.0.1:{backend}; keepalive 64; }}
server {{ listen 127.0.0.1:{port};
  location / {{ proxy_pass http://be; proxy_http_version 1.1;
    proxy_set_header Connection ""; client_max_body_size 10m;
    # streaming both ways in memory, as Bascule does: no temp files on disk
    proxy_buffering on; proxy_buffer_size 64k; proxy_buffers 8 64k;
    proxy_max_temp_file_size 0; proxy_request_buffering off; }} }}""", cpu=0)
        targets["nginx"] = port

        if shutil.which("haproxy"):
            port = free_port()
            cfg = work / "haproxy.cfg"
            cfg.write_text(f"""
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  balance roundrobin
  server b1 127.0.0.1:{backend}
""")
            bench.start(pinned(0, ["haproxy", "-f", str(cfg)]))
            targets["haproxy"] = port

        redis_url = ""
        if args.cache:
            port = free_port()
            cache_dir = work / "nginx-cache"
            bench.nginx("nginx-cache", f"""
proxy_cache_path {cache_dir} levels=1:2 keys_zone=bc:10m max_size=256m inactive=10m
                 use_temp_path=off;
upstream bec {{ server 127.0.0.1:{backend}; keepalive 64; }}
server {{ listen 127.0.0.1:{port};
  location / {{ proxy_pass http://bec; proxy_http_version 1.1;
    proxy_set_header Connection ""; proxy_cache bc; proxy_cache_lock on; }} }}""", cpu=0)
            targets["nginx-cache"] = port
            if shutil.which("redis-server"):
                redis_port = free_port()
                bench.start(pinned(1, ["redis-server", "--port", str(redis_port), "--bind",
                                       "127.0.0.1", "--save", "", "--appendonly", "no"]))
                wait_port(redis_port)
                redis_url = f"redis://127.0.0.1:{redis_port}/0"

        variants = [("1", "1", 0, "true", "off"), ("auto", '"auto"', None, "true", "off")]
        if not args.no_plugins:  # one row per access plugin, 1 KiB GET only
            variants += [("1-passthrough", "1", 0, "true", "off"),
                         ("1-ip_filter", "1", 0, "true", "off"),
                         ("1-basic_auth", "1", 0, "true", "off"),
                         ("1-rate_limit", "1", 0, "true", "off"),
                         ("1-headers", "1", 0, "true", "off"),
                         # balancing beyond the strategy (issue 17): a sticky upstream
                         # with the client's pin (hit) and without (new pin each time),
                         # and a shadow strategy picking beside the real one
                         ("1-sticky", "1", 0, "true", "off"),
                         ("1-sticky-new", "1", 0, "true", "off"),
                         ("1-shadow", "1", 0, "true", "off")]
            if shutil.which("redis-server"):
                if not redis_url:
                    redis_port = free_port()
                    bench.start(pinned(1, ["redis-server", "--port", str(redis_port),
                                           "--bind", "127.0.0.1", "--save", "",
                                           "--appendonly", "no"]))
                    wait_port(redis_port)
                    redis_url = f"redis://127.0.0.1:{redis_port}/0"
                variants += [("1-rate_limit_redis", "1", 0, "true", "off")]
        if args.observability:
            variants += [("1-nometrics", "1", 0, "false", "off"),
                         ("1-accesslog", "1", 0, "true", "/dev/null")]
        if args.cache:
            variants += [("1-cache", "1", 0, "true", "off")]
            if redis_url:  # with the near cache (default), and every hit read from Redis
                variants += [("1-redis", "1", 0, "true", "off"),
                             ("1-redis-nonear", "1", 0, "true", "off")]
        htpasswd = work / "bench.htpasswd"
        htpasswd.write_text(  # bcrypt of "bench", made with cost 4 (checked once, cached)
            "bench:$2b$04$mqnimVBim2CtIgwufoCthuHRSM7txz3wasls9J/wdxzVZJqIWcQsa\n")
        for label, workers, cpu, metrics, access_log in variants:
            cache = label.endswith(("-cache", "-redis", "-nonear"))
            plugin = label.removeprefix("1-") if label in (
                "1-passthrough", "1-ip_filter", "1-basic_auth", "1-rate_limit",
                "1-rate_limit_redis", "1-headers") else ""
            plugin_table = {
                "ip_filter": '[[plugins]]\nname = "p"\nuse = "ip_filter"\n'
                             'options = { allow = ["127.0.0.0/8", "10.0.0.0/8"], '
                             'deny = ["10.9.0.0/16"] }\n',
                "basic_auth": f'[[plugins]]\nname = "p"\nuse = "basic_auth"\n'
                              f'options = {{ htpasswd = "{htpasswd}" }}\n',
                "headers": '[[plugins]]\nname = "p"\nuse = "headers"\n'
                           '[plugins.options]\nrequest_set = { "X-Client" = "${client}" }\n'
                           'response_remove = ["Server"]\nsecurity = true\n',
                # Never reached (a limit far above wrk's rate): the decision's cost.
                "rate_limit": '[[plugins]]\nname = "p"\nuse = "rate_limit"\n'
                              'options = { limit = 100000000, burst = 100000 }\n',
                "rate_limit_redis": '[[plugins]]\nname = "p"\nuse = "rate_limit"\n'
                                    'options = { limit = 100000000, burst = 100000, '
                                    'store = "redis" }\n',
                # A plugin that only calls on: the chain's own cost, to set the
                # plugins' cost apart from it.
                "passthrough": '[[plugins]]\nname = "p"\n'
                               'use = "tests.example_plugins:Deny"\n'
                               'options = { prefix = "/never" }\n',
            }.get(plugin, "")
            store = "redis" if "-redis" in label else "memory"
            balancing = {
                "1-sticky": f'sticky = {{ cookie = "pin", secret = "{STICKY_SECRET}" }}',
                "1-sticky-new": f'sticky = {{ cookie = "pin", secret = "{STICKY_SECRET}" }}',
                "1-shadow": 'shadow_strategy = "least_connections"',
            }.get(label, "")
            near = 'near_cache_size = "0"' if label.endswith("-nonear") else ""
            port, admin = free_port(), free_port()
            conf = work / f"bascule-{label}.toml"
            conf.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = {workers}
max_body_size = "10MiB"
access_log = "{access_log}"
[admin]
listen = "127.0.0.1:{admin}"
metrics = {metrics}
[cache]
store = "{store}"
max_object_size = "2MiB"
{near}
[redis]
url = "{redis_url or 'redis://127.0.0.1:6379/0'}"
timeout = "200ms"
{plugin_table}
[[routes]]
upstream = "be"
cache = {'true' if cache else 'false'}
{'plugins = ["p"]' if plugin else ""}
[upstreams.be]
backends = ["127.0.0.1:{backend}"]
{balancing}
""")
            bench.start(pinned(cpu, [sys.executable, "-m", "proxy", "run", "-c", str(conf)]))
            targets[f"bascule-{label}"] = port
        for port in targets.values():
            wait_port(port)
        time.sleep(0.5)

        results: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
        for rnd in range(args.rounds):
            for scenario, (path, body) in scenarios.items():
                for name, port in targets.items():
                    if args.targets and name not in [*args.targets.split(","), "nginx"]:
                        continue
                    if (name.endswith(("passthrough", "ip_filter", "basic_auth",
                                       "rate_limit", "rate_limit_redis", "headers",
                                       "sticky", "sticky-new", "shadow"))
                            and scenario != "1KiB GET"):
                        continue
                    r = wrk(f"http://127.0.0.1:{port}", path, body, args.duration,
                            args.connections, work,
                            auth="YmVuY2g6YmVuY2g=" if name.endswith("basic_auth") else "",
                            cookie=sticky_cookie(backend) if name.endswith("-sticky")
                            else "")
                    results.setdefault(scenario, {}).setdefault(name, []).append(r)
                    print(f"round {rnd + 1} {scenario:11} {name:13} {r[0]:9.0f} req/s "
                          f"p50 {r[1]:.2f}ms p99 {r[2]:.2f}ms", file=sys.stderr)
    finally:
        bench.stop_all()

    print(f"\nmedians of {args.rounds} rounds, {args.duration}s each, "
          f"{args.connections} connections, {os.cpu_count()} cores\n")
    print("| scenario | target | req/s | p50 ms | p99 ms | vs nginx |")
    print("|---|---|---:|---:|---:|---:|")
    for scenario, by_target in results.items():
        nginx_rps = statistics.median(r[0] for r in by_target["nginx"])
        for name, runs in by_target.items():
            rps = statistics.median(r[0] for r in runs)
            p50 = statistics.median(r[1] for r in runs)
            p99 = statistics.median(r[2] for r in runs)
            print(f"| {scenario} | {name} | {rps:.0f} | {p50:.2f} | {p99:.2f} | "
                  f"{rps / nginx_rps:.2f}x |")
    plugin_rows = results.get("1KiB GET", {})
    if "bascule-1" in plugin_rows and "bascule-1-passthrough" in plugin_rows:
        base = statistics.median(r[0] for r in plugin_rows["bascule-1"])
        chain = statistics.median(r[0] for r in plugin_rows["bascule-1-passthrough"])
        print("\nplugins and balancing features on 1KiB GET, vs the plain route (bascule-1) and vs "
              "a route whose only plugin calls on (the chain's own cost):\n")
        print("| plugin | req/s | vs no plugin | vs pass-through plugin |")
        print("|---|---:|---:|---:|")
        for name in ("bascule-1-passthrough", "bascule-1-ip_filter", "bascule-1-basic_auth",
                     "bascule-1-rate_limit", "bascule-1-rate_limit_redis",
                     "bascule-1-headers", "bascule-1-sticky", "bascule-1-sticky-new",
                     "bascule-1-shadow"):
            if name in plugin_rows:
                rps = statistics.median(r[0] for r in plugin_rows[name])
                print(f"| {name.removeprefix('bascule-1-')} | {rps:.0f} | {rps / base:.2f}x "
                      f"| {rps / chain:.2f}x |")
    if args.cache:
        print("\ncache hits vs the same route uncached (bascule-1), and vs nginx proxy_cache:\n")
        print("| scenario | target | vs uncached | vs nginx-cache |")
        print("|---|---|---:|---:|")
        for scenario, by_target in results.items():
            base = statistics.median(r[0] for r in by_target.get("bascule-1", [(0, 0, 0)]))
            ngx = statistics.median(r[0] for r in by_target.get("nginx-cache", [(0, 0, 0)]))
            for name in ("bascule-1-cache", "bascule-1-redis", "bascule-1-redis-nonear"):
                if name in by_target and base and ngx:
                    rps = statistics.median(r[0] for r in by_target[name])
                    print(f"| {scenario} | {name} | {rps / base:.2f}x | {rps / ngx:.2f}x |")
    if not args.no_tls and shutil.which("openssl"):
        tls_section(args, static)
    if not args.no_compress:
        compress_section(args, static)
    if not args.no_dashboard:
        from dashboard_cost import dashboard_section

        dashboard_section(args.rounds, args.duration, args.connections)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def compress_section(args: argparse.Namespace, static: Path) -> None:
    """A 64 KiB JSON body compressed on the fly: Bascule's `compress` plugin per coding
    (one worker) against nginx `gzip on` at the same gzip level (4), both proxying to
    the same backend; req/s, and the bytes one answer takes on the wire."""
    import json as jsonlib

    body = jsonlib.dumps([{"id": i, "name": f"item {i}", "tags": ["a", "b"], "ok": True}
                          for i in range(1200)]).encode()[:64 * 1024]
    (static / "64k.json").write_bytes(body)
    work = Path(tempfile.mkdtemp(prefix="bascule-bench-gz-"))
    work.chmod(0o755)
    bench = Bench(work)
    rows: dict[str, list[tuple[float, float, float]]] = {}
    wire: dict[str, int] = {}
    try:
        backend = free_port()
        bench.nginx("backend", backend_conf(backend, static), cpu=1)
        wait_port(backend)
        nginx_port = free_port()
        bench.nginx("nginx-gzip", f"""
upstream be {{ server 127.0.0.1:{backend}; keepalive 64; }}
server {{ listen 127.0.0.1:{nginx_port};
  gzip on; gzip_comp_level 4; gzip_types application/json text/plain; gzip_proxied any;
  gzip_min_length 1024;
  location / {{ proxy_pass http://be; proxy_http_version 1.1;
    proxy_set_header Connection ""; }} }}""", cpu=0)
        port, admin = free_port(), free_port()
        conf = work / "bascule-compress.toml"
        conf.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
access_log = "off"
[admin]
listen = "127.0.0.1:{admin}"
[[plugins]]
name = "compress"
use = "compress"
[[routes]]
upstream = "be"
plugins = ["compress"]
[upstreams.be]
backends = ["127.0.0.1:{backend}"]
""")
        bench.start(pinned(0, [sys.executable, "-m", "proxy", "run", "-c", str(conf)]))
        for p in (nginx_port, port):
            wait_port(p)
        time.sleep(0.5)
        targets = [("nginx-gzip gzip", nginx_port, "gzip"), ("bascule gzip", port, "gzip"),
                   ("bascule br", port, "br"), ("bascule zstd", port, "zstd"),
                   ("bascule identity", port, "identity")]
        for label, p, coding in targets:
            out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{size_download}",
                                  "-H", f"Accept-Encoding: {coding}",
                                  f"http://127.0.0.1:{p}/64k.json"],
                                 capture_output=True, text=True, timeout=30).stdout
            wire[label] = int(out or 0)
        for _ in range(args.rounds):
            for label, p, coding in targets:
                rows.setdefault(label, []).append(wrk(
                    f"http://127.0.0.1:{p}", "/64k.json", None, args.duration,
                    args.connections, work, accept=coding))
                print(f"compress {label:18} {rows[label][-1][0]:9.0f} req/s",
                      file=sys.stderr)
    finally:
        bench.stop_all()
    base = statistics.median(r[0] for r in rows["nginx-gzip gzip"])
    print(f"\ncompression of a {len(body) // 1024} KiB JSON body, medians of "
          f"{args.rounds} rounds, {args.connections} connections:\n")
    print("| target | req/s | vs nginx gzip | bytes on the wire |")
    print("|---|---:|---:|---:|")
    for label, runs in rows.items():
        rps = statistics.median(r[0] for r in runs)
        print(f"| {label} | {rps:.0f} | {rps / base:.2f}x | {wire[label]} |")


def tls_section(args: argparse.Namespace, static: Path) -> None:
    """Bascule (one worker) and nginx terminating TLS with the same ECDSA P-256
    certificate, proxying to the same plain backend: 1 KiB GETs over kept-alive
    connections, and with a new connection (a full handshake) per request. Then the
    handshake's cost to other connections: the latency of one kept-alive client
    while 20 others make handshakes, against while 20 others make kept-alive
    requests (the same worker, the same load shape)."""
    work = Path(tempfile.mkdtemp(prefix="bascule-bench-tls-"))
    work.chmod(0o755)
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=bench.test",
                    "-addext", "subjectAltName=DNS:bench.test", "-days", "2",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    for path in (cert, key):
        path.chmod(0o644)
    bench = Bench(work)
    targets: dict[str, int] = {}
    try:
        backend = free_port()
        bench.nginx("backend", backend_conf(backend, static), cpu=1)
        wait_port(backend)
        port = free_port()
        bench.nginx("nginx-tls", f"""
upstream be {{ server 127.0.0.1:{backend}; keepalive 64; }}
server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {cert}; ssl_certificate_key {key};
  ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m;
  location / {{ proxy_pass http://be; proxy_http_version 1.1;
    proxy_set_header Connection ""; }} }}""", cpu=0)
        targets["nginx-tls"] = port
        port, plain, admin = free_port(), free_port(), free_port()
        conf = work / "bascule-tls.toml"
        conf.write_text(f"""
[server]
listen = ["127.0.0.1:{plain}"]
workers = 1
access_log = "off"
[server.tls]
listen = ["127.0.0.1:{port}"]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
watch_files = false
[admin]
listen = "127.0.0.1:{admin}"
[[routes]]
upstream = "be"
[upstreams.be]
backends = ["127.0.0.1:{backend}"]
""")
        bench.start(pinned(0, [sys.executable, "-m", "proxy", "run", "-c", str(conf)]))
        targets["bascule-1-tls"] = port
        for p in targets.values():
            wait_port(p)
        time.sleep(0.5)
        runs: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
        shapes = {"1KiB GET, TLS kept alive": False, "1KiB GET, TLS handshake each": True}
        for rnd in range(args.rounds):
            for scenario, new in shapes.items():
                for name, p in targets.items():
                    r = wrk(f"https://127.0.0.1:{p}", "/1k", None, args.duration,
                            args.connections, work, new_connections=new)
                    runs.setdefault(scenario, {}).setdefault(name, []).append(r)
                    print(f"round {rnd + 1} {scenario:30} {name:13} {r[0]:9.0f} req/s "
                          f"p50 {r[1]:.2f}ms p99 {r[2]:.2f}ms", file=sys.stderr)
        # The stall probe: one kept-alive client's latency beside 20 busy ones.
        probe: dict[str, list[tuple[float, float, float]]] = {}
        for _ in range(args.rounds):
            for label, new in (("beside kept-alive requests", False),
                               ("beside handshakes", True)):
                argv = ["wrk", "-t1", "-c20", f"-d{args.duration + 2}s"]
                if new:
                    argv += ["-H", "Connection: close"]
                load = subprocess.Popen(pinned(1, [*argv, f"https://127.0.0.1:{port}/1k"]),
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
                r = wrk(f"https://127.0.0.1:{port}", "/1k", None, args.duration, 1, work)
                load.wait()
                probe.setdefault(label, []).append(r)
    finally:
        bench.stop_all()
    print(f"\nTLS: medians of {args.rounds} rounds, {args.duration}s each, "
          f"{args.connections} connections, ECDSA P-256\n")
    print("| scenario | target | req/s | p50 ms | p99 ms | vs nginx-tls |")
    print("|---|---|---:|---:|---:|---:|")
    for scenario, by_target in runs.items():
        base = statistics.median(r[0] for r in by_target["nginx-tls"])
        for name, rs in by_target.items():
            rps = statistics.median(r[0] for r in rs)
            print(f"| {scenario} | {name} | {rps:.0f} | "
                  f"{statistics.median(r[1] for r in rs):.2f} | "
                  f"{statistics.median(r[2] for r in rs):.2f} | {rps / base:.2f}x |")
    print("\none kept-alive client of bascule-1-tls beside 20 other clients:\n")
    print("| the 20 others make | probe p50 ms | probe p99 ms |")
    print("|---|---:|---:|")
    for label, rs in probe.items():
        print(f"| {label} | {statistics.median(r[1] for r in rs):.2f} | "
              f"{statistics.median(r[2] for r in rs):.2f} |")


if __name__ == "__main__":
    sys.exit(main())
