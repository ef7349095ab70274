"""BlindAI compatibility in-process: the bounded CBOR codec (int-array models decoded
exactly, hostile documents refused cheaply), the request schemas, and the three apps
through Starlette's TestClient (replies, Server header, errors as CBOR text, never 500)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import cbor2
import numpy as np
import pytest
from cryptography import x509
from starlette.testclient import TestClient

from blindinfer.attestation.intel.sgx_quote import parse_sgx_quote
from blindinfer.cli.demo_model import demo_input, demo_model
from blindinfer.errors import ProtocolError
from blindinfer.server.app import build_state, close_state
from blindinfer.server.blindai import blindai_apps, make_blindai_identity, parse_ports, schemas
from blindinfer.server.blindai import cbor as bc
from blindinfer.server.blindai.listeners import has_blindai_name
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.state import ServerState
from blindinfer.server.tls import make_tls_identity
from blindinfer.tee.simulation.platform import SimulationPlatform

MODEL_KEYS = frozenset({"model"})
BIG = bc.Bounds(max_bytes_array=1 << 30)

# ------------------------------------------------------------------------------ codec


@pytest.mark.parametrize("n", [0, 1, 23, 24, 25, 255, 256, 4099])
@pytest.mark.parametrize("chunk", [1, 2, 3, 64, 1 << 22])
def test_int_array_model_decodes_exactly(
    n: int, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bc, "CHUNK", chunk)
    rng = np.random.default_rng(n)
    for data in (
        rng.integers(0, 256, n, dtype=np.uint8).tobytes(),
        # runs of 0x18 (value 24, and headers) across chunk edges are the tricky part
        rng.choice(np.array([0x18, 0x17, 0x19, 0x00, 0xFF], np.uint8), n).tobytes(),
        bytes([0x18]) * n,
    ):
        encoded = cbor2.dumps({"model": list(data), "length": n, "tail": [1, "x"]})
        assert bc.encode_uint8_array(data) == cbor2.dumps(list(data))
        decoded = bc.decode_top_map(encoded, BIG, MODEL_KEYS)
        assert decoded == {"model": data, "length": n, "tail": [1, "x"]}


def test_model_as_byte_string_is_accepted() -> None:
    assert bc.decode_top_map(cbor2.dumps({"model": b"\x00\x18"}), BIG, MODEL_KEYS) == {
        "model": b"\x00\x18"
    }


@pytest.mark.parametrize(
    "value",
    [[1, 2, 256], [1, -1], [1, "x"], [1, 2.5], [[1]], "text", 5, [1, None]],
)
def test_model_array_must_hold_bytes(value: object) -> None:
    with pytest.raises(ProtocolError):
        bc.decode_top_map(cbor2.dumps({"model": value}), BIG, MODEL_KEYS)


def test_model_array_length_is_bounded_before_any_allocation() -> None:
    # claims 2**40 items in a few bytes
    doc = b"\xa1" + cbor2.dumps("model") + b"\x9b" + (1 << 40).to_bytes(8, "big") + b"\x01"
    with pytest.raises(ProtocolError, match="at most"):
        bc.decode_top_map(doc, BIG, MODEL_KEYS)
    with pytest.raises(ProtocolError, match="claims more items"):
        bc.decode_top_map(doc, bc.Bounds(max_bytes_array=1 << 50), MODEL_KEYS)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (b"\x9b" + (1 << 62).to_bytes(8, "big"), "claims more"),  # huge array header
        (b"\x81" * 40 + b"\x00", "nests deeper"),
        (b"\x98\xff" + b"\x00" * 255, None),  # fine: 256 items < limit
        (b"\x5a\xff\xff\xff\xff", "longer than the document"),
        (b"\x9f\x00\xff", "indefinite"),
        (b"\xc2\x41\x01", "tags"),  # bignum
        (b"\xd9\xd9\xf7\x00", "tags"),  # self-described CBOR
        (b"\x1c", "reserved"),
        (b"\x19\x01", "middle of a header"),
        (b"\x00\x00", "trailing"),
        (b"", "ends"),
    ],
)
def test_generic_bounds(document: bytes, message: str | None) -> None:
    if message is None:
        assert bc.loads(document) == [0] * 255
        return
    with pytest.raises(ProtocolError, match=message):
        bc.loads(document)


def test_item_budget_stops_a_flood_early() -> None:
    flood = b"\x9a" + (1 << 20).to_bytes(4, "big") + b"\x00" * (1 << 20)
    with pytest.raises(ProtocolError, match="more than"):
        bc.loads(flood, bc.Bounds(max_items=1000))


def test_top_map_requirements() -> None:
    with pytest.raises(ProtocolError, match="map"):
        bc.decode_top_map(cbor2.dumps([1]), bc.Bounds())
    with pytest.raises(ProtocolError, match="keys"):
        bc.decode_top_map(cbor2.dumps({1: 2}), bc.Bounds())
    duplicate = b"\xa2" + cbor2.dumps("a") + b"\x01" + cbor2.dumps("a") + b"\x02"
    with pytest.raises(ProtocolError, match="duplicate"):
        bc.decode_top_map(duplicate, bc.Bounds())


# ---------------------------------------------------------------------------- schemas


def _tensor(array: np.ndarray, code: int, name: str | None = None) -> dict[str, Any]:
    return {
        "info": {"fact": list(array.shape), "datum_type": code, "node_name": name},
        "bytes_data": array.astype(schemas.DATUM_TYPES[code]).tobytes(),
    }


def test_tensor_round_trip_every_datum_type() -> None:
    for code, dtype in enumerate(schemas.DATUM_TYPES):
        array = np.arange(6).reshape(2, 3).astype(dtype)
        parsed = schemas.parse_tensor(_tensor(array, code), 0)
        assert parsed.array.dtype == array.dtype.newbyteorder("=")
        assert np.array_equal(parsed.array, array)
        assert schemas.encode_output("o", parsed.array) == {
            "info": {"fact": [2, 3], "datum_type": code, "node_name": "o"},
            "bytes_data": array.tobytes(),
        }


@pytest.mark.parametrize(
    "mutate",
    [
        lambda t: t["info"].update(fact=[2, 2]),
        lambda t: t["info"].update(fact=[-1]),
        lambda t: t["info"].update(fact="x"),
        lambda t: t["info"].update(datum_type=11),
        lambda t: t["info"].update(datum_type=True),
        lambda t: t["info"].update(node_name=3),
        lambda t: t.update(bytes_data=[1, 2]),
        lambda t: t.pop("info"),
    ],
)
def test_bad_tensors_are_refused(mutate: Any) -> None:
    tensor = _tensor(np.zeros(3, np.float32), 0)
    mutate(tensor)
    with pytest.raises(ProtocolError):
        schemas.parse_tensor(tensor, 0)


def test_model_ids_are_uuids_both_ways() -> None:
    native = "m-" + "0123456789abcdef" * 2
    public = schemas.public_model_id(native)
    assert uuid.UUID(public).hex == native[2:]
    assert schemas.model_ref(public) == native
    assert schemas.model_ref(public.upper()) == native
    assert schemas.model_ref(native) == native


def test_bind_inputs_by_name_then_position() -> None:
    a, b = (schemas.InputTensor(None, np.zeros(1)), schemas.InputTensor("y", np.ones(1)))
    bound = schemas.bind_inputs([a, b], ["x", "y"])
    assert list(bound) == ["y", "x"]
    with pytest.raises(ProtocolError):
        schemas.bind_inputs([a, a, a], ["x", "y"])
    with pytest.raises(ProtocolError):
        schemas.bind_inputs([schemas.InputTensor("z", np.ones(1))], ["x"])


def test_ports_option() -> None:
    assert parse_ports("9923,9924,9925") == (9923, 9924, 9925)
    assert parse_ports("0,0,0") == (0, 0, 0)
    for bad in ("1,2", "1,1,2", "a,b,c", "1,2,70000"):
        with pytest.raises(ValueError, match="blindai-ports"):
            parse_ports(bad)


# ------------------------------------------------------------------------------- apps

MAX_MODEL = 64 * 1024
IDENTITY = make_blindai_identity()


@pytest.fixture(scope="module")
def state() -> Iterator[ServerState]:
    config = ServerConfig(
        simulation=True, limits=Limits(max_model_bytes=MAX_MODEL, max_request_bytes=4096)
    )
    built = build_state(config, SimulationPlatform(bytes(range(32))), make_tls_identity())
    yield built
    close_state(built)


@pytest.fixture(scope="module")
def apps(state: ServerState) -> dict[str, TestClient]:
    return {
        name: TestClient(app, raise_server_exceptions=False)
        for name, app in blindai_apps(state, IDENTITY).items()
    }


MOCK = "blindai mock (testing)"


def _error(response: Any, status: int) -> str:
    assert response.status_code == status, response.content
    assert response.headers["server"] == MOCK
    assert response.headers["content-type"] == "application/cbor"
    message = cbor2.loads(response.content)
    assert isinstance(message, str) and message
    return message


def _upload(apps: dict[str, TestClient], model: Any, **extra: Any) -> Any:
    body = {
        "model": model,
        "length": len(model),
        "model_name": "demo.onnx",
        "optimize": True,
        "client_info": {"uid": "u", "is_colab": False},
    }
    body.update(extra)
    return apps["management"].post("/upload", content=cbor2.dumps(body))


def test_attestation_port(apps: dict[str, TestClient]) -> None:
    reply = apps["attestation"].get("/")
    assert reply.status_code == 200 and reply.headers["server"] == MOCK
    der = cbor2.loads(reply.content)
    assert der == IDENTITY.certificate_der and has_blindai_name(der)
    x509.load_der_x509_certificate(der)
    quote = cbor2.loads(apps["attestation"].get("/quote").content)
    report_data = parse_sgx_quote(quote).body.report_data
    assert report_data == hashlib.sha256(der).digest() + bytes(32)  # BlindAI's binding
    collateral = cbor2.loads(apps["attestation"].get("/collateral").content)
    assert isinstance(collateral.pop("version"), int)
    assert set(collateral) == {
        "pck_certificate",
        "pck_crl_issuer_chain",
        "pck_signing_chain",
        "root_ca_crl",
        "pck_crl",
        "tcb_info",
        "tcb_info_issuer_chain",
        "qe_identity",
        "qe_identity_issuer_chain",
    }
    assert all(isinstance(v, str) for v in collateral.values())
    assert collateral["root_ca_crl"].startswith("-----BEGIN X509 CRL-----")
    assert collateral["tcb_info"].startswith('{"tcbInfo":{')
    _error(apps["attestation"].get("/nothing"), 404)
    _error(apps["attestation"].post("/"), 405)


def test_upload_run_delete(apps: dict[str, TestClient], state: ServerState) -> None:
    model = demo_model()
    for form in (model, list(model)):  # bytes, or the stock client's array of ints
        reply = _upload(apps, form)
        assert reply.status_code == 200, reply.content
        document = cbor2.loads(reply.content)
        assert document["hash"] == hashlib.sha256(model).digest()
        model_id = document["model_id"]
        record = state.registry.resolve(schemas.model_ref(model_id), "local")
        ((name, array),) = demo_input(2).items()
        request = {
            "model_id": model_id,
            "model_hash": "",
            "inputs": [_tensor(array, 0)],
            "client_info": None,
        }
        run = apps["run"].post("/run", content=cbor2.dumps(request))
        assert run.status_code == 200, run.content
        outputs = cbor2.loads(run.content)["outputs"]
        expected = state.registry.run(record, {name: array})
        assert [o["info"]["node_name"] for o in outputs] == list(expected)
        for output in outputs:
            want = expected[output["info"]["node_name"]]
            assert output["bytes_data"] == want.tobytes()
            assert output["info"]["fact"] == list(want.shape)
        deleted = apps["management"].post("/delete", content=cbor2.dumps({"model_id": model_id}))
        assert deleted.status_code == 200 and cbor2.loads(deleted.content) is None
        _error(apps["run"].post("/run", content=cbor2.dumps(request)), 404)


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({"length": 3}, 400),
        ({"length": 0}, 400),
        ({"length": MAX_MODEL + 1}, 413),
        ({"optimize": "yes"}, 400),
        ({"model_name": 5}, 400),
        ({"client_info": [1]}, 400),
    ],
)
def test_upload_errors(apps: dict[str, TestClient], extra: dict[str, Any], status: int) -> None:
    _error(_upload(apps, demo_model(), **extra), status)


def test_malformed_bodies_never_500(apps: dict[str, TestClient]) -> None:
    rng = np.random.default_rng(7)
    bodies = [b"", b"\xff", b"\xa1", cbor2.dumps([1, 2]), cbor2.dumps({"model": "x"})]
    bodies += [
        rng.integers(0, 256, int(rng.integers(1, 200)), np.uint8).tobytes() for _ in range(60)
    ]
    for body in bodies:
        for app, path in (("management", "/upload"), ("management", "/delete"), ("run", "/run")):
            response = apps[app].post(path, content=body)
            assert 400 <= response.status_code < 500, (path, body, response.content)
            _error(response, response.status_code)


def test_oversized_bodies_are_refused(apps: dict[str, TestClient]) -> None:
    _error(apps["run"].post("/run", content=b"\x00" * (4096 + (1 << 20) + 1)), 413)
    _error(_upload(apps, b"\x01" * (MAX_MODEL + 1)), 413)
