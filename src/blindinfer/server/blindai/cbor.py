"""Bounded CBOR for the BlindAI Core compatible listeners.

Decoding is done by `cbor2` (maintained, C-accelerated), but only after a structural scan
of our own has checked the bytes against explicit bounds: total size (the caller bounds
the body), nesting depth, and number of items. The scan builds no objects, allocates
nothing proportional to what a header *claims*, and stops at the first item past the
budget, so a hostile header ("an array of 2**63 items") or a deeply nested document costs
at most `max_items` steps. Indefinite lengths and tags are refused: BlindAI clients
(Python `cbor2.dumps`, Rust `serde_cbor`) never send them, and tags are how a CBOR decoder
is made to build big integers, dates or shared references from a few bytes.

One value is special: BlindAI's Python client sends the model as a CBOR *array of
integers* (`list(model_bytes)`), one item per byte. Decoding that generically would build
a Python list of ~91 million ints for a 91 MB model (~730 MB of pointers, seconds of
work). `decode_top_map` therefore decodes a top-level array of 0..255 integers, at a key
the caller names, straight into a `bytearray` with numpy, chunk by chunk: each byte
0x00..0x17 is an item whose value is itself; 0x18 announces one value byte. So an item's
value is always the byte that ends it, and the item boundaries only depend on the parity
of runs of 0x18 bytes, which numpy computes without a Python loop.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import cbor2
import numpy as np
import numpy.typing as npt

from blindinfer.errors import ProtocolError

MAX_DEPTH = 16
MAX_ITEMS = 1 << 16
CHUNK = 1 << 22  # bytes of an int-array model examined per numpy step (~40 MB scratch)

_MAJOR_BYTES, _MAJOR_TEXT = 2, 3
_MAJOR_ARRAY, _MAJOR_MAP, _MAJOR_TAG = 4, 5, 6
_ARG_SIZES = {24: 1, 25: 2, 26: 4, 27: 8}
_UINT8_HEADER = 0x18  # major 0, one argument byte follows


class CborBoundsError(ProtocolError):
    """The CBOR document is malformed or exceeds a bound (depth, items, size)."""

    def __init__(self, message: str) -> None:
        super().__init__("malformed_cbor", message)


@dataclass(frozen=True, slots=True)
class Bounds:
    max_depth: int = MAX_DEPTH
    max_items: int = MAX_ITEMS
    max_bytes_array: int = 0  # longest integer-array-as-bytes accepted (0: none)


def _header(buf: memoryview, pos: int) -> tuple[int, int, int]:
    """(major type, argument, position after the header) of the item at `pos`."""
    if pos >= len(buf):
        raise CborBoundsError("the CBOR document ends in the middle of an item")
    initial = buf[pos]
    major, info = initial >> 5, initial & 0x1F
    if info < 24:
        return major, info, pos + 1
    size = _ARG_SIZES.get(info)
    if size is None:
        if info == 31:
            raise CborBoundsError("indefinite-length CBOR items are not accepted")
        raise CborBoundsError("reserved CBOR additional information")
    end = pos + 1 + size
    if end > len(buf):
        raise CborBoundsError("the CBOR document ends in the middle of a header")
    return major, int.from_bytes(buf[pos + 1 : end], "big"), end


def skip(buf: memoryview, pos: int, bounds: Bounds, items: int = 0) -> tuple[int, int]:
    """Checks one well-formed item at `pos` within the bounds, without decoding it.

    Returns (position after it, items counted so far). Iterative: no recursion, whatever
    the nesting the input claims.
    """
    pending = [1]  # items still to read at each open nesting level
    while pending:
        if pending[-1] == 0:
            pending.pop()
            continue
        pending[-1] -= 1
        items += 1
        if items > bounds.max_items:
            raise CborBoundsError(f"the CBOR document has more than {bounds.max_items} items")
        major, arg, pos = _header(buf, pos)
        if major in (_MAJOR_BYTES, _MAJOR_TEXT):
            if arg > len(buf) - pos:
                raise CborBoundsError("a CBOR string is longer than the document")
            pos += arg
        elif major in (_MAJOR_ARRAY, _MAJOR_MAP):
            count = arg * (2 if major == _MAJOR_MAP else 1)
            if count > len(buf) - pos:  # every item takes at least one byte
                raise CborBoundsError("a CBOR container claims more items than it can hold")
            if len(pending) >= bounds.max_depth:
                raise CborBoundsError(f"the CBOR document nests deeper than {bounds.max_depth}")
            pending.append(count)
        elif major == _MAJOR_TAG:
            raise CborBoundsError("CBOR tags are not accepted")
    return pos, items


def loads(data: bytes | bytearray | memoryview, bounds: Bounds = Bounds()) -> Any:
    """One CBOR item, checked against `bounds` before cbor2 decodes it."""
    view = memoryview(data)
    end, _ = skip(view, 0, bounds)
    if end != len(view):
        raise CborBoundsError("trailing bytes after the CBOR document")
    return _cbor2_loads(view)


def _cbor2_loads(view: memoryview) -> Any:
    try:
        return cbor2.loads(bytes(view))
    except (cbor2.CBORDecodeError, ValueError, OverflowError, RecursionError) as exc:
        raise CborBoundsError("the CBOR document could not be decoded") from exc


def decode_top_map(
    data: bytes | bytearray | memoryview,
    bounds: Bounds,
    bytes_keys: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """A top-level CBOR map with text keys.

    Values at `bytes_keys` may be a byte string or an array of integers 0..255 (at most
    `bounds.max_bytes_array` of them); both come back as `bytes`. Everything else is
    bounded by `bounds` as a whole (items counted across all values).
    """
    view = memoryview(data)
    major, count, pos = _header(view, 0)
    if major != _MAJOR_MAP:
        raise CborBoundsError("the request must be a CBOR map")
    if 2 * count > len(view) - pos:
        raise CborBoundsError("the CBOR map claims more entries than it can hold")
    result: dict[str, Any] = {}
    items = 1
    for _ in range(count):
        start = pos
        pos, items = skip(view, pos, bounds, items)
        key = _cbor2_loads(view[start:pos])
        if not isinstance(key, str):
            raise CborBoundsError("request map keys must be text strings")
        if key in result:
            raise CborBoundsError(f"duplicate key {key[:40]!r} in the request")
        if key in bytes_keys and pos < len(view) and view[pos] >> 5 == _MAJOR_ARRAY:
            _, length, body = _header(view, pos)
            if length > bounds.max_bytes_array:
                raise CborBoundsError(
                    f"{key} has {length} items; at most {bounds.max_bytes_array} are accepted"
                )
            result[key], pos = decode_uint8_array(view, body, length)
            continue
        start = pos
        pos, items = skip(view, pos, Bounds(bounds.max_depth - 1, bounds.max_items), items)
        value = _cbor2_loads(view[start:pos])
        if key in bytes_keys and not isinstance(value, bytes):
            raise CborBoundsError(f"{key} must be a byte string or an array of integers 0-255")
        result[key] = value
    if pos != len(view):
        raise CborBoundsError("trailing bytes after the CBOR document")
    return result


def decode_uint8_array(buf: memoryview, pos: int, length: int) -> tuple[bytes, int]:
    """`length` CBOR unsigned integers 0..255 starting at `pos`, as bytes.

    Returns (the bytes, position after the last item). Works on CHUNK bytes at a time
    (scratch memory ~10x CHUNK), whatever `length` is; the output is preallocated only
    up to what the input can actually hold (one byte of input per item at least).
    """
    if length > len(buf) - pos:
        raise CborBoundsError("the integer array claims more items than the document holds")
    out = bytearray(length)
    filled = 0
    pending_value = False  # the previous chunk ended with a 0x18 header
    while filled < length:
        if pos >= len(buf):
            raise CborBoundsError("the integer array ends before its last item")
        # Items take one or two bytes: 2*(items left) bytes always reach the array end.
        stop = min(len(buf), pos + min(CHUNK, 2 * (length - filled) + 1))
        chunk: npt.NDArray[np.uint8] = np.frombuffer(buf[pos:stop], dtype=np.uint8)
        emit, header_at_end = _classify(chunk, pending_value)
        values = chunk[emit]
        need = length - filled
        if len(values) >= need:
            last = int(np.flatnonzero(emit)[need - 1])
            _check_headers(chunk[: last + 1], emit[: last + 1], pending_value)
            out[filled:length] = values[:need].tobytes()
            return bytes(out), pos + last + 1
        _check_headers(chunk, emit, pending_value)
        out[filled : filled + len(values)] = values.tobytes()
        filled += len(values)
        pending_value = header_at_end
        pos = stop
    return bytes(out), pos  # length == 0


def _classify(
    chunk: npt.NDArray[np.uint8], pending_value: bool
) -> tuple[npt.NDArray[np.bool_], bool]:
    """Which bytes end an item (their value is the byte itself), and whether the chunk
    ends on a 0x18 header whose value byte is in the next chunk.

    A byte is a header unless the byte before it was a 0x18 *header*. Runs of 0x18 start
    at a header position (after any other byte, which always ends an item), or at a value
    position when the chunk starts right after a header; within a run, positions
    alternate header / value. Every byte but a 0x18 header ends an item.
    """
    n = len(chunk)
    is18 = chunk == _UINT8_HEADER
    index = np.arange(n, dtype=np.int32)
    starts = is18.copy()
    starts[1:] &= ~is18[:-1]
    run_start = np.maximum.accumulate(index * starts)
    parity = (index - run_start) & 1  # 0 at the first byte of each run
    if pending_value and n and is18[0]:
        # the first run starts at a value position: flip its parity
        first_run_end = int(np.argmin(is18)) if not is18.all() else n
        parity[:first_run_end] ^= 1
    header18 = is18 & (parity == 0)
    emit = ~header18
    header_at_end = bool(n and header18[-1])
    return emit, header_at_end


def _check_headers(
    chunk: npt.NDArray[np.uint8], emit: npt.NDArray[np.bool_], pending_value: bool
) -> None:
    """A byte in header position must be 0x00..0x18; anything else (a header for a bigger
    integer, a negative one, a string...) is refused. Header positions: the first byte
    unless a header precedes the chunk, and every byte after one that ends an item."""
    header_position = np.empty(len(chunk), dtype=np.bool_)
    header_position[1:] = emit[:-1]
    if len(chunk):
        header_position[0] = not pending_value
    if (header_position & (chunk > _UINT8_HEADER)).any():
        raise CborBoundsError("the model array must hold only integers from 0 to 255")


def dumps(value: object) -> bytes:
    """CBOR as BlindAI's serde_cbor writes it (definite lengths, no tags)."""
    return cbor2.dumps(value)


def encode_uint8_array(data: bytes) -> bytes:
    """What BlindAI's client sends for `list(data)`: a CBOR array of small integers
    (for tests and benchmarks: builds the encoding without a Python list)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    small = arr < _UINT8_HEADER
    sizes = np.where(small, 1, 2)
    out = np.empty(int(sizes.sum()), dtype=np.uint8)
    ends = np.cumsum(sizes)
    out[ends - 1] = arr
    out[(ends - 2)[~small]] = _UINT8_HEADER
    n = len(data)
    if n < 24:
        head = bytes([0x80 | n])
    elif n < 1 << 8:
        head = bytes([0x98, n])
    elif n < 1 << 16:
        head = b"\x99" + struct.pack(">H", n)
    elif n < 1 << 32:
        head = b"\x9a" + struct.pack(">I", n)
    else:
        head = b"\x9b" + struct.pack(">Q", n)
    return head + out.tobytes()
