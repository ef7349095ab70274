"""The client's arguments and failures as blindinfer errors: URLs, Tensor dtypes, model and
policy paths, and how transport failures read (no server needed: httpx's own exceptions)."""

from __future__ import annotations

import os
import socket
import ssl
from pathlib import Path

import httpx
import numpy as np
import pytest

import blindinfer
from blindinfer.client.common import (
    Upload,
    build_request,
    json_answer,
    model_list,
    policy_of,
    request_errors,
    upload_call,
)
from blindinfer.client.tensors import to_array, to_arrays
from blindinfer.client.transport import check_url, connection_failed
from blindinfer.protocol.datatypes import DATATYPES

URL = "https://127.0.0.1:9924"


# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "phrase"),
    [
        ("127.0.0.1:9924", "use https://127.0.0.1:9924"),
        ("localhost:9924", "use https://localhost:9924"),
        (
            "http://127.0.0.1:9924",
            "https only, got 'http://127.0.0.1:9924': use https://127.0.0.1:9924",
        ),
        ("ftp://host:21", "https only"),
        ("https://127.0.0.1:99999", "use https://host:port"),
        ("https://127.0.0.1:port", "use https://host:port"),
        ("https://127.0.0.1:0", "port from 1 to 65535"),
        ("https://:9924", "no host"),
        ("", "no server URL given"),
        ("   ", "no server URL given"),
    ],
)
def test_unusable_urls_are_usage_errors(url: str, phrase: str) -> None:
    with pytest.raises(blindinfer.UsageError) as caught:
        check_url(url)
    assert phrase in str(caught.value)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ValueError)  # callers that caught ValueError still do


def test_a_url_that_is_not_a_string_is_a_usage_error() -> None:
    with pytest.raises(blindinfer.UsageError, match="no server URL given"):
        check_url(None)


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("https://127.0.0.1:9924", "https://127.0.0.1:9924"),
        ("https://127.0.0.1:9924/", "https://127.0.0.1:9924"),
        ("HTTPS://example.com", "HTTPS://example.com"),
        ("https://[::1]:9924", "https://[::1]:9924"),
        ("https://host.example:443/prefix/", "https://host.example:443/prefix"),
    ],
)
def test_https_urls_are_accepted(url: str, base: str) -> None:
    assert check_url(url) == base


def test_connect_refuses_a_bad_url_before_anything_else(tmp_path: Path) -> None:
    for url in ("127.0.0.1:9924", "http://127.0.0.1:9924", "https://127.0.0.1:99999", ""):
        with pytest.raises(blindinfer.UsageError, match="https://"):
            blindinfer.connect(url, policy=tmp_path / "no-such-policy.toml")
        with pytest.raises(blindinfer.UsageError, match="https://"):
            blindinfer.attest(url, policy=None)


# -- Tensor dtypes ---------------------------------------------------------------------------


NUMPY_NAMES = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
}


@pytest.mark.parametrize("datatype", list(DATATYPES))
def test_tensor_takes_oip_and_numpy_dtypes_alike(datatype: str) -> None:
    data = [0, 1, 1, 0, 1, 1]
    numpy_name = NUMPY_NAMES[datatype]
    arrays = [
        to_array(blindinfer.Tensor(data, dtype, (2, 3)))
        for dtype in (datatype, numpy_name, np.dtype(numpy_name), np.dtype(numpy_name).type)
    ]
    arrays.append(to_array({"data": data, "dtype": datatype, "shape": [2, 3]}))
    for array in arrays:
        assert array.dtype == DATATYPES[datatype]
        assert array.shape == (2, 3)
        assert array.tobytes() == arrays[0].tobytes()


def test_every_protocol_datatype_is_listed() -> None:
    assert set(NUMPY_NAMES) == set(DATATYPES)


@pytest.mark.parametrize("dtype", ["FP33", "fp32", "float128x", "tensor(float)", 3.5])
def test_an_unknown_dtype_lists_the_accepted_names(dtype: object) -> None:
    with pytest.raises(blindinfer.UsageError) as caught:
        blindinfer.Tensor([1.0], dtype, (1,))  # type: ignore[arg-type]
    message = str(caught.value)
    assert "unknown dtype" in message
    for name in DATATYPES:
        assert name in message
    assert "float32" in message


