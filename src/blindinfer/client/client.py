"""`connect()` and the `Client` it returns.

`connect` refuses to return a client unless the server's evidence verified against the
policy; the client then talks only to the attested key, pinned in its TLS context. With
`replicas=N` (several replicas behind one address, each with its own key) it talks only to
keys it attested, each on a connection that presented it (client/replica_gate.py).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np

from blindinfer.attestation.bundle import EvidenceBundle
from blindinfer.attestation.intel.pccs import CollateralSource, PccsCollateral
from blindinfer.attestation.policy import Policy
from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.attestation.verifier import verify_evidence
from blindinfer.client.attested_keys import (
    DEFAULT_MAX_AGE_SECONDS,
    AttestedKey,
    AttestedKeys,
    check_replicas,
)
from blindinfer.client.common import (
    INDEX_CALL,
    Call,
    Progress,
    build_request,
    delete_call,
    http_options,
    infer_call,
    infer_outputs,
    infer_response,
    json_answer,
    metadata_call,
    model_list,
    needs_input_names,
    policy_of,
    request_errors,
    send_retrying_broken,
    send_with_retries,
    share_call,
    upload_call,
)
from blindinfer.client.grpc_pin import announced_port
from blindinfer.client.grpc_transport import (
    GrpcTransport,
    check_grpc_port,
    check_options,
    check_transport,
    open_channel,
)
from blindinfer.client.models import ModelInfo, ModelMetadata
from blindinfer.client.openai_sdk import openai_client
from blindinfer.client.pinned_http import PinnedConnectionPool
from blindinfer.client.receipts import (
    Receipt,
    ReceiptedOutputs,
    check_generation,
    check_receipt,
    receipt_and_text,
    transcript_fields,
)
from blindinfer.client.replica_gate import (
    KeyGate,
    Verify,
    attest_first,
    attested_key_of,
    gated_context,
)
from blindinfer.client.retry import DEFAULT_RETRY, RetryPolicy
from blindinfer.client.simulation import SIMULATION_BANNER as SIMULATION_BANNER
from blindinfer.client.simulation import simulation_flag, warn_simulation
from blindinfer.client.tensors import to_arrays
from blindinfer.client.transport import check_url, fetch_evidence, pinned_context
from blindinfer.errors import ProtocolError, UsageError
from blindinfer.protocol.evidence import NONCE_SIZE, EvidenceDocument, parse_evidence_document
from blindinfer.protocol.limits import TensorLimits

log = logging.getLogger("blindinfer.client")


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
    bundle = EvidenceBundle(
        source=base,
        captured_at=int(time.time()),
        nonce=nonce,
        tls_certificate_der=discovered.certificate_der,
        evidence=parse_evidence_document(discovered.body),
    )
    return with_collateral(bundle, collateral)


def with_collateral(bundle: EvidenceBundle, source: CollateralSource | None) -> EvidenceBundle:
    """`bundle` with its Intel collateral from `source` (a PCCS or PCS the caller trusts)
    instead of the server's; unchanged without a source or for non-Intel evidence."""
    evidence = bundle.evidence
    if source is None or not evidence.kind.startswith("intel-"):
        return bundle
    fetched = source.collateral_json(evidence.quote)
    return dataclasses.replace(
        bundle, evidence=dataclasses.replace(evidence, collateral_json=fetched)
    )


def collateral_source(url: str | None, allow_insecure_http: bool) -> PccsCollateral | None:
    """The caller's collateral service (`collateral_url`), or None: the server's collateral."""
    if url is None:
        return None
    return PccsCollateral(url, allow_insecure_http=allow_insecure_http)


def replica_verifier(
    policy: Policy | None,
    simulation: bool,
    collateral_url: str | None,
    allow_insecure_http: bool = False,
) -> Verify:
    """How a replica-set client verifies each replica's bundle: as `connect` verifies the
    first one (same policy, simulation flag and collateral source)."""
    source = collateral_source(collateral_url, allow_insecure_http)

    def verify(bundle: EvidenceBundle) -> tuple[VerifiedAttestation, EvidenceBundle]:
        bundle = with_collateral(bundle, source)
        return verify_bundle(bundle, policy=policy, simulation=simulation), bundle

    return verify


