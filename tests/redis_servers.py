"""Real redis-server processes for the tests: one on a free loopback port (a test can
kill it and start it again on the same port), and a three-node Redis Cluster made
with `redis-cli --cluster create`."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import free_port, poll, ports_free

__all__ = ["RedisCluster", "RedisServer", "require_redis"]


def require_redis() -> None:
    missing = [c for c in ("redis-server", "redis-cli") if shutil.which(c) is None]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not found: install it (Debian: apt-get install "
                           "redis-server redis-tools); `make test` does this when root")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    port: int = field(default_factory=free_port)
    extra: tuple[str, ...] = ()
    directory: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="bascule-redis-"))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        require_redis()
        log = os.path.join(self.directory, "redis.log")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", self.directory,
             "--logfile", log, *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not poll(lambda: _ping(self.port), 10):
            output = Path(log).read_text()[-2000:] if os.path.exists(log) else "(no log)"
            self.stop()
            raise RuntimeError(f"redis-server did not answer on port {self.port}:\n{output}")
        return self

    def kill(self) -> None:
        """SIGKILL: the store disappears mid-flight, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)

    def cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], check=True,
                              capture_output=True, text=True, timeout=10).stdout


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too: Redis Cluster
    needs both, so the port must be at most 55535."""
    for _ in range(1000):
        port = random.randint(20000, 55535)
        if ports_free(port, port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


@dataclass
class RedisCluster:
    nodes: list[RedisServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self, size: int = 3) -> RedisCluster:
        require_redis()
        for _ in range(size):
            node = RedisServer(port=free_cluster_port(),
                               extra=("--cluster-enabled", "yes",
                                      "--cluster-node-timeout", "2000"))
            node.extra += ("--cluster-config-file", f"{node.directory}/nodes.conf")
            self.nodes.append(node.start())
        subprocess.run(
            ["redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, capture_output=True, timeout=30)
        if not poll(lambda: all("cluster_state:ok" in n.cli("cluster", "info")
                                for n in self.nodes), 20, interval=0.1):
            self.stop()
            raise RuntimeError("the Redis cluster did not reach cluster_state:ok")
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
