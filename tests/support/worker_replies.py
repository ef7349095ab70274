"""Worker replies as bytes, the way a (possibly hostile) worker writes them on its pipe:
for the tests of the server's reply readers (tests/unit/test_worker_io.py,
test_worker_fast_path.py), which must give the same outcome for any bytes."""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import strategies as st


def frame(data: bytes) -> bytes:
    """One frame of multiprocessing's Connection: a 4-byte big-endian length, the bytes."""
    return struct.pack("!i", len(data)) + data


def reply(tensors: Any, *frames: bytes, ok: bool = True) -> bytes:
    """A reply header announcing `tensors` ([name, dtype, shape] each), then `frames`."""
    return frame(json.dumps({"ok": ok, "tensors": tensors}).encode()) + b"".join(
        frame(f) for f in frames
    )


any_reply_bytes = st.one_of(
    st.binary(max_size=512),
    st.builds(
        lambda tensors, frames, tail: reply(tensors, *frames) + tail,
        st.lists(
            st.lists(
                st.one_of(
                    st.sampled_from(["y", "<f4", "|u1", "|O", "<i8", 3, -1, None]),
                    st.lists(st.integers(-2, 1 << 62), max_size=3),
                ),
                min_size=2,
                max_size=4,
            ),
            max_size=3,
        ),
        st.lists(st.binary(max_size=64), max_size=3),
        st.binary(max_size=8),
    ),
)
"""Random bytes, and well-framed replies with arbitrary announcements, frames and tails."""
