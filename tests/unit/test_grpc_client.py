"""The gRPC transport's pure parts: statuses into the errors the HTTPS path raises (checked
against the server's own REST and gRPC mappings), its arguments, and the answer parser
(bounds, piece sizes, typed contents, receipts; hypothesis for arbitrary answers)."""

from __future__ import annotations

import json
import socket
import string
import sys

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

import blindinfer
from blindinfer.client import grpc_tensors
from blindinfer.client.grpc_errors import (
    CODE_HTTP_STATUS,
    ERROR_CODE_KEY,
    error_code,
    http_status,
    rpc_error,
)
from blindinfer.client.grpc_pin import announced_port, certificate_name, grpc_target
from blindinfer.client.grpc_transport import (
    INSTALL_HINT,
    GrpcTransport,
    check_grpc_port,
    check_transport,
)
from blindinfer.client.retry import RetryPolicy
from blindinfer.errors import (
    BlindInferError,
    ConnectionFailedError,
    KeyBindingError,
    ProtocolError,
    ServerError,
    UsageError,
)
from blindinfer.protocol.limits import TensorLimits
from blindinfer.protocol.oip_grpc import oip_v2_pb2 as pb
from blindinfer.protocol.oip_grpc.tensors import encode_infer_response
from blindinfer.runtime.errors import (
    InferenceTimeoutError,
    InvalidTensorError,
    MemoryLimitError,
    OverloadedError,
    ResponseTooLargeError,
    WorkerCrashedError,
)
from blindinfer.server.auth import ForbiddenError, UnauthorizedError
from blindinfer.server.errors import PayloadTooLargeError, status_and_code
from blindinfer.server.grpc.status import grpc_error
from blindinfer.server.quotas import RateLimitedError, TooManyConcurrentError
from blindinfer.server.tls import make_tls_identity
from blindinfer.store.errors import (
    InvalidModelNameError,
    ModelConflictError,
    StoreFullError,
    TenantMemoryQuotaError,
    UnknownModelError,
)

TARGET = "127.0.0.1:9925"

SERVER_FAILURES: list[BaseException] = [
    UnknownModelError("no model is visible to this API key as 'x'"),
    UnauthorizedError("a missing API key"),
    ForbiddenError("this role may not upload"),
    ForbiddenError("hidden", visible=False),
    InvalidTensorError("wrong_shape", "input 'x' has shape [3] but the model takes [2]"),
    ProtocolError("invalid_tensor", "input #0 name must be a non-empty string"),
    OverloadedError("every queue is full", retry_after_s=2.0),
    RateLimitedError("too many requests"),
    TooManyConcurrentError("too many at once"),
    ResponseTooLargeError("too large", size=10, limit=5),
    MemoryLimitError("out of memory"),
    WorkerCrashedError("the model crashed the runtime"),
    InferenceTimeoutError("ran past 100 ms"),
    StoreFullError("max_models reached"),
    TenantMemoryQuotaError("over the tenant's memory"),
    ModelConflictError("taken"),
    InvalidModelNameError("bad name"),
    PayloadTooLargeError("over --max-request-bytes"),
    RuntimeError("an unexpected failure, message never shown"),
]


@pytest.mark.parametrize("exc", SERVER_FAILURES, ids=lambda e: type(e).__name__)
def test_every_server_refusal_is_the_rest_paths_server_error(exc: BaseException) -> None:
    """What the server's gRPC mapping sends decodes to the ServerError its REST answer
    makes the HTTPS client raise: same HTTP status, code and message."""
    status, code, message = status_and_code(exc)
    sent = grpc_error(exc, "ModelInfer")
    got = rpc_error(
        sent.status.name, sent.details, sent.trailing_metadata, target=TARGET, timeout=5
    )
    assert type(got) is ServerError
    assert (got.status, got.code, got.message) == (status, code, message)
    assert str(got) == str(ServerError(status, code, message))