def replica_set_gate(
    url: str,
    policy: Policy | None,
    simulation: bool,
    collateral_url: str | None,
    allow_insecure_http: bool,
    *,
    replicas: int,
    max_attestation_age: float,
) -> KeyGate:
    """The check a replica-set client (Client, AsyncClient, the proxy) runs on every new
    connection: up to `replicas` keys, each verified as `connect` verifies the first."""
    keys = AttestedKeys(max_keys=replicas, max_age_seconds=max_attestation_age)
    verify = replica_verifier(policy, simulation, collateral_url, allow_insecure_http)
    return KeyGate(url, keys, verify)


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectPlan:
    """`connect`'s and `connect_async`'s arguments, checked: the URL, the loaded policy,
    and with `replicas` > 1 the gate every connection passes (None: one pinned key)."""

    url: str
    policy: Policy
    gate: KeyGate | None


def plan_connect(
    url: str,
    policy: Policy | str | Path | dict[str, Any],
    simulation: bool,
    collateral_url: str | None,
    allow_insecure_http: bool,
    *,
    replicas: int,
    max_attestation_age: float,
    transport: str,
    grpc_port: int | None,
    stacklevel: int,
) -> ConnectPlan:
    """The checks both `connect`s make before any byte is sent, in one order: the
    simulation flag (a bool, warned about at the caller's `stacklevel`), the URL, the
    policy, the replica and transport options; then the replica gate, if any."""
    allow_simulation = simulation_flag(simulation)
    base = check_url(url)
    loaded = policy_of(policy)
    check_replicas(replicas)
    check_options(transport, grpc_port, replicas)
    if allow_simulation:
        warn_simulation(stacklevel=stacklevel + 1)
    gate = None
    if replicas > 1:
        gate = replica_set_gate(
            base,
            loaded,
            simulation,
            collateral_url,
            allow_insecure_http,
            replicas=replicas,
            max_attestation_age=max_attestation_age,
        )
    return ConnectPlan(base, loaded, gate)


def verified_boot_evidence(
    body: bytes, certificate_der: bytes, *, simulation: bool
) -> EvidenceDocument:
    """A server's boot evidence (an all-zero nonce: what receipts name), checked to be
    authentic and to bind `certificate_der`; simulation evidence only where the key's own
    attestation was made with simulation allowed."""
    document = parse_evidence_document(body)
    verify_evidence(
        document,
        policy=None,
        expected_nonce=bytes(NONCE_SIZE),
        tls_certificate_der=certificate_der,
        allow_simulation=simulation,
    )
    return document


def verify_bundle(
    bundle: EvidenceBundle, *, policy: Policy | None, simulation: bool, now: int | None = None
) -> VerifiedAttestation:
    allow_simulation = simulation_flag(simulation)
    return verify_evidence(
        bundle.evidence,
        policy=policy,
        expected_nonce=bundle.nonce,
        tls_certificate_der=bundle.tls_certificate_der,
        allow_simulation=allow_simulation,
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
    allow_insecure_http: bool = False,
) -> VerifiedAttestation:
    """Asks for evidence over a fresh nonce and verifies it; raises on any failure."""
    if simulation_flag(simulation):
        warn_simulation(stacklevel=2)  # names the line that called attest()
    return attest_unwarned(
        url,
        policy=policy,
        simulation=simulation,
        timeout=timeout,
        now=now,
        collateral_url=collateral_url,
        allow_insecure_http=allow_insecure_http,
    )


def attest_unwarned(
    url: str,
    *,
    policy: Policy | None,
    simulation: bool,
    timeout: float,
    now: int | None = None,
    collateral_url: str | None = None,
    allow_insecure_http: bool = False,
) -> VerifiedAttestation:
    """`attest` without the simulation warning, for callers that warn themselves (the
    AsyncClient runs this in a worker thread and warns from the caller's coroutine)."""
    return _verified_bundle(
        url, policy, simulation, timeout, now, collateral_url, allow_insecure_http
    )[0]


