"""Evidence endpoint: fresh evidence over the caller's nonce, bound to our TLS key."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from blindinfer.protocol.evidence import encode_evidence_document, parse_nonce_request
from blindinfer.server.bodies import read_bounded
from blindinfer.server.respond import server_state


async def fresh_evidence(request: Request) -> Response:
    state = server_state(request)
    nonce = parse_nonce_request(await read_bounded(request, 4096))
    document = await state.offload.attestation(state.evidence_for, nonce)
    return Response(encode_evidence_document(document), media_type="application/json")


async def boot_evidence(request: Request) -> Response:
    """Evidence with an all-zero nonce, made once at first use: proves the binding, not the
    freshness; receipts carry the SHA-256 of its quote."""
    state = server_state(request)
    document = await state.offload.attestation(state.boot_evidence)
    return Response(encode_evidence_document(document), media_type="application/json")


routes = [
    Route("/v2/attestation", fresh_evidence, methods=["POST"]),
    Route("/v2/attestation", boot_evidence, methods=["GET"]),
]
