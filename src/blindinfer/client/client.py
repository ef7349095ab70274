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
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np

from blindinfer.attestation.bundle import EvidenceBundle
from blindinfer.attestation.pccs import CollateralSource, PccsCollateral
from blindinfer.attestation.policy import Policy, load_policy
from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.attestation.verifier import verify_evidence
from blindinfer.client.models import ModelInfo, ModelMetadata
from blindinfer.client.tensors import to_arrays
from blindinfer.client.transport import check_url, fetch_evidence, pinned_context, transport
from blindinfer.errors import ServerError, SimulationWarning
from blindinfer.protocol.evidence import NONCE_SIZE, parse_evidence_document
from blindinfer.protocol.inference import (
    encode_infer_request,
    parse_header_length,
    parse_infer_response,
)
from blindinfer.protocol.limits import TensorLimits

log = logging.getLogger("blindinfer.client")
UPLOAD_CHUNK = 1 << 20
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
) -> Client:
    """An attested connection: returns only once the evidence verified against `policy`.

    `collateral_url`: fetch Intel collateral from this PCCS/PCS instead of the server.
    `api_key`: sent only over the pinned, attested channel, never before verification.
    """
    verified = attest(
        url,
        policy=load_policy(policy),
        simulation=simulation,
        timeout=timeout,
        collateral_url=collateral_url,
    )
    return Client(check_url(url), verified, timeout=timeout, api_key=api_key)


class Client:
    """Talks only to the certificate that the verified evidence bound."""

    def __init__(
        self,
        url: str,
        attestation: VerifiedAttestation,
        *,
        timeout: float,
        api_key: str | None = None,
    ) -> None:
        self.url = url
        self.attestation = attestation
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            base_url=url,
            transport=transport(pinned_context(attestation.certificate_der)),
            timeout=timeout,
            headers=headers,
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
    ) -> ModelInfo:
        """Uploads a model from a path, bytes or an onnx.ModelProto (streamed from a path).

        `share_with`: tenants that may run it too ("*" = every tenant); private otherwise.
        """
        content: bytes | Iterator[bytes]
        if isinstance(model, bytes | bytearray | memoryview):
            content = bytes(model)
        elif isinstance(model, str | Path):
            content = _file_chunks(Path(model))
        elif hasattr(model, "SerializeToString"):
            content = model.SerializeToString()
        else:
            raise TypeError("upload a path, bytes, or an onnx.ModelProto")
        target = quote(name, safe="") if name else "_"
        response = self._request(
            "PUT",
            f"/v2/repository/models/{target}/upload",
            content=content,
            headers={"content-type": "application/octet-stream"},
            params={"share": ",".join(share_with)} if share_with else None,
        )
        return ModelInfo.from_json(response.json())

    def delete_model(self, model: str) -> ModelInfo:
        response = self._request("DELETE", f"/v2/repository/models/{quote(model, safe='')}")
        self._metadata.pop(model, None)
        return ModelInfo.from_json(response.json())

    def share_model(self, model: str, tenants: Sequence[str]) -> ModelInfo:
        """Lets other tenants run `model` ("*" = every tenant); [] makes it private again."""
        response = self._request(
            "POST",
            f"/v2/repository/models/{quote(model, safe='')}/share",
            json={"tenants": list(tenants)},
        )
        return ModelInfo.from_json(response.json())

    def list_models(self) -> list[ModelInfo]:
        response = self._request("POST", "/v2/repository/index")
        return [ModelInfo.from_json(item) for item in response.json()]

    def model_metadata(self, model: str) -> ModelMetadata:
        if model not in self._metadata:
            response = self._request("GET", f"/v2/models/{quote(model, safe='')}")
            self._metadata[model] = ModelMetadata.from_json(response.json())
        return self._metadata[model]

    def run_model(
        self, model: str, inputs: object, *, outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Runs `model` (name, model_id or SHA-256) and returns its outputs by name."""
        if isinstance(inputs, dict) and not {"data", "dtype", "shape"} <= inputs.keys():
            arrays = to_arrays(inputs, ())
        else:
            arrays = to_arrays(inputs, [i.name for i in self.model_metadata(model).inputs])
        body, headers = encode_infer_request(arrays, outputs=outputs, binary=True)
        response = self._request(
            "POST", f"/v2/models/{quote(model, safe='')}/infer", content=body, headers=headers
        )
        header_length = parse_header_length(response.headers.get("inference-header-content-length"))
        parsed = parse_infer_response(response.content, header_length, self._limits)
        return dict(parsed.outputs)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _server_error(response)
        return response


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(UPLOAD_CHUNK):
            yield chunk


def _server_error(response: httpx.Response) -> ServerError:
    try:
        document = response.json()
        return ServerError(response.status_code, str(document["code"]), str(document["error"]))
    except (ValueError, KeyError, TypeError):
        return ServerError(response.status_code, "http_error", response.text[:200])
