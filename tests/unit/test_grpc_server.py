"""The gRPC edge: ModelInferRequest parsing, the error mapping and the key in metadata."""

from __future__ import annotations

import errno
from typing import Any

import grpc
import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blindinfer.errors import ProtocolError
from blindinfer.protocol.datatypes import DATATYPES
from blindinfer.protocol.inference import InferRequest
from blindinfer.protocol.limits import TensorLimits
from blindinfer.protocol.oip_grpc import oip_v2_pb2 as pb
from blindinfer.protocol.oip_grpc.tensors import (
    encode_infer_response,
    parse_infer_request,
    parse_message,
)
from blindinfer.server.audit import AuditLogError
from blindinfer.server.auth import ForbiddenError, UnauthorizedError
from blindinfer.server.config import ServerConfig
from blindinfer.server.errors import PayloadTooLargeError
from blindinfer.server.grpc.caller import authorization
from blindinfer.server.grpc.status import ERROR_CODE_KEY, RETRY_AFTER_KEY, grpc_error
from blindinfer.server.quotas import RateLimitedError
from blindinfer.store.errors import TenantMemoryQuotaError, UnknownModelError

LIMITS = TensorLimits(max_total_bytes=1 << 20, max_elements=1 << 18)
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def request(**tensors: tuple[str, list[int], bytes | None]) -> pb.ModelInferRequest:
    """A request with `name=(datatype, shape, raw bytes or None)` inputs."""
    message = pb.ModelInferRequest(model_name="m")
    for name, (datatype, shape, raw) in tensors.items():
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw is not None:
            message.raw_input_contents.append(raw)
    return message


def parse(message: Any, limits: TensorLimits = LIMITS) -> InferRequest:
    return parse_infer_request(message.SerializeToString(), limits).request


def refused(message: Any, limits: TensorLimits = LIMITS) -> str:
    with pytest.raises(ProtocolError) as caught:
        parse(message, limits)
    return caught.value.code


arrays = st.sampled_from(sorted(DATATYPES)).flatmap(
    lambda name: hnp.arrays(
        DATATYPES[name],
        hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
        elements={"allow_nan": True} if DATATYPES[name].kind == "f" else None,
    )
)


@given(st.lists(arrays, min_size=1, max_size=4))
@settings(max_examples=60, deadline=None)
def test_raw_inputs_arrive_bit_exact_read_only_and_aligned(values: list[np.ndarray]) -> None:
    feed = {f"in{i}": a for i, a in enumerate(values)}
    message = request(
        **{
            name: (
                next(k for k, v in DATATYPES.items() if v == a.dtype),
                list(a.shape),
                a.tobytes(),
            )
            for name, a in feed.items()
        }
    )
    parsed = parse(message)
    assert [t.name for t in parsed.inputs] == list(feed)
    for tensor in parsed.inputs:
        want = feed[tensor.name]
        assert tensor.array.dtype == want.dtype
        assert tensor.array.shape == want.shape == tensor.shape
        assert tensor.array.tobytes() == want.tobytes()
        assert not tensor.array.flags.writeable
        assert tensor.array.flags.aligned and tensor.array.flags.c_contiguous


typed = st.sampled_from(sorted(CONTENTS)).flatmap(
    lambda name: st.tuples(
        st.just(name),
        hnp.arrays(
            DATATYPES[name],
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
            elements={"allow_nan": False} if DATATYPES[name].kind == "f" else None,
        ),
    )
)


@given(typed)
@settings(max_examples=80, deadline=None)
def test_typed_contents_give_what_the_raw_path_gives(case: tuple[str, np.ndarray]) -> None:
    datatype, array = case
    message = request(x=(datatype, list(array.shape), None))
    getattr(message.inputs[0].contents, CONTENTS[datatype]).extend(array.ravel().tolist())
    (tensor,) = parse(message).inputs
    assert (tensor.array.dtype, tensor.array.shape) == (array.dtype, array.shape)
    assert tensor.array.tobytes() == array.tobytes()
    assert not tensor.array.flags.writeable


@given(st.binary(max_size=512))
@settings(max_examples=300, deadline=None)
def test_any_bytes_parse_or_give_a_protocol_error(data: bytes) -> None:
    code = None
    try:
        assert parse_infer_request(data, LIMITS).model_name
    except ProtocolError as exc:
        code = exc.code
    assert code in {
        None,
        "invalid_request",
        "invalid_tensor",
        "invalid_shape",
        "invalid_datatype",
        "unsupported_datatype",
        "size_mismatch",
        "too_many_tensors",
        "tensor_too_large",
        "duplicate_input",
        "duplicate_output",
    }


