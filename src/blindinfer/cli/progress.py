"""Progress bars on stderr for the CLI, drawn by tqdm.

On a terminal tqdm redraws the bar in place (at most every `interval` seconds, and at the
end). Otherwise, e.g. in a CI log, tqdm would still write a carriage return per redraw;
there one line per tenth of the way is written instead, formatted by the same tqdm
function, so logs stay readable. Standard output is left alone: it carries the command's
result (JSON for `upload`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Never, TextIO

from tqdm import tqdm

from blindinfer.client.client import Client
from blindinfer.client.models import ModelInfo

MiB = 1 << 20
ASCII = "-#"  # empty, full: `label [#####-----]`, as readable in a log as on a terminal
UNIT = " MiB"
BAR_FORMAT = "{desc} [{bar:30}] {percentage:3.0f}%  {n:.1f}/{total:.1f} MiB  {rate_noinv_fmt}"
NO_TOTAL_FORMAT = "{desc}  {n:.1f} MiB  {rate_noinv_fmt}"


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
        self._bar: tqdm[Never] | None = None
        self._tenths = -1

    def __call__(self, done: int, total: int | None) -> None:
        if self.interactive:
            bar = self._bar
            if bar is None or done < bar.n:  # the first call, or a retry sending it again
                self.finish()
                bar = self._bar = tqdm(
                    total=total,
                    desc=self.label,
                    file=self.stream,
                    mininterval=self.interval,
                    miniters=0,
                    smoothing=0,
                    bar_format=BAR_FORMAT if total else NO_TOTAL_FORMAT,
                    ascii=ASCII,
                    unit=UNIT,
                    unit_scale=1 / MiB,
                )
            bar.update(done - bar.n)
            if total is not None and done >= total:
                self.finish()
            return
        tenths = 10 * done // total if total else -1
        if (total is not None and done >= total) or (total and tenths > self._tenths):
            self._tenths = tenths
            self.stream.write(self.render(done, total, self.clock()) + "\n")
            self.stream.flush()

    def finish(self) -> None:
        """Ends the bar (drawn as it stands, then a newline), complete or not (an error)."""
        if self._bar is not None:
            self._bar.close()

    def render(self, done: int, total: int | None, now: float) -> str:
        return tqdm.format_meter(
            done,
            total or 0,  # 0 as None: no bar, no percentage
            max(now - self.started, 1e-9),
            prefix=self.label,
            bar_format=BAR_FORMAT if total else NO_TOTAL_FORMAT,
            ascii=ASCII,
            unit=UNIT,
            unit_scale=1 / MiB,
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
