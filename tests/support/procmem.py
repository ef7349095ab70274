"""Resident memory of a process tree, read from /proc (Linux)."""

from __future__ import annotations

from pathlib import Path


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in _children(parent)]
        pids += frontier
    return pids


def rss_bytes(pid: int) -> int:
    total = 0
    for member in tree(pid):
        try:
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


def own_rss_bytes(pid: int) -> int:
    """Resident memory of `pid` alone, without its children (the server, not its workers)."""
    return _status_kib(pid, "VmRSS")


def peak_rss_bytes(pid: int) -> int:
    """The most resident memory `pid` alone ever had (VmHWM): catches a spike between two
    samples, e.g. a response encoded and sent in a second."""
    return _status_kib(pid, "VmHWM")