def test_without_a_code_the_grpc_status_gives_the_http_status() -> None:
    got = rpc_error("UNIMPLEMENTED", "Method not found!", (), target=TARGET, timeout=5)
    assert isinstance(got, ServerError)
    assert (got.status, got.code, got.message) == (501, "grpc_unimplemented", "Method not found!")
    assert http_status("RESOURCE_EXHAUSTED", None) == 429
    assert http_status("RESOURCE_EXHAUSTED", None, "Concurrent RPC limit exceeded!") == 429
    too_large = "Received message larger than max (4194400 vs. 4194304)"
    assert http_status("RESOURCE_EXHAUSTED", None, too_large) == 413  # not retried
    assert http_status("RESOURCE_EXHAUSTED", "rate_limited", too_large) == 429
    assert http_status("NOT_A_STATUS", None) == 500
    assert http_status("NOT_FOUND", "unknown_model") == 404
    assert http_status("INVALID_ARGUMENT", "wrong_shape") == 400
    assert http_status("INTERNAL", "model_crashed") == CODE_HTTP_STATUS["model_crashed"] == 422


def test_a_code_that_does_not_look_like_one_is_ignored() -> None:
    for bad in ("Unknown_Model", "x" * 65, "a b", "ünknown", "", "1abc"):
        assert error_code([(ERROR_CODE_KEY, bad)]) is None
    assert error_code([(ERROR_CODE_KEY, b"unknown_model")]) is None  # binary metadata
    assert error_code([("other", "x"), (ERROR_CODE_KEY, "unknown_model")]) == "unknown_model"


@pytest.mark.parametrize(
    ("details", "kind", "words"),
    [
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL "
            "routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED: self signed certificate",
            KeyBindingError,
            "did not present the attested TLS certificate",
        ),
        (
            "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: "
            "Connection refused",
            ConnectionFailedError,
            "connection refused",
        ),
        (
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
            "Tls handshake failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: WRONG_VERSION_NUMBER",
            ConnectionFailedError,
            "TLS handshake with",
        ),
        ("Socket closed", ConnectionFailedError, "broke"),
    ],
)
def test_transport_failures_are_the_https_paths_errors(
    details: str, kind: type[BlindInferError], words: str
) -> None:
    got = rpc_error("UNAVAILABLE", details, None, target=TARGET, timeout=5)
    assert type(got) is kind
    assert words in str(got)
    assert TARGET in str(got)


def test_a_deadline_is_a_timeout_unless_the_server_answered_it() -> None:
    got = rpc_error("DEADLINE_EXCEEDED", "Deadline Exceeded", (), target=TARGET, timeout=2.5)
    assert type(got) is ConnectionFailedError
    assert "timed out after 2.5 s" in str(got)
    sent = grpc_error(InferenceTimeoutError("ran past 100 ms"), "ModelInfer")
    got = rpc_error(
        sent.status.name, sent.details, sent.trailing_metadata, target=TARGET, timeout=1
    )
    assert isinstance(got, ServerError)
    assert (got.status, got.code) == (504, "inference_timeout")


@settings(max_examples=150, deadline=None)
@given(
    status=st.sampled_from([c.name for c in grpc.StatusCode if c.name != "OK"]),
    details=st.one_of(st.none(), st.text(max_size=700)),
    metadata=st.lists(
        st.tuples(
            st.sampled_from([ERROR_CODE_KEY, "retry-after", "x"]),
            st.one_of(st.text(max_size=80), st.binary(max_size=20)),
        ),
        max_size=4,
    ),
)
def test_any_status_details_and_metadata_give_one_typed_one_line_error(
    status: str, details: str | None, metadata: list[tuple[str, str | bytes]]
) -> None:
    got = rpc_error(status, details, metadata, target=TARGET, timeout=1)
    assert isinstance(got, BlindInferError)
    assert "\n" not in str(got)
    assert len(str(got)) < 1000
    if isinstance(got, ServerError):
        assert 400 <= got.status <= 599
        assert set(got.code) <= set(string.ascii_lowercase + string.digits + "_")


# -- arguments ------------------------------------------------------------------------------


def test_transport_and_port_arguments() -> None:
    assert check_transport("https") == "https"
    assert check_transport("grpc") == "grpc"
    for bad in ("GRPC", "http", "", None, 1):
        with pytest.raises(UsageError, match="unknown transport"):
            check_transport(bad)
    assert check_grpc_port(None) is None
    assert check_grpc_port(9925) == 9925
    for port in (0, 65536, "9925", True, 9925.0):
        with pytest.raises(UsageError, match="grpc_port"):
            check_grpc_port(port)
    assert announced_port({"name": "blindinfer", "grpc_port": 9925}) == 9925
    with pytest.raises(ProtocolError, match="--grpc-port"):
        announced_port({"name": "blindinfer"})
    for announced in ("9925", -1, 70000, True, None):
        with pytest.raises(ProtocolError):
            announced_port({"grpc_port": announced} if announced is not None else [])


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=8,
    )
)
def test_any_announced_port_is_a_port_or_a_protocol_error(value: object) -> None:
    """The client and the proxy both read `grpc_port` from GET /v2 with announced_port."""
    document = json.loads(json.dumps({"grpc_port": value}))
    if type(value) is int and 1 <= value <= 65535:
        assert announced_port(document) == value
    else:
        with pytest.raises(ProtocolError):
            announced_port(document)


