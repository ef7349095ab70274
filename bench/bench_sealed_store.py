"""Throughput (MiB/s) of SealedStore.put / get for 1, 16 and 128 MiB models (printed only).

put includes SHA-256 of the data, AES-256-GCM encryption, and the durable write (three
files, each fsync'ed, plus directory fsyncs); get includes reading, decryption,
authentication and the SHA-256 check. Run: .venv/bin/python bench/bench_sealed_store.py
[--dir DIR] (default: a temporary directory; pick one on the disk you will deploy on).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from blindinfer.store.sealed import ModelRecord, SealedStore

MiB = 1024 * 1024
SIZES = (1, 16, 128)


def _record(data: bytes, i: int) -> ModelRecord:
    return ModelRecord(
        model_id=f"m-{os.urandom(16).hex()}",
        name=f"bench-{i}",
        sha256=hashlib.sha256(data).hexdigest(),
        owner="bench",
        size=len(data),
        created_at=time.time(),
    )


def _bench(directory: Path, size_mib: int, repeats: int) -> tuple[list[float], list[float]]:
    store = SealedStore(directory, os.urandom(32), max_bytes=1 << 40)
    puts, gets = [], []
    for i in range(repeats):
        data = os.urandom(size_mib * MiB)  # fresh bytes each time: no dedup shortcut
        rec = _record(data, i)
        t0 = time.perf_counter()
        store.put(rec, data)
        t1 = time.perf_counter()
        back = store.get(rec.model_id)
        t2 = time.perf_counter()
        assert back == data
        puts.append(size_mib / (t1 - t0))
        gets.append(size_mib / (t2 - t1))
        store.delete(rec.model_id)
    return puts, gets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'size':>8}  {'put MiB/s (median, min-max)':>30}  {'get MiB/s (median, min-max)':>30}")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for size in SIZES:
            puts, gets = _bench(Path(tmp) / f"s{size}", size, args.repeats)
            print(
                f"{size:>5} MiB  "
                f"{statistics.median(puts):>12.0f} ({min(puts):.0f}-{max(puts):.0f})"
                f"{'':>6}"
                f"{statistics.median(gets):>12.0f} ({min(gets):.0f}-{max(gets):.0f})"
            )
    print("(put is durable: fsync'ed before it returns)")


if __name__ == "__main__":
    main()
