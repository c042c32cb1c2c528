"""Process model: a supervisor forks `server.workers` worker processes, each with its
own event loop and SO_REUSEPORT listener; a worker that dies unexpectedly is logged
and restarted (with backoff when it keeps crashing). SIGTERM/SIGINT are passed on so
every worker drains; the supervisor exits 0 once all have stopped.

The supervisor claims every listen address before anything else (proxy/listeners.py)
and makes each worker's listening sockets just before forking it. It also forks the
discovery agent (proxy/agent/process.py): Consul watches, active health checks and
ejection decisions run there once for all workers, which reach it over a Unix socket
the supervisor made first (in a private directory) and keeps, so the agent can be
restarted, like a worker, without the workers noticing more than a reconnect. A worker never
outlives its supervisor: it asks the kernel for SIGTERM when the supervisor dies
(PR_SET_PDEATHSIG, Linux), and checks its parent right after, in case the
supervisor died before the request was made. SIGTERM makes it drain and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable

from prometheus_client.multiprocess import mark_process_dead

from proxy.agent.link import AGENT_SOCKET_ENV
from proxy.app import build_runtime
from proxy.config import Config
from proxy.listeners import PortInUse, claim_port, listening_socket
from proxy.purge import PURGE_DIR_ENV
from proxy.server import ADMIN_BACKLOG, PUBLIC_BACKLOG, serve_worker
from proxy.tls.server import build_certificates, front_context

__all__ = ["run_supervisor"]

log = logging.getLogger("bascule.workers")


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


_PR_SET_NAME = 15


def _die_with_parent(parent: int, name: bytes) -> None:
    """SIGTERM when the supervisor dies (SIGKILL, the OOM killer): a worker left
    behind would keep serving the port beside the next Bascule. Also names the
    process (`ps -o comm`, /proc/PID/comm: bascule-worker, bascule-agent)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)
    except OSError:
        log.warning("could not ask to be stopped with the supervisor (prctl)")
    if os.getppid() != parent:  # died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _worker_sockets(config: Config) -> dict[str, socket.socket]:
    sockets = {address: listening_socket(address, PUBLIC_BACKLOG)
               for address in config.server.all_listen()}
    sockets[config.admin.listen] = listening_socket(config.admin.listen, ADMIN_BACKLOG)
    return sockets


def _worker_main(config: Config, file: str, worker_id: int,
                 sockets: dict[str, socket.socket], tls_front: ssl.SSLContext | None) -> int:
    # A stop can arrive while the worker is still starting: remember it, and the
    # worker drains (nothing yet) and exits 0 as soon as it is up.
    stop_requested: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop_requested.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # purge broadcast: the loop handles it
    try:
        runtime = build_runtime(config, file)
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
        if config.server.uvloop:
            import uvloop

            loop_factory = uvloop.new_event_loop
        # The config and runtime live for the worker's lifetime: move them out of the
        # collector's view, and collect young objects less often (request-scoped
        # cycles are few; a full scan every 700 allocations showed in profiles).
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 20)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve_worker(runtime, worker_id, stop_requested, sockets, tls_front))
        return 0
    except Exception:
        log.exception("worker %d failed", worker_id)
        return 1


AGENT = 0  # the agent's id among the supervisor's children; workers count from 1


def _agent_main(config: Config, listening: socket.socket) -> int:
    from proxy.agent.process import serve_agent

    stop_requested: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop_requested.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
        if config.server.uvloop:
            import uvloop

            loop_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve_agent(listening, stop_requested))
        return 0
    except Exception:
        log.exception("discovery agent failed")
        return 1


def _spawn_agent(config: Config, listening: socket.socket) -> int:
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _die_with_parent(parent, b"bascule-agent")
            code = _agent_main(config, listening)
        finally:
            logging.shutdown()
            os._exit(code)
    log.info("discovery agent started (pid %d)", pid)
    return pid


def _spawn(config: Config, file: str, worker_id: int,
           agent_socket: socket.socket | None = None,
           tls_front: ssl.SSLContext | None = None) -> int:
    if worker_id == AGENT:
        assert agent_socket is not None
        return _spawn_agent(config, agent_socket)
    sys.stdout.flush()
    sys.stderr.flush()
    sockets = _worker_sockets(config)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _die_with_parent(parent, b"bascule-worker")
            if agent_socket is not None:
                agent_socket.close()  # the agent's to accept on, not a worker's
            code = _worker_main(config, file, worker_id, sockets, tls_front)
        finally:
            logging.shutdown()
            os._exit(code)
    for sock in sockets.values():
        sock.close()  # the worker has them; held here they would queue connections
    log.info("worker %d started (pid %d)", worker_id, pid)
    return pid


