"""The three ASGI applications that speak BlindAI Core 0.6.3's protocol.

- "attestation" (BlindAI's untrusted port 9923, plain HTTP as in BlindAI): `GET /` the
  TLS certificate (CBOR bytes, DER), `GET /quote` (CBOR bytes: an SGX DCAP quote whose
  report_data is SHA-256(certificate DER) || 32 zero bytes, as BlindAI bound it),
  `GET /collateral` (CBOR map: BlindAI's `SgxCollateral`).
- "run" (9924, TLS): `POST /run`.
- "management" (9925, TLS): `POST /upload`, `POST /delete`.

All of them reuse the native `ServerState`: the same registry (a model uploaded here can
be run through the native API and the other way round), quotas, audit log, and the same
authentication: without keys configured (open mode) every caller is the "local" admin,
which is what BlindAI offered; with keys, a request needs `Authorization: Bearer`, which
the stock BlindAI client cannot send, so it is refused (401) rather than let in.

Every response carries `Server: blindai` on real hardware, `Server: blindai mock
(testing)` in simulation: BlindAI's client refuses a server whose Server header contains
"mock" unless it runs with `simulation_mode=True`. Errors are a CBOR text string (what
BlindAI's server sent) with a 4xx status for the caller's mistakes and 5xx only for the
server's own failures, plus `X-Blindinfer-Error-Code` with the machine code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from blindinfer.attestation.intel.sgx_quote import parse_sgx_quote
from blindinfer.errors import BlindInferError
from blindinfer.protocol.content_types import blindai_media_types
from blindinfer.server.auth import Action, authorize
from blindinfer.server.blindai import cbor, schemas
from blindinfer.server.body_guard import tenant_slot
from blindinfer.server.content_types import CheckContentType
from blindinfer.server.errors import (
    AnswerUnexpectedErrors,
    MissingHeaderError,
    PayloadTooLargeError,
    response_headers,
    status_and_code,
    where,
)
from blindinfer.server.respond import encode_outputs
from blindinfer.server.state import ServerState
from blindinfer.server.tls import TlsIdentity

log = logging.getLogger("blindinfer.server.blindai")

SERVER_HEADER = "blindai"
MOCK_SERVER_HEADER = "blindai mock (testing)"
ERROR_CODE_HEADER = "X-Blindinfer-Error-Code"
CBOR_MEDIA_TYPE = "application/cbor"
CBOR_OVERHEAD = 1 << 20  # bytes of CBOR framing allowed on top of the payload limits
SMALL_BODY = 64 * 1024
EVIDENCE_MAX_AGE_S = 3600.0
COLLATERAL_VERSION = 3  # sgx_ql_qve_collateral_t.version for v3 collateral


def server_header(state: ServerState) -> str:
    return MOCK_SERVER_HEADER if state.platform.kind == "simulation" else SERVER_HEADER


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.blindinfer
    return state


def _reply(request: Request, content: bytes, status: int = 200) -> Response:
    return Response(
        content,
        status_code=status,
        media_type=CBOR_MEDIA_TYPE,
        headers={"Server": request.app.state.blindai_server_header},
    )


async def handle_exception(request: Request, exc: Exception) -> Response:
    status, code, message = status_and_code(exc)
    if status >= 500:  # the exception's type and the route, never its message
        log.error(
            "BlindAI-compatible request failed with %s (%s)",
            type(exc).__name__,
            where(request),
        )
    headers = response_headers(exc)
    headers[ERROR_CODE_HEADER] = code
    headers["Server"] = request.app.state.blindai_server_header
    return Response(
        cbor.dumps(message), status_code=status, media_type=CBOR_MEDIA_TYPE, headers=headers
    )


async def read_body(request: Request, limit: int) -> bytearray:
    """The body, refused after at most `limit` bytes whatever Content-Length claims; kept
    as one bytearray (no second copy of a 180 MB upload)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()) or len(declared) > 19:
            raise MissingHeaderError("Content-Length must be a non-negative decimal integer")
        if int(declared) > limit:
            raise PayloadTooLargeError(f"the body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise PayloadTooLargeError(f"the body is larger than the limit of {limit} bytes")
        body += chunk
    return body


# --------------------------------------------------------------------- attestation


def _crl_pem(value: str) -> str:
    if value.lstrip().startswith("-----BEGIN"):
        return value
    der = bytes.fromhex(value)
    crl = x509.load_der_x509_crl(der)
    return crl.public_bytes(serialization.Encoding.PEM).decode()


def _pem(der: bytes) -> str:
    certificate = x509.load_der_x509_certificate(der)
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def _signed(field: str, body: str, signature: str) -> str:
    """The document as PCS serves it: the signed body byte for byte, then its signature."""
    bytes.fromhex(signature)  # hex, so it needs no JSON escaping
    return '{"' + field + '":' + body + ',"signature":"' + signature + '"}'


def blindai_collateral(quote: bytes, collateral_json: str) -> dict[str, Any]:
    """dcap-qvl's QuoteCollateralV3 (JSON) as BlindAI's `SgxCollateral`: the shape of
    Intel's `sgx_ql_qve_collateral_t` plus the PCK chain from the quote, CRLs in PEM, and
    TCB info / QE identity as the signed JSON documents Intel's PCS serves."""
    source = json.loads(collateral_json)
    chain = parse_sgx_quote(quote).signature.certificates
    if not chain:
        raise BlindInferError("the quote carries no PCK certificate chain")
    return {
        "version": COLLATERAL_VERSION,
        "pck_crl_issuer_chain": source["pck_crl_issuer_chain"],
        "root_ca_crl": _crl_pem(source["root_ca_crl"]),
        "pck_crl": _crl_pem(source["pck_crl"]),
        "tcb_info_issuer_chain": source["tcb_info_issuer_chain"],
        "tcb_info": _signed("tcbInfo", source["tcb_info"], source["tcb_info_signature"]),
        "qe_identity_issuer_chain": source["qe_identity_issuer_chain"],
        "qe_identity": _signed(
            "enclaveIdentity", source["qe_identity"], source["qe_identity_signature"]
        ),
        "pck_certificate": _pem(chain[0]),
        "pck_signing_chain": "".join(_pem(der) for der in chain[1:]),
    }


class BlindAiEvidence:
    """The quote BlindAI's client expects (report_data = SHA-256 of the certificate DER,
    then zeros) and its collateral, made once and refreshed hourly."""

    def __init__(self, state: ServerState, identity: TlsIdentity) -> None:
        self._state = state
        self.certificate_der = identity.certificate_der
        self._report_data = hashlib.sha256(identity.certificate_der).digest() + bytes(32)
        self._lock = threading.Lock()
        self._made_at = -EVIDENCE_MAX_AGE_S
        self._quote = b""
        self._collateral: dict[str, Any] = {}

    def current(self) -> tuple[bytes, dict[str, Any]]:
        with self._lock:
            if time.monotonic() - self._made_at >= EVIDENCE_MAX_AGE_S:
                evidence = self._state.platform.evidence(self._report_data)
                if evidence.kind != "intel-sgx" or evidence.collateral_json is None:
                    raise HTTPException(  # BlindAI clients only verify SGX
                        404, f"BlindAI attestation needs SGX evidence; this is {evidence.kind}"
                    )
                self._collateral = blindai_collateral(evidence.quote, evidence.collateral_json)
                self._quote = evidence.quote
                self._made_at = time.monotonic()
            return self._quote, self._collateral


async def certificate(request: Request) -> Response:
    evidence: BlindAiEvidence = request.app.state.blindai_evidence
    return _reply(request, cbor.dumps(evidence.certificate_der))


async def quote(request: Request) -> Response:
    evidence: BlindAiEvidence = request.app.state.blindai_evidence
    raw, _ = await _state(request).offload.attestation(evidence.current)
    return _reply(request, cbor.dumps(raw))


async def collateral(request: Request) -> Response:
    evidence: BlindAiEvidence = request.app.state.blindai_evidence
    _, document = await _state(request).offload.attestation(evidence.current)
    return _reply(request, cbor.dumps(document))


# ------------------------------------------------------------------ model management


def _limits(state: ServerState) -> cbor.Bounds:
    return cbor.Bounds(max_bytes_array=state.config.limits.max_model_bytes)


async def upload(request: Request) -> Response:
    state = _state(request)
    principal = state.principal(request)
    authorize(principal, Action.UPLOAD)
    max_model = state.config.limits.max_model_bytes
    # an int array takes up to two bytes per model byte
    body = await read_body(request, 2 * max_model + CBOR_OVERHEAD)
    document = await run_in_threadpool(
        cbor.decode_top_map, body, _limits(state), frozenset({"model"})
    )
    del body
    parsed = schemas.parse_upload(document, max_model)
    sha256 = hashlib.sha256(parsed.model).hexdigest()
    admit = state.quotas.admission(principal.tenant)  # decided and reserved atomically
    record, _ = await state.offload.upload(
        lambda: state.registry.add(
            parsed.model, sha256, name=None, owner=principal.tenant, admit=admit
        )
    )
    reply = {
        "hash": bytes.fromhex(record.sha256),
        "model_id": schemas.public_model_id(record.model_id),
    }
    return _reply(request, cbor.dumps(reply))


async def delete(request: Request) -> Response:
    state = _state(request)
    principal = state.principal(request)
    body = await read_body(request, SMALL_BODY)
    ref = schemas.parse_delete(cbor.decode_top_map(body, cbor.Bounds()))
    record = state.model_for(principal, ref, Action.DELETE)
    await state.offload.store(state.registry.delete, record)
    return _reply(request, cbor.dumps(None))  # serde_cbor's encoding of `()`


# ------------------------------------------------------------------------- inference


async def run(request: Request) -> Response:
    state = _state(request)
    principal = state.principal(request)
    limit = state.config.limits.max_request_bytes
    body = await read_body(request, limit + CBOR_OVERHEAD)
    document = await run_in_threadpool(cbor.decode_top_map, body, cbor.Bounds())
    parsed = schemas.parse_run(document, limit)
    record = state.model_for(principal, parsed.ref, Action.RUN)
    signature = await state.registry.signature_async(record)  # no thread held
    inputs = schemas.bind_inputs(parsed.inputs, [spec.name for spec in signature.inputs])
    # the slot BodyGuard took before the body was read (body_guard.py)
    async with tenant_slot(request, state.quotas, principal.tenant):
        # no thread held
        results = await state.registry.run_async(record, inputs, None, tenant=principal.tenant)
    names = [name for name in signature.output_names if name in results]
    names += [name for name in results if name not in names]
    encoded = await encode_outputs(
        results,
        lambda: cbor.dumps({"outputs": [schemas.encode_output(n, results[n]) for n in names]}),
    )
    return _reply(request, encoded)


# ------------------------------------------------------------------------ assembling


def _app(
    state: ServerState, routes: list[Route], evidence: BlindAiEvidence | None = None
) -> Starlette:
    app = Starlette(
        routes=routes,
        exception_handlers={
            BlindInferError: handle_exception,
            HTTPException: handle_exception,
            ClientDisconnect: handle_exception,  # 499, not a server error (errors.py)
            Exception: handle_exception,
        },
    )
    app.state.blindinfer = state
    app.state.blindai_server_header = server_header(state)
    app.state.blindai_evidence = evidence
    # innermost: answers what escapes the routes, so that nothing reaches uvicorn
    app.add_middleware(AnswerUnexpectedErrors, handler=handle_exception)
    app.add_middleware(CheckContentType, allowed=blindai_media_types)
    # outermost too: what a middleware itself raises is answered, not re-raised to uvicorn
    app.add_middleware(AnswerUnexpectedErrors, handler=handle_exception)
    return app


def blindai_apps(state: ServerState, identity: TlsIdentity | None = None) -> dict[str, Starlette]:
    """The "attestation", "run" and "management" apps over the native state.

    `identity` is the certificate the TLS listeners present (default: the native one); GET
    / and the quote must name the same one, since BlindAI's client pins what GET / says.
    """
    evidence = BlindAiEvidence(state, identity or state.identity)
    return {
        "attestation": _app(
            state,
            [
                Route("/", certificate, methods=["GET"]),
                Route("/quote", quote, methods=["GET"]),
                Route("/collateral", collateral, methods=["GET"]),
            ],
            evidence,
        ),
        "run": _app(state, [Route("/run", run, methods=["POST"])]),
        "management": _app(
            state,
            [
                Route("/upload", upload, methods=["POST"]),
                Route("/delete", delete, methods=["POST"]),
            ],
        ),
    }