@pytest.mark.parametrize("dtype", ["BYTES", "complex64", "str", "object", None])
def test_dtypes_that_cannot_be_sent_are_usage_errors(dtype: object) -> None:
    with pytest.raises(blindinfer.UsageError, match="FP32"):
        blindinfer.Tensor([1], dtype, (1,))  # type: ignore[arg-type]


def test_data_that_does_not_fit_the_tensor_is_a_usage_error() -> None:
    with pytest.raises(blindinfer.UsageError, match="do not fit the shape"):
        to_array(blindinfer.Tensor([1, 2, 3], "INT64", (2, 2)))
    with pytest.raises(blindinfer.UsageError, match="not float32 values"):
        to_array(blindinfer.Tensor(["a", "b"], "FP32", (2,)))


def test_inputs_that_are_not_tensors_are_usage_errors() -> None:
    with pytest.raises(blindinfer.UsageError, match="cannot send a str"):
        to_array("not a tensor")
    with pytest.raises(blindinfer.UsageError, match="pass a dict by name"):
        to_arrays(np.zeros(2), ["a", "b"])


# -- model and policy paths ------------------------------------------------------------------


def test_a_missing_model_file_is_a_usage_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(blindinfer.UsageError, match="does not exist") as caught:
        upload_call(missing, None, (), None)
    assert str(missing) in str(caught.value)
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    with pytest.raises(blindinfer.UsageError, match="does not exist"):
        Upload.of(str(missing))


def test_a_directory_is_not_a_model_file(tmp_path: Path) -> None:
    with pytest.raises(blindinfer.UsageError, match="is a directory") as caught:
        Upload.of(tmp_path)
    assert str(tmp_path) in str(caught.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_model_file_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "secret.onnx"
    path.write_bytes(b"x")
    path.chmod(0)
    with pytest.raises(blindinfer.UsageError, match="cannot read the model file") as caught:
        Upload.of(path)
    assert str(path) in str(caught.value)


def test_a_model_file_that_cannot_be_opened_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secret.onnx"
    path.write_bytes(b"x")

    def refuse(self: Path, *args: object, **kwargs: object) -> object:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "open", refuse)
    with pytest.raises(blindinfer.UsageError, match="Permission denied") as caught:
        Upload.of(path)
    assert str(path) in str(caught.value)


def test_a_model_file_that_changes_during_the_upload_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x" * 100)
    call = upload_call(path, "m", (), None)
    path.write_bytes(b"x" * 10)

    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        return httpx.Response(201, json={})

    with (
        httpx.Client(base_url=URL, transport=httpx.MockTransport(handler)) as http,
        pytest.raises(blindinfer.UsageError, match="shrank while it was being uploaded") as caught,
        request_errors(URL, 30.0, call),
    ):
        http.send(build_request(http, call, asynchronous=False))
    assert str(path) in str(caught.value)
    assert isinstance(caught.value.__cause__, OSError)


