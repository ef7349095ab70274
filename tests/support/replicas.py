"""Replicas behind HAProxy on loopback: N real servers, one shared sealed store, TCP balancing.

HAProxy (Debian's package) runs in TCP mode, so TLS ends in the replicas and every replica
presents its own key, as a Kubernetes Service in front of Confidential Containers does.
Each replica listens on a port chosen here, so that a replica killed with SIGKILL can be
replaced by a new one (new key, new evidence) on the same port, as a restarted pod is.
Each runs with its own `--replica-id r<index>` (its own audit log on the shared store) and
writes its log to `r<index>.log` beside the store.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from blindinfer.server.process import ServerProcess, start_server

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def haproxy_available() -> bool:
    return Path(HAPROXY).exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _config(front: int, backends: Sequence[int]) -> str:
    servers = "\n".join(
        f"    server r{i} 127.0.0.1:{port} check inter 200ms fall 1 rise 1"
        for i, port in enumerate(backends)
    )
    return f"""global
    maxconn 4096
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    option redispatch
    retries 2
frontend front
    bind 127.0.0.1:{front}
    default_backend replicas
backend replicas
    balance roundrobin
{servers}
"""


@dataclass
class ReplicaSet:
    """The balancer's URL and the replicas behind it (index -> running server)."""

    url: str
    ports: list[int]
    store_dir: Path
    extra_args: list[str]
    replicas: dict[int, ServerProcess] = field(default_factory=dict)

    def start(self, index: int) -> ServerProcess:
        log = (self.store_dir.parent / f"r{index}.log").open("a", encoding="utf-8")
        try:
            server = start_server(
                [
                    "--simulation",
                    "--store-dir",
                    str(self.store_dir),
                    "--replica-id",
                    f"r{index}",
                    *self.extra_args,
                ],
                port=self.ports[index],
                stderr=log,
            )
        finally:
            log.close()  # the server process holds its own copy
        self.replicas[index] = server
        return server

    def direct_url(self, index: int) -> str:
        """The replica's own address, bypassing the balancer."""
        return f"https://127.0.0.1:{self.ports[index]}"

    def kill(self, index: int) -> None:
        """SIGKILL, as a crashed pod: no shutdown path runs."""
        server = self.replicas.pop(index)
        server.process.kill()
        server.process.wait()
        server.stop()

    def stop(self) -> None:
        for server in self.replicas.values():
            server.stop()
        self.replicas.clear()


@contextmanager
def balancer(config_dir: Path, backends: Sequence[int]) -> Iterator[str]:
    """A HAProxy in TCP mode over `backends` (ports on loopback); yields its https URL."""
    front = free_port()
    config = config_dir / f"haproxy-{front}.cfg"
    config.write_text(_config(front, backends), encoding="utf-8")
    process = subprocess.Popen(
        [HAPROXY, "-f", str(config), "-db", "-q"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(front, process)
        yield f"https://127.0.0.1:{front}"
    finally:
        process.terminate()
        process.wait(timeout=10)


@contextmanager
def replica_set(
    store_dir: Path, count: int = 3, extra_args: Sequence[str] = ()
) -> Iterator[ReplicaSet]:
    """`count` replicas sharing `store_dir`, behind a HAProxy started for them."""
    ports = [free_port() for _ in range(count)]
    replicas = ReplicaSet("", ports, store_dir, list(extra_args))
    try:
        for index in range(count):
            replicas.start(index)
        with balancer(store_dir.parent, ports) as url:
            replicas.url = url
            yield replicas
    finally:
        replicas.stop()


def _wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"haproxy exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("haproxy did not start listening")
