"""Plain-text progress bars on stderr for the CLI (no dependency).

On a terminal the bar is redrawn in place (at most every `interval` seconds, and at the
end); otherwise, e.g. in a CI log, one line per tenth of the way, so logs stay readable.
Standard output is left alone: it carries the command's result (JSON for `upload`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from blindinfer.client.client import Client
from blindinfer.client.models import ModelInfo

WIDTH = 30
MiB = 1 << 20


class ProgressBar:
    """A `progress(done, total)` callback that draws `label [#####-----]  50%  ...`."""

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self._drawn_at = -float("inf")
        self._tenths = -1
        self._finished = False

    def __call__(self, done: int, total: int | None) -> None:
        now = self.clock()
        complete = total is not None and done >= total
        if self.interactive:
            if complete or now - self._drawn_at >= self.interval:
                self._drawn_at = now
                self.stream.write("\r" + self.render(done, total, now))
                if complete:
                    self.stream.write("\n")
                    self._finished = True
                self.stream.flush()
            return
        tenths = 10 * done // total if total else -1
        if complete or (total and tenths > self._tenths):
            self._tenths = tenths
            self.stream.write(self.render(done, total, now) + "\n")
            self.stream.flush()
            self._finished = complete

    def finish(self) -> None:
        """Ends a bar the transfer never completed (an error), so stderr stays tidy."""
        if self.interactive and not self._finished and self._drawn_at > -float("inf"):
            self.stream.write("\n")
            self.stream.flush()
        self._finished = True

    def render(self, done: int, total: int | None, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = f"{done / MiB / elapsed:.1f} MiB/s"
        if not total:
            return f"{self.label}  {done / MiB:.1f} MiB  {rate}"
        fraction = min(done / total, 1.0)
        filled = int(WIDTH * fraction)
        bar = "#" * filled + "-" * (WIDTH - filled)
        return (
            f"{self.label} [{bar}] {fraction:4.0%}  {done / MiB:.1f}/{total / MiB:.1f} MiB  {rate}"
        )


def upload_with_progress(
    client: Client, path: Path, name: str | None, *, stream: TextIO | None = None
) -> ModelInfo:
    """`client.upload_model(path, name=name)` with a progress bar on stderr."""
    bar = ProgressBar(f"uploading {path.name}", stream=stream)
    try:
        return client.upload_model(path, name=name, progress=bar)
    finally:
        bar.finish()
