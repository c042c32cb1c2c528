"""The real `bascule` process: workers, restart, graceful drain, refusals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import (
    children_of,
    free_port,
    poll,
    port_of,
    ports_free,
    run_bascule,
    start_backend,
    wait_port,
)


def write_config(tmp_path: Path, backends: list[int], extra: str = "") -> tuple[Path, int]:
    port = free_port()
    conf = tmp_path / "bascule.toml"
    conf.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
{extra}
[admin]
listen = "127.0.0.1:{free_port()}"
[[routes]]
upstream = "app"
[upstreams.app]
backends = [{", ".join(f'"127.0.0.1:{b}"' for b in backends)}]
""")
    return conf, port




async def test_sigterm_drains_in_flight_request(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    arrived = asyncio.Event()

    async def slow(request: web.BaseRequest) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(1.0)
        return web.Response(text="finished")

    _, listener = await start_backend(slow)
    conf, port = write_config(tmp_path, [port_of(listener)], 'graceful_timeout = "10s"')
    proc = run_bascule(conf)
    procs.append(proc)
    await asyncio.to_thread(wait_port, port)
    async with aiohttp.ClientSession() as client:
        request = asyncio.ensure_future(client.get(f"http://127.0.0.1:{port}/slow"))
        await asyncio.wait_for(arrived.wait(), 10)
        proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return False
            except OSError:
                return True

        assert await asyncio.to_thread(poll, refused, 5.0)  # stops accepting at once
        resp = await asyncio.wait_for(request, 10)
        assert resp.status == 200 and await resp.text() == "finished"
    code = await asyncio.to_thread(proc.wait, 15)
    assert code == 0
    listener.close()


async def test_crashed_worker_is_restarted(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    async def hello(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="hello")

    _, listener = await start_backend(hello)
    conf, port = write_config(tmp_path, [port_of(listener)], "workers = 2")
    proc = run_bascule(conf)
    procs.append(proc)
    await asyncio.to_thread(wait_port, port)
    assert await asyncio.to_thread(poll, lambda: len(children_of(proc.pid)) == 2, 10)
    victim = children_of(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        kids = children_of(proc.pid)
        return len(kids) == 2 and victim not in kids

    assert await asyncio.to_thread(poll, replaced, 10)
    async with aiohttp.ClientSession() as client:
        for _ in range(10):
            async with client.get(f"http://127.0.0.1:{port}/") as resp:
                assert await resp.text() == "hello"
    proc.send_signal(signal.SIGTERM)
    out, _ = await asyncio.to_thread(proc.communicate, timeout=15)
    assert proc.returncode == 0
    assert f"(pid {victim}) died unexpectedly (signal 9); restarting" in out.decode()
    listener.close()


def test_refuses_pure_python_http_parser(tmp_path: Path) -> None:
    conf, _ = write_config(tmp_path, [free_port()])
    res = subprocess.run([sys.executable, "-m", "proxy", "run", "-c", str(conf)],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"})
    assert res.returncode == 1
    assert "aiohttp's C HTTP parser is not in use" in res.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        conf, _ = write_config(tmp_path, [free_port()])
        conf.write_text(conf.read_text().replace(
            conf.read_text().split('listen = ["')[1].split('"')[0], f"127.0.0.1:{port}", 1))
        res = subprocess.run([sys.executable, "-m", "proxy", "run", "-c", str(conf)],
                             capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in res.stderr


def test_version() -> None:
    res = subprocess.run([sys.executable, "-m", "proxy", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("bascule ")




async def test_demo_balances_over_three_named_backends(
        procs: list[subprocess.Popen[bytes]]) -> None:
    if not ports_free(8080, 9001, 9002, 9003, 9901):
        pytest.skip("demo ports 8080/9001-9003/9901 are in use on this machine")
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    procs.append(proc)
    for port in (8080, 9001, 9002, 9003):
        await asyncio.to_thread(wait_port, port)
    async with aiohttp.ClientSession() as client:
        names = []
        for _ in range(3):
            async with client.get("http://127.0.0.1:8080/") as resp:
                names.append((await resp.text()).splitlines()[0])
    assert sorted(names) == ["Hostname: backend-9001", "Hostname: backend-9002",
                             "Hostname: backend-9003"]
    proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(proc.wait, 15) == 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("shared", ["server", "admin"])
async def test_a_second_bascule_on_the_same_port_refuses_to_start(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]], shared: str) -> None:
    """SO_REUSEPORT would let two Bascules split one port's traffic silently; the
    second is refused with the port named (the first keeps serving alone)."""
    async def hello(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(text="first")

    _, listener = await start_backend(hello)
    first_dir, second_dir = tmp_path / "a", tmp_path / "b"
    first_dir.mkdir()
    second_dir.mkdir()
    conf, port = write_config(first_dir, [port_of(listener)], "workers = 2")
    first = run_bascule(conf)
    procs.append(first)
    await asyncio.to_thread(wait_port, port)
    text = conf.read_text()
    admin = text.split('[admin]\nlisten = "')[1].split('"')[0]
    other, _ = write_config(second_dir, [port_of(listener)])
    other_text = other.read_text()
    other_admin = other_text.split('[admin]\nlisten = "')[1].split('"')[0]
    other_listen = other_text.split('listen = ["')[1].split('"')[0]
    if shared == "server":
        other.write_text(other_text.replace(other_listen, f"127.0.0.1:{port}", 1))
        taken = f"127.0.0.1:{port}"
    else:
        other.write_text(other_text.replace(other_admin, admin, 1))
        taken = admin
    res = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "proxy", "run", "-c", str(other)],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert f"cannot listen on {taken}: {taken} is in use by another process" in res.stderr
    assert first.poll() is None
    first.send_signal(signal.SIGTERM)
    await asyncio.to_thread(first.communicate, timeout=15)
    listener.close()


async def test_workers_exit_when_the_supervisor_is_killed(
        tmp_path: Path, procs: list[subprocess.Popen[bytes]]) -> None:
    conf, port = write_config(tmp_path, [free_port()], "workers = 2")
    proc = run_bascule(conf)
    procs.append(proc)
    await asyncio.to_thread(wait_port, port)
    assert await asyncio.to_thread(poll, lambda: len(children_of(proc.pid)) == 2, 30), \
        "the two workers did not start"
    workers = children_of(proc.pid, name=None)  # the agent too
    assert len(workers) == 3
    proc.kill()  # as the OOM killer would: no chance to stop the workers itself
    await asyncio.to_thread(proc.wait, 10)
    assert await asyncio.to_thread(
        poll, lambda: not any(_alive(pid) for pid in workers), 20), \
        f"outlived it: {[(pid, _comm(pid)) for pid in workers if _alive(pid)]}"

    def refused() -> bool:  # nobody serves the port any more
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return False
        except OSError:
            return True

    assert await asyncio.to_thread(poll, refused, 5), "the port is still served"