def test_the_target_and_the_name_the_handshake_checks() -> None:
    assert grpc_target("127.0.0.1", 9925) == "127.0.0.1:9925"
    assert grpc_target("::1", 9925) == "[::1]:9925"
    identity = make_tls_identity("server.example")
    assert certificate_name(identity.certificate_der) == "server.example"


# -- answers ----------------------------------------------------------------------------------

LIMITS = TensorLimits()


def _answer(
    outputs: dict[str, np.ndarray], receipt: dict[str, str] | None = None
) -> pb.ModelInferResponse:
    answer: pb.ModelInferResponse = pb.ModelInferResponse.FromString(
        encode_infer_response("m", "1", None, outputs, receipt)
    )
    return answer


def test_a_request_carries_raw_little_endian_inputs_and_the_receipt_flag() -> None:
    big = np.arange(6, dtype=">i4").reshape(2, 3)
    request = grpc_tensors.infer_request("m", {"x": big}, ["y"], receipt=True)
    assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [("x", "INT32", [2, 3])]
    assert request.raw_input_contents[0] == np.arange(6, dtype="<i4").tobytes()
    assert [o.name for o in request.outputs] == ["y"]
    assert request.parameters["receipt"].bool_param is True
    assert "receipt" not in grpc_tensors.infer_request("m", {"x": big}, None).parameters


def test_outputs_come_back_bit_exact_and_read_only() -> None:
    outputs = {
        "f": np.array([[1.5, np.nan], [-0.0, np.inf]], dtype=np.float32),
        "b": np.array([True, False]),
        "h": np.array([1.0], dtype=np.float16),
        "e": np.zeros((0, 3), dtype=np.int64),
    }
    got = grpc_tensors.infer_outputs(_answer(outputs), LIMITS)
    assert list(got) == list(outputs)
    for name, array in outputs.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        assert got[name].tobytes() == array.tobytes()
        assert not got[name].flags.writeable


def test_answers_that_do_not_add_up_are_refused() -> None:
    answer = _answer({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float32)})
    swapped = pb.ModelInferResponse()
    swapped.CopyFrom(answer)
    swapped.raw_output_contents[0] = b"\0" * 12  # total matches, pieces do not
    swapped.raw_output_contents[1] = b"\0" * 4
    with pytest.raises(ProtocolError) as caught:
        grpc_tensors.infer_outputs(swapped, LIMITS)
    assert caught.value.code == "size_mismatch"
    missing = pb.ModelInferResponse()
    missing.CopyFrom(answer)
    del missing.raw_output_contents[1]
    with pytest.raises(ProtocolError, match="raw_output_contents"):
        grpc_tensors.infer_outputs(missing, LIMITS)
    typed = pb.ModelInferResponse()
    typed.CopyFrom(answer)
    typed.outputs[0].contents.fp32_contents.extend([0.0, 0.0])
    with pytest.raises(ProtocolError, match="typed contents"):
        grpc_tensors.infer_outputs(typed, LIMITS)
    bad_bool = _answer({"b": np.array([True])})
    bad_bool.raw_output_contents[0] = b"\x02"
    with pytest.raises(ProtocolError, match="BOOL"):
        grpc_tensors.infer_outputs(bad_bool, LIMITS)
    with pytest.raises(ProtocolError) as caught:
        grpc_tensors.infer_outputs(answer, TensorLimits(max_tensors=1))
    assert caught.value.code == "too_many_tensors"
    duplicate = _answer({"a": np.zeros(1, np.float32)})
    duplicate.outputs.add().CopyFrom(duplicate.outputs[0])
    duplicate.raw_output_contents.append(duplicate.raw_output_contents[0])
    with pytest.raises(ProtocolError) as caught:
        grpc_tensors.infer_outputs(duplicate, LIMITS)
    assert caught.value.code == "duplicate_output"