def test_a_fifo_is_not_a_model_file(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(blindinfer.UsageError, match="not a regular file"):
        Upload.of(fifo)


def test_uploading_something_else_is_a_usage_error() -> None:
    with pytest.raises(blindinfer.UsageError, match="cannot upload a int"):
        Upload.of(42)


def test_policy_paths(tmp_path: Path) -> None:
    missing = tmp_path / "policy.toml"
    with pytest.raises(blindinfer.UsageError, match="does not exist") as caught:
        policy_of(missing)
    assert str(missing) in str(caught.value)
    with pytest.raises(blindinfer.UsageError, match="is a directory"):
        policy_of(str(tmp_path))
    with pytest.raises(blindinfer.UsageError, match=r"must be a blindinfer\.Policy"):
        policy_of(42)
    missing.write_text("[sgx]\nmrenclve = 1\n")
    with pytest.raises(blindinfer.PolicyError):  # malformed: as load_policy says
        policy_of(missing)
    with pytest.raises(blindinfer.UsageError, match="does not exist"):
        blindinfer.connect(URL, policy=tmp_path / "absent.toml")


# -- transport failures, in words ------------------------------------------------------------


def _wrapped(cause: BaseException, kind: type[httpx.TransportError]) -> httpx.TransportError:
    """An httpx error the way httpx raises it: the socket's exception as its cause."""
    try:
        try:
            raise cause
        except BaseException as exc:
            raise kind(str(exc)) from exc
    except httpx.TransportError as wrapped:
        return wrapped


@pytest.mark.parametrize(
    ("cause", "kind", "phrase"),
    [
        (
            ConnectionRefusedError(111, "Connection refused"),
            httpx.ConnectError,
            f"cannot connect to {URL}: connection refused (is the server running, and on "
            "this port?)",
        ),
        (
            socket.gaierror(-2, "Name or service not known"),
            httpx.ConnectError,
            f"unknown host '127.0.0.1' in {URL}",
        ),
        (
            TimeoutError("timed out"),
            httpx.ConnectTimeout,
            f"timed out after 30 s connecting to {URL}",
        ),
        (
            TimeoutError("timed out"),
            httpx.ReadTimeout,
            f"timed out after 30 s waiting for the answer of {URL} during POST /v2/x",
        ),
        (
            ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
            httpx.ConnectError,
            f"TLS handshake with {URL} failed",
        ),
        (
            ConnectionResetError(104, "Connection reset by peer"),
            httpx.ConnectError,
            "the connection was reset",
        ),
        (
            ConnectionResetError(104, "Connection reset by peer"),
            httpx.ReadError,
            f"the connection to {URL} broke during POST /v2/x: connection reset",
        ),
        (
            OSError(101, "Network is unreachable"),
            httpx.ConnectError,
            f"cannot connect to {URL}: Network is unreachable",
        ),
    ],
)
def test_transport_failures_read_as_connection_failures(
    cause: BaseException, kind: type[httpx.TransportError], phrase: str
) -> None:
    error = connection_failed(_wrapped(cause, kind), URL, 30.0, request="POST /v2/x", pinned=True)
    assert type(error) is blindinfer.ConnectionFailedError
    assert phrase in str(error)
    assert "\n" not in str(error)


def test_a_disconnect_without_an_answer_is_a_connection_failure() -> None:
    error = connection_failed(
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        URL,
        30.0,
        request="GET /v2/models/m",
        pinned=True,
    )
    assert type(error) is blindinfer.ConnectionFailedError
    assert "closed it without answering" in str(error)


def test_a_failed_certificate_check_is_a_key_binding_error_only_when_pinned() -> None:
    refused = ssl.SSLCertVerificationError(1, "certificate verify failed")
    refused.verify_message = "self-signed certificate"
    wrapped = _wrapped(refused, httpx.ConnectError)
    pinned = connection_failed(wrapped, URL, 30.0, pinned=True)
    assert type(pinned) is blindinfer.KeyBindingError
    assert "did not present the attested TLS certificate (self-signed certificate)" in str(pinned)
    assert "nothing was sent" in str(pinned)
    unpinned = connection_failed(wrapped, URL, 30.0, pinned=False)
    assert type(unpinned) is blindinfer.ConnectionFailedError


def test_an_unreadable_answer_is_a_protocol_error() -> None:
    error = connection_failed(httpx.DecodingError("bad gzip"), URL, 30.0, pinned=True)
    assert type(error) is blindinfer.ProtocolError


def test_malformed_json_answers_are_protocol_errors() -> None:
    request = httpx.Request("POST", URL + "/v2/repository/index")
    for body in (b"not json", b'{"models": 1}', b"[1]"):
        response = httpx.Response(200, content=body, request=request)
        with pytest.raises(blindinfer.ProtocolError, match="not the API's") as caught:
            json_answer(response, model_list)
        assert caught.value.code == "malformed_answer"
        assert caught.value.__cause__ is not None