def _verified_bundle(
    url: str,
    policy: Policy | None,
    simulation: bool,
    timeout: float,
    now: int | None,
    collateral_url: str | None,
    allow_insecure_http: bool = False,
) -> tuple[VerifiedAttestation, EvidenceBundle]:
    """Captures over a fresh nonce and verifies; the bundle is what receipts' proofs carry."""
    source = collateral_source(collateral_url, allow_insecure_http)
    bundle = capture(url, timeout=timeout, collateral=source)
    return verify_bundle(bundle, policy=policy, simulation=simulation, now=now), bundle


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
    allow_insecure_http: bool = False,
    replicas: int = 1,
    max_attestation_age: float = DEFAULT_MAX_AGE_SECONDS,
    transport: str = "https",
    grpc_port: int | None = None,
) -> Client:
    """An attested connection: returns only once the evidence verified against `policy`.

    `replicas`: 1 (the default) pins the one key the server presented; a different key
    later is a `KeyBindingError`. N > 1: the server runs as up to N replicas behind one
    address, each with its own key: every new connection whose key is not attested yet is
    attested on that connection (fresh nonce, same policy) before a request goes on it;
    at most N keys are trusted at once, each for `max_attestation_age` seconds, then
    attested again. `Client.attested_keys` lists them.

    `collateral_url`: fetch Intel collateral from this PCCS/PCS instead of the server; it
    must be https:// unless `allow_insecure_http=True` (a `UsageError` otherwise).
    `api_key`: sent only over the pinned, attested channel, never before verification.
    `timeout`: seconds for each of connecting, sending, receiving and waiting for a pooled
    connection. `retry`: how requests refused with 429/503 are retried (`NO_RETRY`: never;
    see `blindinfer.client.retry`). `max_connections`: size of the connection pool
    (default: httpx's, 100).

    `simulation`: True trusts the simulation root (no TEE: for tests only) and shows a
    `SimulationWarning` on every call; anything but True or False is a `UsageError`.

    `transport`: "https" (the default) sends everything over the pinned HTTPS connection.
    "grpc" attests over HTTPS exactly the same way, then runs `run_model` and
    `model_metadata` over the server's OIP v2 gRPC port (`grpc_port=`, else the port the
    attested server announces in `GET /v2`) on a TLS channel that trusts exactly the
    attested certificate (client/grpc_transport.py); the other calls stay on HTTPS. It
    needs the `grpc` extra and refuses `replicas` > 1 (`UsageError`). Errors, receipts
    and outputs are the same on both transports.

    Every failure is a `blindinfer.BlindInferError`: `UsageError` for a URL that is not
    `https://host:port`, a policy path that is missing or a non-bool `simulation`,
    `PolicyError` for a malformed policy, `ConnectionFailedError` when the server cannot be
    reached, an `AttestationError` when it cannot be trusted.
    """
    plan = plan_connect(
        url,
        policy,
        simulation,
        collateral_url,
        allow_insecure_http,
        replicas=replicas,
        max_attestation_age=max_attestation_age,
        transport=transport,
        grpc_port=grpc_port,
        stacklevel=2,
    )
    base, loaded, gate = plan.url, plan.policy, plan.gate
    if gate is not None:
        first = attest_first(gate, timeout)
        return Client(
            base,
            first.attestation,
            timeout=timeout,
            api_key=api_key,
            retry=retry,
            max_connections=max_connections,
            bundle=first.bundle,
            gate=gate,
        )
    verified, bundle = _verified_bundle(
        base, loaded, simulation, timeout, None, collateral_url, allow_insecure_http
    )
    return Client(
        base,
        verified,
        timeout=timeout,
        api_key=api_key,
        retry=retry,
        max_connections=max_connections,
        bundle=bundle,
        transport=transport,
        grpc_port=grpc_port,
    )


