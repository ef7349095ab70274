"""Starting the server as a separate process and waiting until it listens.

Used by `blindinfer demo`, the end-to-end tests and the benchmarks, so that client and
server are separate processes as in production.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import IO

READY_PREFIX = "blindinfer: serving on "


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen[str]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_server(
    args: Sequence[str] = ("--simulation",),
    *,
    timeout: float = 60.0,
    stderr: int | IO[str] | None = None,
    port: int = 0,
) -> ServerProcess:
    """Runs `blindinfer serve --port PORT ARGS` and returns once it prints its address.

    `port` 0 takes any free port; a fixed one lets a replica restart where it was. The
    server's log goes to `stderr` (inherited by default; a file to inspect it)."""
    command = [sys.executable, "-m", "blindinfer.cli.main", "serve", "--port", str(port), *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith(READY_PREFIX):
            return ServerProcess(line[len(READY_PREFIX) :].strip(), process)
    process.kill()
    process.wait()
    raise RuntimeError(f"the server did not start (exit code {process.returncode})")
