"""Small helpers every route uses: JSON responses and the shared server state."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from blindinfer.server.state import ServerState

T = TypeVar("T")

OFF_LOOP_BYTES = 256 * 1024
"""Outputs from this size on are encoded on a thread (a thread hop costs more than
encoding smaller ones: 64 Ki JSON numbers take about 10 ms)."""


def json_response(document: object, status: int = 200) -> Response:
    return Response(
        json.dumps(document, separators=(",", ":")), status, media_type="application/json"
    )


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.blindinfer
    return state


def tensor_bytes(arrays: Mapping[str, object]) -> int:
    """The bytes of data in `arrays` (what a digest or an encoder reads)."""
    return sum(int(np.asarray(array).nbytes) for array in arrays.values())


async def encode_outputs(
    outputs: Mapping[str, npt.NDArray[Any]], encode: Callable[[], T], extra_bytes: int = 0
) -> T:
    """`encode()`, on a thread when `outputs` are large: encoding millions of numbers as
    JSON takes seconds, and on the event loop it would stall every connection, health
    checks and attestation included. Their size is bounded before they reach the server
    (--max-response-bytes, checked in the worker). `extra_bytes`: other tensor bytes that
    `encode()` reads (a receipt's digest of the inputs), counted in the same budget."""
    if tensor_bytes(outputs) + extra_bytes < OFF_LOOP_BYTES:
        return encode()
    return await run_in_threadpool(encode)
