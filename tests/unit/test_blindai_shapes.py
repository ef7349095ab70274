"""BlindAI `fact` (tensor shape) parsing: any shape a client sends either describes its
bytes_data exactly or is refused as the caller's mistake (ProtocolError, a 400), never an
OverflowError or numpy ValueError that became a 500 (issue 21 item 10:
``fact = [0, 2**64 - 1]`` with empty data)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blindinfer.errors import ProtocolError
from blindinfer.server.blindai import schemas

U64 = 2**64 - 1


def _tensor(fact: object, code: int = 0, data: bytes = b"") -> dict[str, Any]:
    return {"info": {"fact": fact, "datum_type": code, "node_name": None}, "bytes_data": data}


@pytest.mark.parametrize(
    "fact",
    [
        [0, U64],  # the reported one: 0 elements, so the byte count "matched"
        [U64, 0],
        [0, 2**63],
        [0, 2**63 - 1],  # fits int64, but not numpy's byte-size bound
        [0, 2**61],  # 2**61 float32 = 2**63 bytes
        [0, 2**40, 2**40],  # each fine, together too many
        [0] + [2**32] * 3,
        [0, U64, U64],
    ],
)
def test_overflowing_empty_shapes_are_refused(fact: list[int]) -> None:
    with pytest.raises(ProtocolError) as caught:
        schemas.parse_tensor(_tensor(fact), 0)
    assert caught.value.code == "invalid_request"
    assert "inputs[0].info.fact" in caught.value.message


def test_large_but_representable_empty_shape_is_accepted() -> None:
    tensor = schemas.parse_tensor(_tensor([0, 2**60], code=6), 0)  # uint8
    assert tensor.array.shape == (0, 2**60) and tensor.array.nbytes == 0


_dims = st.one_of(
    st.integers(0, 4),
    st.integers(0, 2**70),
    st.sampled_from([0, 1, 2**31, 2**32, 2**61, 2**62, 2**63 - 1, 2**63, U64, 2**64]),
)


@settings(max_examples=400, deadline=None)
@given(
    fact=st.lists(_dims, max_size=schemas.MAX_RANK + 1),
    code=st.integers(0, len(schemas.DATUM_TYPES) - 1),
    data=st.binary(max_size=64),
)
def test_any_shape_parses_exactly_or_is_refused(fact: list[int], code: int, data: bytes) -> None:
    refused: ProtocolError | None = None
    try:
        tensor = schemas.parse_tensor(_tensor(fact, code, data), 3)
    except ProtocolError as exc:
        refused = exc
    if refused is not None:
        assert refused.code == "invalid_request" and refused.message.startswith("inputs[3]")
        return
    # accepted: the shape is the one sent and describes exactly the bytes sent
    assert list(tensor.array.shape) == fact
    assert math.prod(fact) * schemas.DATUM_TYPES[code].itemsize == len(data)


@settings(max_examples=200, deadline=None)
@given(
    fact=st.lists(st.integers(0, 3), max_size=4),
    code=st.integers(0, len(schemas.DATUM_TYPES) - 1),
)
def test_consistent_small_shapes_are_accepted(fact: list[int], code: int) -> None:
    data = bytes(math.prod(fact) * schemas.DATUM_TYPES[code].itemsize)
    tensor = schemas.parse_tensor(_tensor(fact, code, data), 0)
    assert list(tensor.array.shape) == fact
