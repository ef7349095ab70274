"""`connect()` and the `Client` it returns.

`connect` refuses to return a client unless the server's evidence verified against the
policy; the client then talks only to the attested key, pinned in its TLS context.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from blindinfer.attestation.bundle import EvidenceBundle
from blindinfer.attestation.pccs import CollateralSource, PccsCollateral
from blindinfer.attestation.policy import Policy, load_policy
from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.attestation.verifier import verify_evidence
from blindinfer.client.common import (
    INDEX_CALL,
    Call,
    Progress,
    build_request,
    delete_call,
    http_options,
    infer_call,
    infer_outputs,
    metadata_call,
    needs_input_names,
    send_with_retries,
    share_call,
    upload_call,
)
from blindinfer.client.models import ModelInfo, ModelMetadata
from blindinfer.client.retry import DEFAULT_RETRY, RetryPolicy
from blindinfer.client.tensors import to_arrays
from blindinfer.client.transport import check_url, fetch_evidence
from blindinfer.errors import SimulationWarning
from blindinfer.protocol.evidence import NONCE_SIZE, parse_evidence_document
from blindinfer.protocol.limits import TensorLimits

log = logging.getLogger("blindinfer.client")
SIMULATION_BANNER = (
    "blindinfer: SIMULATION MODE. You asked to trust the simulation root: the server is NOT "
    "in a TEE, its operator can read everything you send. Never use this with real data."
)


def capture(
    url: str, *, timeout: float = 30.0, collateral: CollateralSource | None = None
) -> EvidenceBundle:
    """Fetches evidence over a fresh nonce; returns it unverified, with what verifies it.

    With `collateral` (e.g. a PCCS or Intel PCS the caller trusts), Intel collateral comes
    from there instead of from the server.
    """
    base = check_url(url)
    nonce = secrets.token_bytes(NONCE_SIZE)
    discovered = fetch_evidence(base, nonce, timeout)
    evidence = parse_evidence_document(discovered.body)
    if collateral is not None and evidence.kind.startswith("intel-"):
        fetched = collateral.collateral_json(evidence.quote)
        evidence = dataclasses.replace(evidence, collateral_json=fetched)
    return EvidenceBundle(
        source=base,
        captured_at=int(time.time()),
        nonce=nonce,
        tls_certificate_der=discovered.certificate_der,
        evidence=evidence,
    )


def verify_bundle(
    bundle: EvidenceBundle, *, policy: Policy | None, simulation: bool, now: int | None = None
) -> VerifiedAttestation:
    return verify_evidence(
        bundle.evidence,
        policy=policy,
        expected_nonce=bundle.nonce,
        tls_certificate_der=bundle.tls_certificate_der,
        allow_simulation=simulation,
        now=now,
    )


def attest(
    url: str,
    *,
    policy: Policy | None,
    simulation: bool = False,
    timeout: float = 30.0,
    now: int | None = None,
    collateral_url: str | None = None,
) -> VerifiedAttestation:
    """Asks for evidence over a fresh nonce and verifies it; raises on any failure."""
    if simulation:
        warnings.warn(SIMULATION_BANNER, SimulationWarning, stacklevel=3)
    return attest_unwarned(
        url,
        policy=policy,
        simulation=simulation,
        timeout=timeout,
        now=now,
        collateral_url=collateral_url,
    )


def attest_unwarned(
    url: str,
    *,
    policy: Policy | None,
    simulation: bool,
    timeout: float,
    now: int | None = None,
    collateral_url: str | None = None,
) -> VerifiedAttestation:
    """`attest` without the simulation warning, for callers that warn themselves (the
    AsyncClient runs this in a worker thread and warns from the caller's coroutine)."""
    source = PccsCollateral(collateral_url) if collateral_url is not None else None
    bundle = capture(url, timeout=timeout, collateral=source)
    return verify_bundle(bundle, policy=policy, simulation=simulation, now=now)


def connect(
    url: str,
    *,
    policy: Policy | str | Path | dict[str, Any],
    simulation: bool = False,
    timeout: float = 60.0,
    collateral_url: str | None = None,
    api_key: str | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    max_connections: int | None = None,
) -> Client:
    """An attested connection: returns only once the evidence verified against `policy`.

    `collateral_url`: fetch Intel collateral from this PCCS/PCS instead of the server.
    `api_key`: sent only over the pinned, attested channel, never before verification.
    `timeout`: seconds for each of connecting, sending, receiving and waiting for a pooled
    connection. `retry`: how requests refused with 429/503 are retried (`NO_RETRY`: never;
    see `blindinfer.client.retry`). `max_connections`: size of the connection pool
    (default: httpx's, 100).
    """
    verified = attest(
        url,
        policy=load_policy(policy),
        simulation=simulation,
        timeout=timeout,
        collateral_url=collateral_url,
    )
    return Client(
        check_url(url),
        verified,
        timeout=timeout,
        api_key=api_key,
        retry=retry,
        max_connections=max_connections,
    )


class Client:
    """Talks only to the certificate that the verified evidence bound.

    Thread-safe: one client (one pool of pinned connections) can serve many threads.
    """

    def __init__(
        self,
        url: str,
        attestation: VerifiedAttestation,
        *,
        timeout: float,
        api_key: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_connections: int | None = None,
    ) -> None:
        self.url = url
        self.attestation = attestation
        self.retry = retry
        self._http = httpx.Client(
            **http_options(
                url,
                attestation,
                timeout=timeout,
                api_key=api_key,
                max_connections=max_connections,
                asynchronous=False,
            )
        )
        self._metadata: dict[str, ModelMetadata] = {}
        self._limits = TensorLimits()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def upload_model(
        self,
        model: str | Path | bytes | Any,
        *,
        name: str | None = None,
        share_with: Sequence[str] = (),
        progress: Progress | None = None,
    ) -> ModelInfo:
        """Uploads a model from a path, bytes or an onnx.ModelProto (streamed in chunks).

        `share_with`: tenants that may run it too ("*" = every tenant); private otherwise.
        `progress(sent, total)`: called with 0, then after each chunk (1 MiB) the connection
        took, ending at the model's size; from 0 again if the upload is retried. An
        exception it raises aborts the upload.
        """
        response = self._send(upload_call(model, name, share_with, progress))
        return ModelInfo.from_json(response.json())

    def delete_model(self, model: str) -> ModelInfo:
        response = self._send(delete_call(model))
        self._metadata.pop(model, None)
        return ModelInfo.from_json(response.json())

    def share_model(self, model: str, tenants: Sequence[str]) -> ModelInfo:
        """Lets other tenants run `model` ("*" = every tenant); [] makes it private again."""
        return ModelInfo.from_json(self._send(share_call(model, tenants)).json())

    def list_models(self) -> list[ModelInfo]:
        return [ModelInfo.from_json(item) for item in self._send(INDEX_CALL).json()]

    def model_metadata(self, model: str) -> ModelMetadata:
        if model not in self._metadata:
            response = self._send(metadata_call(model))
            self._metadata[model] = ModelMetadata.from_json(response.json())
        return self._metadata[model]

    def run_model(
        self, model: str, inputs: object, *, outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Runs `model` (name, model_id or SHA-256) and returns its outputs by name."""
        names: list[str] = []
        if needs_input_names(inputs):
            names = [i.name for i in self.model_metadata(model).inputs]
        response = self._send(infer_call(model, to_arrays(inputs, names), outputs))
        return infer_outputs(response, self._limits)

    def _send(self, call: Call) -> httpx.Response:
        def attempt() -> httpx.Response:
            return self._http.send(build_request(self._http, call, asynchronous=False))

        return send_with_retries(attempt, self.retry)