def _raise_open_files(config: Config) -> None:
    """Room for max_connections per worker: a proxied connection takes two file
    descriptors (client and backend), plus pools, logs and listeners. Past the limit
    accept() fails and new clients wait in the backlog instead of being shed."""
    import resource

    want = 2 * config.server.max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    if soft < want:
        log.warning("open-files limit %d is below the %d that server.max_connections = %d "
                    "needs; raise it (ulimit -n) or lower max_connections", soft, want,
                    config.server.max_connections)


def run_supervisor(config: Config, file: str) -> int:
    _raise_open_files(config)
    # Fail fast and clearly if a port is taken, before forking anything; the claims
    # are held until the supervisor exits (proxy/listeners.py).
    claims: list[socket.socket] = []
    for address in dict.fromkeys([*config.server.all_listen(), config.admin.listen]):
        try:
            claims.append(claim_port(address))
        except PortInUse as exc:
            log.error("cannot listen on %s: %s", address, exc.strerror)
            for claim in claims:
                claim.close()
            return 1
        except OSError as exc:
            log.error("cannot listen on %s: %s", address, exc.strerror or exc)
            for claim in claims:
                claim.close()
            return 1

    # prometheus-client multiprocess mode: every worker writes its own files here and
    # any worker's /metrics sums them. Fresh per run, so nothing from a previous run
    # leaks into the totals; removed at exit.
    metrics_dir = tempfile.mkdtemp(prefix="bascule-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    purge_dir = tempfile.mkdtemp(prefix="bascule-purge-")  # proxy/purge.py
    os.environ[PURGE_DIR_ENV] = purge_dir
    agent_dir = tempfile.mkdtemp(prefix="bascule-agent-")  # 0700: ours alone
    agent_path = os.path.join(agent_dir, "agent.sock")
    agent_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    agent_socket.bind(agent_path)
    agent_socket.listen(1024)  # every worker's reconnect fits while the agent restarts
    os.environ[AGENT_SOCKET_ENV] = agent_path
    try:
        return _supervise(config, file, metrics_dir, agent_socket)
    finally:
        for claim in claims:
            claim.close()
        agent_socket.close()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        shutil.rmtree(purge_dir, ignore_errors=True)
        shutil.rmtree(agent_dir, ignore_errors=True)


def _supervise(config: Config, file: str, metrics_dir: str,
               agent_socket: socket.socket) -> int:
    count = config.server.worker_count()
    # Made here, before forking, so that every worker shares its session-ticket keys
    # (proxy/tls/server.py, "Session resumption across workers").
    tls_front = None
    if config.server.tls is not None:
        tls = config.server.tls
        tls_front = front_context(tls, build_certificates(tls, file))
    workers: dict[int, int] = {}  # pid -> worker id (AGENT for the agent)
    stopping = False
    crashes: dict[int, list[float]] = {}

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        # The agent is stopped last (below), once no worker needs it while draining.
        for pid, worker_id in list(workers.items()):
            if worker_id != AGENT:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
        stop_agent_if_alone()

    def stop_agent_if_alone() -> None:
        if stopping and set(workers.values()) == {AGENT}:
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, forward)

    workers[_spawn(config, file, AGENT, agent_socket)] = AGENT
    for worker_id in range(1, count + 1):
        workers[_spawn(config, file, worker_id, agent_socket, tls_front)] = worker_id
    if stopping:  # a stop that came while forking: pass it to the late ones too
        forward(signal.SIGTERM, None)
    log.info("bascule serving on %s with %d worker(s)", ", ".join(
        [*config.server.listen, *(f"{a} (TLS)" for a in (config.server.tls.listen
                                                       if config.server.tls else []))]), count)

    exit_code = 0
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        worker_id = workers.pop(pid, -1)
        if worker_id < 0:
            continue
        # A dead worker's live gauges (in-flight, up) must not count any more; its
        # counters stay, so totals never go backwards.
        mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
        code = os.waitstatus_to_exitcode(status)
        stop_agent_if_alone()
        if stopping:
            if code != 0:
                log.warning("%s (pid %d) exited with %d while stopping",
                            "discovery agent" if worker_id == AGENT else f"worker {worker_id}",
                            pid, code)
                exit_code = 1
            continue
        log.error("%s (pid %d) died unexpectedly (%s); restarting",
                  "discovery agent" if worker_id == AGENT else f"worker {worker_id}", pid,
                  f"signal {-code}" if code < 0 else f"exit {code}")
        now = time.monotonic()
        recent = [t for t in crashes.get(worker_id, []) if now - t < 10] + [now]
        crashes[worker_id] = recent
        if len(recent) > 3:
            time.sleep(min(5.0, 0.5 * len(recent)))  # crash loop: back off
        if not stopping:
            workers[_spawn(config, file, worker_id, agent_socket, tls_front)] = worker_id
    log.info("bascule stopped")
    return exit_code
