"""Discovery at catalog scale: a Consul catalog of `--catalog` services (the emulator
in tests/consul_emulator.py, limited like a real agent to 200 connections per
client), Bascule with `--workers` workers watching `--watched` of them, one route
each. Reports, per configuration:

- connections: the most Bascule held to the agent at once, and 429 refusals;
- first answer: from `bascule run` to every watched upstream answering 200 through
  the proxy (on new connections, so every worker is asked);
- change: from a registration change (a service's instance replaced by one on
  another backend) to every worker sending that service's traffic there, median of
  `--changes`;
- memory: resident memory of the agent and of one worker, and per watched service
  (the difference with a run watching `--baseline` services).

    python bench/discovery_scale.py [--catalog 2000] [--watched 500] [--workers 4]

Configurations: the default budget (`max_connections = 32`: the catalog-wide mode
past 16 services) and, for comparison, one blocking query per service
(`max_connections = 1000`), which a real agent's default limit refuses past 200.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.consul_emulator import ConsulEmulator  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int, name: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and comm == name:
            found.append(int(entry))
    return found


async def start_backend(name: str) -> tuple[web.AppRunner, int]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def get(session: aiohttp.ClientSession, port: int, host: str) -> tuple[int, str]:
    try:
        async with session.get(f"http://127.0.0.1:{port}/", headers={"Host": host}) as resp:
            return resp.status, await resp.text()
    except aiohttp.ClientError:
        return 0, ""


async def run_one(consul: ConsulEmulator, backends: dict[str, int], watched: int,
                  workers: int, max_connections: int, changes: int,
                  timeout: float) -> dict[str, Any]:
    consul.peak_connections.clear()
    consul.refused = 0
    port, admin = free_port(), free_port()
    names = [f"svc{i}" for i in range(watched)]
    body = "".join(f'[[routes]]\nhost = "{s}.test"\nupstream = "{s}"\n'
                   f'[upstreams.{s}]\nconsul = {{ service = "{s}" }}\n' for s in names)
    config = (f'[server]\nlisten = ["127.0.0.1:{port}"]\nworkers = {workers}\n'
              f'[admin]\nlisten = "127.0.0.1:{admin}"\n'
              f'[consul]\naddress = "{consul.address}"\nstartup_wait = "2s"\n'
              f"max_connections = {max_connections}\n{body}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bascule.toml"
        path.write_text(config)
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd=ROOT)
        result: dict[str, Any] = {"watched": watched, "max_connections": max_connections}
        try:
            connector = aiohttp.TCPConnector(force_close=True, limit=64)
            async with aiohttp.ClientSession(connector=connector) as session:
                pending = set(names)
                deadline = started + timeout
                while pending and time.monotonic() < deadline:
                    answers = await asyncio.gather(*(get(session, port, f"{s}.test")
                                                     for s in sorted(pending)))
                    pending = {s for s, (code, _) in zip(sorted(pending), answers,
                                                         strict=True) if code != 200}
                    if pending:
                        await asyncio.sleep(0.05)
                result["first_answer_s"] = (time.monotonic() - started) if not pending \
                    else None
                result["unserved"] = len(pending)
                await asyncio.sleep(1.0)  # settle: what is held in steady state
                result["held"] = consul.held()
                took = []
                for i in range(changes if not pending else 0):
                    service = names[i * 7 % watched]
                    target = "b" if i % 2 == 0 else "c"
                    changed = time.monotonic()
                    await consul.remove(f"{service}-1")
                    await consul.add(service, f"{service}-1", backends[target])
                    while time.monotonic() - changed < timeout:
                        answers = await asyncio.gather(*(
                            get(session, port, f"{service}.test") for _ in range(2 * workers)))
                        if all(text == target for _, text in answers):
                            took.append(time.monotonic() - changed)
                            break
                        await asyncio.sleep(0.02)
                result["change_s"] = statistics.median(took) if took else None
            agent = children(proc.pid, "bascule-agent")
            worker = children(proc.pid, "bascule-worker")
            result["agent_kib"] = rss_kib(agent[0]) if agent else 0
            result["worker_kib"] = (sum(rss_kib(w) for w in worker) // len(worker)
                                    if worker else 0)
            result["peak"] = max(consul.peak_connections.values(), default=0)
            result["refused"] = consul.refused
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--catalog", type=int, default=2000)
    parser.add_argument("--watched", type=int, default=500)
    parser.add_argument("--baseline", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args()
    consul = ConsulEmulator()  # max_conns_per_client = 200, Consul's default
    await consul.start()
    runners, backends = [], {}
    for name in "abc":
        runner, port = await start_backend(name)
        runners.append(runner)
        backends[name] = port
    for i in range(args.catalog):
        await consul.add(f"svc{i}", f"svc{i}-1", backends["a"])
    rows = [
        ("catalog-wide (default budget 32)", await run_one(
            consul, backends, args.watched, args.workers, 32, args.changes, args.timeout)),
        ("baseline for memory", await run_one(
            consul, backends, args.baseline, args.workers, 32, 0, args.timeout)),
        ("one query per service", await run_one(
            consul, backends, args.watched, args.workers, 1000, args.changes,
            args.timeout)),
    ]
    print(f"\ncatalog {args.catalog} services, {args.workers} workers, agent limit "
          f"{consul.max_conns_per_client} connections per client\n")
    print("| mode | watched | peak conns | held | 429s | first answer | change → traffic "
          "| agent RSS | worker RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, r in rows:
        first = f"{r['first_answer_s']:.2f} s" if r["first_answer_s"] is not None \
            else f"{r['unserved']} never served"
        change = f"{r['change_s'] * 1000:.0f} ms" if r.get("change_s") is not None else "-"
        print(f"| {label} | {r['watched']} | {r['peak']} | {r['held']} | {r['refused']} "
              f"| {first} | {change} | {r['agent_kib'] / 1024:.1f} MiB "
              f"| {r['worker_kib'] / 1024:.1f} MiB |")
    big, small = rows[0][1], rows[1][1]
    extra = big["watched"] - small["watched"]
    if extra > 0:
        print(f"\nmemory per watched service: agent "
              f"{(big['agent_kib'] - small['agent_kib']) / extra:.1f} KiB, each worker "
              f"{(big['worker_kib'] - small['worker_kib']) / extra:.1f} KiB")
    await consul.stop()
    for runner in runners:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
