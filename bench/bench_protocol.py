"""Cost of the OIP v2 codec on a typical small-transformer request/response.

Not a test: prints microseconds per encode+parse for two 1x128 int64 inputs (token ids and
attention mask) and one 1x384 float32 output (a sentence embedding), in binary and JSON,
so that the codec's share of a request's latency is known rather than guessed.

Run: .venv/bin/python bench/bench_protocol.py
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

import numpy as np

from blindinfer.protocol.inference import (
    HEADER_LENGTH,
    encode_infer_request,
    encode_infer_response,
    parse_header_length,
    parse_infer_request,
    parse_infer_response,
)
from blindinfer.protocol.limits import TensorLimits

LIMITS = TensorLimits()
RNG = np.random.default_rng(0)
INPUTS = {
    "input_ids": RNG.integers(0, 30522, size=(1, 128), dtype=np.int64),
    "attention_mask": np.ones((1, 128), dtype=np.int64),
}
OUTPUTS = {"sentence_embedding": RNG.standard_normal((1, 384)).astype(np.float32)}


def _microseconds(call: Callable[[], object]) -> float:
    """Best-of-5 mean time per call, in microseconds."""
    timer = timeit.Timer(call)
    number, _ = timer.autorange()
    return min(timer.repeat(repeat=5, number=number)) / number * 1e6


def _request_cycle(binary: bool) -> Callable[[], object]:
    def cycle() -> object:
        body, headers = encode_infer_request(INPUTS, binary=binary, outputs=list(OUTPUTS))
        return parse_infer_request(body, parse_header_length(headers.get(HEADER_LENGTH)), LIMITS)

    return cycle


def _response_cycle(binary: bool) -> Callable[[], object]:
    names = set(OUTPUTS) if binary else set()

    def cycle() -> object:
        body, headers = encode_infer_response("minilm", "1", None, OUTPUTS, names)
        return parse_infer_response(body, parse_header_length(headers.get(HEADER_LENGTH)), LIMITS)

    return cycle


def main() -> None:
    """Print one line per (message, encoding): body size and encode+parse cost."""
    for binary in (True, False):
        mode = "binary" if binary else "json"
        request_body, _ = encode_infer_request(INPUTS, binary=binary, outputs=list(OUTPUTS))
        response_body, _ = encode_infer_response(
            "minilm", "1", None, OUTPUTS, set(OUTPUTS) if binary else set()
        )
        print(
            f"request  2x(1x128 int64)  {mode:6}  {len(request_body):6} B  "
            f"{_microseconds(_request_cycle(binary)):8.1f} us encode+parse"
        )
        print(
            f"response 1x384 float32    {mode:6}  {len(response_body):6} B  "
            f"{_microseconds(_response_cycle(binary)):8.1f} us encode+parse"
        )


if __name__ == "__main__":
    main()