class Client:
    """Talks only to the certificate that the verified evidence bound (with `gate`, made
    by `connect(..., replicas=N)`: only to certificates that verified evidence bound, each
    attested on a connection that presented it; see client/replica_gate.py).

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
        bundle: EvidenceBundle | None = None,
        gate: KeyGate | None = None,
        transport: str = "https",
        grpc_port: int | None = None,
    ) -> None:
        self.url = check_url(url)
        self.transport = check_transport(transport)
        """"https", or "grpc": `run_model` and `model_metadata` go over gRPC."""
        self.attestation = attestation
        self.bundle = bundle
        """The evidence verified at connect (what receipts' proofs carry)."""
        self._gate = gate
        if gate is not None:
            self._keys = gate.keys
        else:  # pinned: the one key, for as long as the client lives
            self._keys = AttestedKeys(max_keys=1, max_age_seconds=math.inf)
            self._keys.admit(attestation, bundle)
        self._boot_evidence: EvidenceDocument | None = None
        self._boot_by_key: dict[bytes, EvidenceDocument] = {}
        self._boot_lock = threading.Lock()
        self.retry = retry
        self._timeout = timeout
        self._api_key = api_key
        context = gated_context() if gate else pinned_context(attestation.certificate_der)
        self._http = httpx.Client(
            **http_options(
                url,
                attestation,
                timeout=timeout,
                api_key=api_key,
                max_connections=max_connections,
                asynchronous=False,
                context=context,
                gate=gate,
            )
        )
        self._metadata: dict[str, ModelMetadata] = {}
        self._limits = TensorLimits()
        # run_model's requests bypass httpx (client/pinned_http.py), on the same context,
        # with the same headers (no Accept-Encoding: nothing is decompressed there) and
        # the same pool limits as http_options gives httpx
        self._pinned = PinnedConnectionPool(
            self.url,
            context,
            timeout=timeout,
            headers=[
                (name, value)
                for name, value in self._http.headers.items()
                if name != "accept-encoding"
            ],
            max_body=self._limits.max_header_bytes + self._limits.max_total_bytes,
            max_connections=100 if max_connections is None else max_connections,
            max_keepalive=20 if max_connections is None else max_connections,
            gate=gate,
        )
        self._grpc: GrpcTransport | None = None
        if transport == "grpc":
            try:
                self._grpc = self._grpc_channel(check_grpc_port(grpc_port))
            except BaseException:
                self.close()
                raise

    def _grpc_channel(self, port: int | None) -> GrpcTransport:
        """The gRPC channel to the attested key: on `port`, else the one the attested server
        announces (asked on the pinned HTTPS connection: no security input either way)."""
        if self._gate is not None:
            raise UsageError("transport='grpc' cannot be combined with replicas > 1")
        if port is None:
            port = json_answer(self._send(Call("GET", "/v2", idempotent=True)), announced_port)
        return open_channel(
            self.url,
            port,
            self.attestation.certificate_der,
            api_key=self._api_key,
            timeout=self._timeout,
            retry=self.retry,
            limits=self._limits,
        )

    @property
    def attested_keys(self) -> list[AttestedKey]:
        """The keys this client trusts now, oldest first: the one pinned key, or with
        `replicas=N` each replica's key attested so far (at most N, none older than
        `max_attestation_age`). Each has `.attestation`, `.bundle` and `.certificate_der`."""
        return self._keys.admitted()

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
        self._pinned.close()
        if self._grpc is not None:
            self._grpc.close()

    def upload_model(
        self,
        model: str | Path | bytes | Any,
        *,
        name: str | None = None,
        share_with: Sequence[str] = (),
        progress: Progress | None = None,
        receipt: bool = False,
    ) -> ModelInfo:
        """Uploads a model from a path, bytes or an onnx.ModelProto (streamed in chunks).

        `share_with`: tenants that may run it too ("*" = every tenant); private otherwise.
        `progress(sent, total)`: called with 0, then after each chunk (1 MiB) the connection
        took, ending at the model's size; from 0 again if the upload is retried. An
        exception it raises aborts the upload. `receipt`: the returned ModelInfo carries a
        verified, signed upload receipt.
        """
        response = self._send(upload_call(model, name, share_with, progress, receipt))
        kind = "upload" if receipt else None
        return json_answer(response, lambda d: self._model_info(d, kind, response))

    def openai(self) -> Any:
        """An `openai.OpenAI` for this server's OpenAI-compatible API (`/v1`) whose HTTP
        client trusts only the attested, pinned TLS key: no request goes anywhere else
        (`blindinfer.client.openai_sdk`). Needs the `openai` package."""
        return openai_client(
            self.url,
            self.attestation.certificate_der,
            api_key=self._api_key,
            timeout=self._timeout,
            asynchronous=False,
            gate=self._gate,
        )

    def async_openai(self) -> Any:
        """`openai()`, as an `openai.AsyncOpenAI`."""
        return openai_client(
            self.url,
            self.attestation.certificate_der,
            api_key=self._api_key,
            timeout=self._timeout,
            asynchronous=True,
            gate=self._gate,
        )

    def verify_generation(
        self,
        response: Any,
        *,
        messages: Sequence[Any] | None = None,
        prompt: object = None,
        output: str | None = None,
    ) -> Receipt:
        """Verifies the receipt of a completion made with `openai()`: a ChatCompletion or
        Completion (its text is the output), or a stream's last chunk (pass `output=`, the
        concatenated text of its chunks). Checks the signature by the attested key, the
        boot evidence it names, that it is a generation receipt, and the digests of
        `messages` (chat) or `prompt` (text) and of the output. The returned Receipt's
        `.save(path)` writes the transcript `blindinfer verify-receipt` checks offline.
        Raises ProtocolError (code invalid_receipt) if anything does not match."""
        jws, text = receipt_and_text(response)
        output = text if output is None else output
        if output is None:
            raise UsageError(
                "a streamed answer's receipt needs output=: the text of all its chunks joined"
            )
        checked = self._check_receipt(jws, "generation")
        check_generation(checked.payload, messages=messages, prompt=prompt, output=output)
        fields = transcript_fields(messages=messages, prompt=prompt, output=output)
        return dataclasses.replace(checked, transcript=fields)

    def delete_model(self, model: str, *, receipt: bool = False) -> ModelInfo:
        """Deletes `model` and its sealed copies; `receipt`: with a signed delete receipt."""
        response = self._send(delete_call(model, receipt))
        self._metadata.pop(model, None)
        kind = "delete" if receipt else None
        return json_answer(response, lambda d: self._model_info(d, kind, response))

    def _model_info(
        self, document: Any, receipt_kind: str | None, response: httpx.Response
    ) -> ModelInfo:
        info = ModelInfo.from_json(document)
        if receipt_kind is None:
            return info
        checked = self._check_receipt(
            document.get("receipt"), receipt_kind, key=attested_key_of(response)
        )
        model = checked.payload["model"]
        if model.get("sha256") != info.sha256 or model.get("model_id") != info.model_id:
            raise ProtocolError("invalid_receipt", "the receipt names another model")
        return dataclasses.replace(info, receipt=checked)

    def boot_evidence(self) -> EvidenceDocument:
        """The server's boot evidence (fetched once on the pinned channel), checked to be
        authentic and to bind the pinned key: receipts name the digest of its quote.
        With `replicas=N`: the first attested replica's (see `_boot_of` for the others)."""
        if self._gate is not None:
            first = self._keys.first
            assert first is not None  # connect() attested one
            return self._boot_of(first)
        with self._boot_lock:
            if self._boot_evidence is None:
                body = self._send(Call("GET", "/v2/attestation")).content
                self._boot_evidence = verified_boot_evidence(
                    body,
                    self.attestation.certificate_der,
                    simulation=self.attestation.simulation,
                )
            return self._boot_evidence

    def _boot_of(self, key: AttestedKey) -> EvidenceDocument:
        """A replica's boot evidence, as read on a connection that presented its key when
        it was attested; checked (once) to be authentic and to bind that key."""
        with self._boot_lock:
            document = self._boot_by_key.get(key.certificate_der)
            if document is not None:
                return document
        if key.boot_evidence is None:
            raise ProtocolError("invalid_receipt", "no boot evidence for the replica that signed")
        document = verified_boot_evidence(
            key.boot_evidence, key.certificate_der, simulation=key.attestation.simulation
        )
        with self._boot_lock:
            if len(self._boot_by_key) >= 2 * self._keys.max_keys:
                self._boot_by_key.clear()  # bounded: replaced replicas do not pile up
            self._boot_by_key[key.certificate_der] = document
        return document

    def _check_receipt(
        self,
        jws: object,
        kind: str,
        inputs: dict[str, np.ndarray] | None = None,
        outputs: dict[str, np.ndarray] | None = None,
        *,
        key: AttestedKey | None = None,
    ) -> Receipt:
        """`key`: the replica whose connection carried the answer; without it (an openai
        SDK answer) each attested replica is tried, and one whose key signed must match."""
        if self._gate is None:
            if self.bundle is None:
                raise ProtocolError("invalid_receipt", "receipts need a client made by connect()")
            return check_receipt(
                jws, self.bundle, self.boot_evidence(), kind=kind, inputs=inputs, outputs=outputs
            )
        candidates = [key] if key is not None else self._keys.admitted()
        failure: ProtocolError | None = None
        for candidate in candidates:
            if candidate.bundle is None:
                continue
            try:
                return check_receipt(
                    jws,
                    candidate.bundle,
                    self._boot_of(candidate),
                    kind=kind,
                    inputs=inputs,
                    outputs=outputs,
                )
            except ProtocolError as exc:
                failure = failure or exc
        raise failure or ProtocolError("invalid_receipt", "no attested replica signed it")

    def share_model(self, model: str, tenants: Sequence[str]) -> ModelInfo:
        """Lets other tenants run `model` ("*" = every tenant); [] makes it private again."""
        return json_answer(self._send(share_call(model, tenants)), ModelInfo.from_json)

    def list_models(self) -> list[ModelInfo]:
        return json_answer(self._send(INDEX_CALL), model_list)

    def model_metadata(self, model: str) -> ModelMetadata:
        if model not in self._metadata:
            if self._grpc is not None:
                self._metadata[model] = self._grpc.model_metadata(model)
            else:
                response = self._send(metadata_call(model))
                self._metadata[model] = json_answer(response, ModelMetadata.from_json)
        return self._metadata[model]

    def run_model(
        self,
        model: str,
        inputs: object,
        *,
        outputs: Sequence[str] | None = None,
        receipt: bool = False,
    ) -> dict[str, np.ndarray]:
        """Runs `model` (name, model_id or SHA-256) and returns its outputs by name.

        `receipt`: returns `ReceiptedOutputs` whose `.receipt` was verified (signature by
        the pinned key, digests of these inputs and outputs); `.receipt.save(path)` writes
        a proof that `blindinfer verify-receipt` checks offline (on both transports).
        """
        names: list[str] = []
        if needs_input_names(inputs):
            names = [i.name for i in self.model_metadata(model).inputs]
        arrays = to_arrays(inputs, names)
        key: AttestedKey | None = None
        if self._grpc is not None:
            results, jws = self._grpc.infer(model, arrays, outputs, receipt)
            if not receipt:
                return results
        else:
            response = self._send(infer_call(model, arrays, outputs, receipt), fast=True)
            if not receipt:
                return infer_outputs(response, self._limits)
            parsed = infer_response(response, self._limits)
            results, jws = dict(parsed.outputs), parsed.parameters.get("receipt")
            key = attested_key_of(response)
        checked = self._check_receipt(jws, "inference", arrays, results, key=key)
        if len(model) == 64 and checked.payload["model"].get("sha256") != model.lower():
            raise ProtocolError("invalid_receipt", "the receipt names another model")
        return ReceiptedOutputs(results, checked)

    def _send(self, call: Call, *, fast: bool = False) -> httpx.Response:
        """`fast`: a request with a bytes body goes through client/pinned_http.py."""
        content = call.content
        fast = fast and content is not None and call.upload is None and call.json is None
        fast = fast and call.params is None

        def once() -> httpx.Response:
            if fast and content is not None:
                return self._pinned.request(call.method, call.path, call.headers, content)
            return self._http.send(build_request(self._http, call, asynchronous=False))

        def attempt() -> httpx.Response:
            with request_errors(self.url, self._timeout, call):
                return send_retrying_broken(once, call)

        return send_with_retries(attempt, self.retry)