def test_garbage_is_invalid_request_without_quoting_it() -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_message(pb.ModelInferRequest, b"\xff\xff\xff\xff secret")
    assert caught.value.code == "invalid_request"
    assert "secret" not in str(caught.value)


def test_request_fields_become_the_rest_request() -> None:
    message = request(x=("FP32", [2], np.array([1, 2], "<f4").tobytes()))
    message.id = "req-1"
    message.model_version = "1"
    message.parameters["receipt"].bool_param = True
    message.outputs.add(name="b")
    message.outputs.add(name="a")
    parsed = parse_infer_request(message.SerializeToString(), LIMITS)
    assert (parsed.model_name, parsed.model_version) == ("m", "1")
    assert parsed.request.id == "req-1"
    assert parsed.request.receipt is True
    assert [(o.name, o.binary) for o in parsed.request.outputs] == [("b", True), ("a", True)]


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda: pb.ModelInferRequest(), "invalid_request"),  # no model name
        (lambda: request(x=("FP32", [2], b"\0" * 4)), "size_mismatch"),
        (lambda: request(x=("FP32", [2], None)), "invalid_tensor"),  # no data
        (lambda: request(x=("FP32", [-1], b"")), "invalid_shape"),
        (lambda: request(x=("STRING", [1], b"\0")), "invalid_datatype"),
        (lambda: request(x=("BYTES", [1], b"\0\0\0\0")), "unsupported_datatype"),
        (lambda: request(x=("BOOL", [1], b"\x02")), "invalid_tensor"),
        (lambda: request(x=("FP32", [1 << 17, 4], None)), "tensor_too_large"),
        (lambda: request(x=("FP32", [1 << 30], None)), "tensor_too_large"),
        (lambda: request(**{f"t{i}": ("FP32", [0], b"") for i in range(65)}), "too_many_tensors"),
    ],
)
def test_refusals_have_the_rest_codes(build: Any, code: str) -> None:
    assert refused(build()) == code


def test_inputs_are_all_raw_or_all_typed() -> None:
    message = request(x=("FP32", [1], b"\0" * 4), y=("FP32", [1], None))
    assert refused(message) == "invalid_request"  # one raw entry for two inputs
    message = request(x=("INT32", [1], b"\0" * 4))
    message.inputs[0].contents.int_contents.append(0)
    assert refused(message) == "invalid_tensor"  # both


def test_duplicate_names_are_refused() -> None:
    message = request(x=("FP32", [0], b""))
    message.inputs.add(name="x", datatype="FP32", shape=[0])
    message.raw_input_contents.append(b"")
    assert refused(message) == "duplicate_input"
    message = request(x=("FP32", [0], b""))
    message.outputs.add(name="y")
    message.outputs.add(name="y")
    assert refused(message) == "duplicate_output"


@pytest.mark.parametrize(
    ("datatype", "field", "value"),
    [
        ("INT8", "int_contents", 128),
        ("INT16", "int_contents", -32769),
        ("UINT8", "uint_contents", 256),
    ],
)
def test_typed_values_must_fit_the_datatype(datatype: str, field: str, value: int) -> None:
    message = request(x=(datatype, [1], None))
    getattr(message.inputs[0].contents, field).append(value)
    assert refused(message) == "invalid_tensor"


def test_typed_contents_in_the_wrong_list_or_for_fp16_are_refused() -> None:
    message = request(x=("INT64", [1], None))
    message.inputs[0].contents.int_contents.append(1)
    assert refused(message) == "invalid_tensor"
    message = request(x=("FP16", [1], None))
    message.inputs[0].contents.fp32_contents.append(1.0)
    assert refused(message) == "invalid_tensor"
    message = request(x=("INT32", [2], None))
    message.inputs[0].contents.int_contents.append(1)
    assert refused(message) == "size_mismatch"


def test_receipt_must_be_a_bool_param() -> None:
    message = request(x=("FP32", [0], b""))
    message.parameters["receipt"].string_param = "yes"
    assert refused(message) == "invalid_request"