def test_receipts_are_read_as_json_only_from_a_string_parameter() -> None:
    jws = {"protected": "a", "payload": "b", "signature": "c"}
    assert grpc_tensors.receipt_of(_answer({}, jws)) == jws
    assert grpc_tensors.receipt_of(_answer({})) is None
    wrong = _answer({})
    wrong.parameters["receipt"].bool_param = True
    with pytest.raises(ProtocolError, match="string"):
        grpc_tensors.receipt_of(wrong)
    for text in ("{", '{"a":1,"a":2}', "x" * (grpc_tensors.MAX_RECEIPT_CHARS + 1)):
        bad = _answer({})
        bad.parameters["receipt"].string_param = text
        with pytest.raises(ProtocolError) as caught:
            grpc_tensors.receipt_of(bad)
        assert caught.value.code == "invalid_receipt"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_answer_bytes_give_arrays_or_a_protocol_error(data: bytes) -> None:
    try:
        answer = pb.ModelInferResponse.FromString(data)
    except DecodeError:
        return
    try:
        got = grpc_tensors.infer_outputs(answer, TensorLimits(max_elements=1 << 12))
        grpc_tensors.receipt_of(answer)
    except ProtocolError:
        return
    for index, array in enumerate(got.values()):
        assert array.nbytes == len(answer.raw_output_contents[index])


# -- the transport's retries and its optional dependency -----------------------------------


def _transport(target: str = "127.0.0.1:1") -> GrpcTransport:
    """A channel to `target` (made lazily: nothing connects until a call)."""
    return GrpcTransport(
        target,
        make_tls_identity().certificate_der,
        api_key="bik_test",
        timeout=2.0,
        retry=RetryPolicy(max_attempts=3, backoff=0.01, jitter=0),
        limits=LIMITS,
    )


def test_what_is_sent_again_and_after_how_long() -> None:
    transport = _transport()
    try:
        overloaded = ServerError(503, "overloaded", "every queue is full")
        assert transport._wait(overloaded, "UNAVAILABLE", 1, 0, "2") == 2.0
        assert transport._wait(overloaded, "UNAVAILABLE", 1, 0, None) == 0.01
        assert transport._wait(overloaded, "UNAVAILABLE", 3, 0, None) is None  # max_attempts
        unknown = ServerError(404, "unknown_model", "no model")
        assert transport._wait(unknown, "NOT_FOUND", 1, 0, None) is None
        refused = ConnectionFailedError("connection refused")
        assert transport._wait(refused, "UNAVAILABLE", 1, 0, None) == 0.05
        assert transport._wait(refused, "UNAVAILABLE", 1, 2, None) is None  # BROKEN_RETRIES
        assert transport._wait(refused, "DEADLINE_EXCEEDED", 1, 0, None) is None
        assert transport._wait(KeyBindingError("other key"), "UNAVAILABLE", 1, 0, None) is None
    finally:
        transport.close()


def test_a_port_nobody_listens_on_is_a_connection_failure() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = _transport(f"127.0.0.1:{port}")
    try:
        with pytest.raises(ConnectionFailedError) as caught:
            transport.probe()
        assert type(caught.value) is ConnectionFailedError
        assert isinstance(caught.value.__cause__, grpc.RpcError)
        assert f"127.0.0.1:{port}" in str(caught.value)
    finally:
        transport.close()


def test_an_api_key_that_cannot_be_metadata_is_refused() -> None:
    with pytest.raises(UsageError, match="printable ASCII"):
        GrpcTransport(
            "127.0.0.1:1",
            make_tls_identity().certificate_der,
            api_key="bik_\nx",
            timeout=1.0,
            retry=RetryPolicy(),
            limits=LIMITS,
        )


def test_without_grpcio_one_line_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before anything is sent: the URL below is never connected to."""
    monkeypatch.setitem(sys.modules, "grpc", None)
    with pytest.raises(UsageError) as caught:
        blindinfer.connect(
            "https://127.0.0.1:1",
            policy=blindinfer.Policy(sgx=blindinfer.SgxPolicy(mrenclave=(bytes(32),))),
            transport="grpc",
        )
    assert str(caught.value) == INSTALL_HINT
    assert "pip install 'blindinfer[grpc]'" in str(caught.value)