def test_response_outputs_are_raw_and_keep_their_shape() -> None:
    outputs = {"scalar": np.array(7, np.int64), "m": np.arange(6, dtype=">f4").reshape(2, 3)}
    data = encode_infer_response("m", "1", "id-9", outputs, {"protected": "p"})
    response = pb.ModelInferResponse.FromString(data)
    assert (response.model_name, response.model_version, response.id) == ("m", "1", "id-9")
    assert [(o.name, o.datatype, list(o.shape)) for o in response.outputs] == [
        ("scalar", "INT64", []),
        ("m", "FP32", [2, 3]),
    ]
    assert response.raw_output_contents[0] == np.array(7, "<i8").tobytes()
    assert response.raw_output_contents[1] == np.arange(6, dtype="<f4").tobytes()
    assert response.parameters["receipt"].string_param == '{"protected":"p"}'


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (UnknownModelError("no"), grpc.StatusCode.NOT_FOUND, "unknown_model"),
        (ForbiddenError("no", visible=False), grpc.StatusCode.NOT_FOUND, "unknown_model"),
        (ForbiddenError("no"), grpc.StatusCode.PERMISSION_DENIED, "forbidden"),
        (UnauthorizedError("no"), grpc.StatusCode.UNAUTHENTICATED, "unauthorized"),
        (
            ProtocolError("tensor_too_large", "x"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "tensor_too_large",
        ),
        (PayloadTooLargeError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, "payload_too_large"),
        (TenantMemoryQuotaError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED, "quota_exceeded"),
        (AuditLogError("x"), grpc.StatusCode.UNAVAILABLE, "audit_unavailable"),
        (OSError(errno.ENOSPC, "full"), grpc.StatusCode.RESOURCE_EXHAUSTED, "storage_full"),
        (ValueError("user data"), grpc.StatusCode.INTERNAL, "internal_error"),
    ],
)
def test_errors_map_to_a_status_and_the_rest_code(
    exc: BaseException, status: grpc.StatusCode, code: str
) -> None:
    error = grpc_error(exc, "ModelInfer")
    assert (error.status, error.code) == (status, code)
    assert error.details.startswith(f"{code}: ")
    assert dict(error.trailing_metadata)[ERROR_CODE_KEY] == code
    assert "user data" not in error.details


def test_a_rate_limit_says_when_to_retry() -> None:
    error = grpc_error(RateLimitedError("slow down", 1.2), "ModelInfer")
    assert error.status is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(error.trailing_metadata) == {ERROR_CODE_KEY: "rate_limited", RETRY_AFTER_KEY: "2"}


def test_the_key_is_read_once_from_metadata() -> None:
    assert authorization(None) is None
    assert authorization([("x-other", "1")]) is None
    assert authorization([("authorization", "Bearer k")]) == "Bearer k"
    with pytest.raises(UnauthorizedError):
        authorization([("authorization", "Bearer k"), ("authorization", "Bearer j")])
    with pytest.raises(UnauthorizedError):
        authorization([("authorization", b"Bearer k")])


def test_the_grpc_port_is_its_own() -> None:
    assert ServerConfig(port=9924, grpc_port=9930).grpc_port == 9930
    with pytest.raises(ValueError, match="--grpc-port 9924"):
        ServerConfig(port=9924, grpc_port=9924)
    with pytest.raises(ValueError, match="--grpc-port 9925"):
        ServerConfig(port=9926, grpc_port=9925, blindai_compat=True)


def _servicer_and_state(**connections: int) -> tuple[Any, Any]:
    from types import SimpleNamespace

    from blindinfer.server.config import ConnectionLimits, Limits
    from blindinfer.server.grpc.servicer import OipServicer

    config = ServerConfig(
        limits=Limits(max_model_bytes=512 << 20, max_request_bytes=64 << 20),
        connections=ConnectionLimits(**connections),
    )
    state: Any = SimpleNamespace(config=config)  # the two read only its configuration
    servicer = OipServicer(state)
    servicer.close()
    return servicer, state


def test_grpc_messages_stay_within_the_body_buffer_budget() -> None:
    """BlindAI's audit: memory exhausted by mass uploads. grpc holds each message whole,
    so the calls at once times the largest message must fit REST's body budget."""
    from blindinfer.server.grpc.listener import max_concurrent_calls, max_message_bytes

    servicer, state = _servicer_and_state(max_body_buffer_bytes=2 << 30)
    assert servicer.max_load_bytes == (64 << 20) + 64 * 1024  # not the 512 MiB model limit
    assert max_message_bytes(servicer) == servicer.max_load_bytes
    assert max_concurrent_calls(state, servicer) == 31  # 2 GiB // (64 MiB + 64 KiB)
    assert max_concurrent_calls(state, servicer) * max_message_bytes(servicer) <= 2 << 30
    servicer, state = _servicer_and_state(max_body_buffer_bytes=1 << 20)
    assert max_concurrent_calls(state, servicer) == 1
    servicer, state = _servicer_and_state(max_concurrent_bodies=8)
    assert max_concurrent_calls(state, servicer) == 8
