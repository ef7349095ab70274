"""Intel DCAP collateral for the quotes a real TEE produces, fetched from a PCCS.

The client verifies a quote with dcap-qvl against collateral the *server* sends along
(`Evidence.collateral_json`), so that a client needs no network access to Intel. This
module is where the server gets that collateral: from a PCCS (Intel's caching service,
or any service speaking the PCS v4 API, including Intel's PCS itself). A client that
prefers not to take collateral from the server uses it too (`connect(...,
collateral_url=...)`): it lives on the client side so that the client never imports the
server. Either way dcap-qvl checks the collateral's signatures against the pinned root.

Why not `dcap_qvl.get_collateral`? Its Python binding takes only a URL: the transport
cannot be injected (so it cannot be tested without a network) and it attaches
`pck_certificate_chain`, a field our verifier rejects on purpose (dcap-qvl would check
that chain instead of the one inside the quote). So the PCS v4 calls are made here:

    GET /sgx/certification/v4/pckcrl?ca={processor|platform}&encoding=der
        body: PCK CRL (DER; PEM or hex also accepted)    header SGX-PCK-CRL-Issuer-Chain
    GET /{sgx|tdx}/certification/v4/tcb?fmspc={FMSPC}
        body: {"tcbInfo": {...}, "signature": hex}        header TCB-Info-Issuer-Chain
                                                           (v3 name SGX-TCB-Info-Issuer-Chain)
    GET /{sgx|tdx}/certification/v4/qe/identity?update=standard
        body: {"enclaveIdentity": {...}, "signature": hex} header
                                                           SGX-Enclave-Identity-Issuer-Chain
    GET /sgx/certification/v4/rootcacrl   (PCCS only; hex-encoded DER)
        falling back to the CRL distribution point of the root certificate (Intel PCS).

Issuer chains come URL-encoded in headers. The signed JSON bodies (`tcbInfo`,
`enclaveIdentity`) are kept *byte for byte* as the PCCS sent them: Intel's signature
covers those exact bytes, so re-serialising them would break verification.

The result is cached per (TEE kind, FMSPC, PCK CA) and refreshed before it expires:
once less than max(1 day, 10 % of its validity window) is left. If a refresh fails while
the cached collateral is still valid, the cached copy is served (and the failure
logged) so that a PCCS outage does not take attestation down before it must.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Protocol

import dcap_qvl  # type: ignore[import-untyped]  # has a .pyi but no py.typed marker
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from blindinfer.errors import BlindInferError, UsageError

log = logging.getLogger("blindinfer.attestation.intel.pccs")

MAX_RESPONSE_SIZE: Final = 4 * 1024 * 1024
"""Largest PCCS/KDS response body accepted (the platform PCK CRL is the largest, ~10 KiB)."""

MAX_SIGNED_JSON_SIZE: Final = 256 * 1024
"""Same bound as the client's collateral limit: a larger body could never be verified."""

REFRESH_MIN_MARGIN: Final = 86400
"""Refresh once less than a day is left before the earliest nextUpdate..."""

REFRESH_WINDOW_FRACTION: Final = 0.10
"""...or less than 10 % of the validity window, whichever is larger."""

RETRY_INTERVAL: Final = 300
"""After a failed (or still-stale) refresh, wait this long before asking the PCCS again."""

DEFAULT_TIMEOUT: Final = 30.0

COLLATERAL_FIELD_ORDER: Final = (
    "pck_crl_issuer_chain",
    "root_ca_crl",
    "pck_crl",
    "tcb_info_issuer_chain",
    "tcb_info",
    "tcb_info_signature",
    "qe_identity_issuer_chain",
    "qe_identity",
    "qe_identity_signature",
)
"""The nine dcap-qvl `QuoteCollateralV3` JSON fields, in dcap-qvl's own order."""


class CollateralError(BlindInferError):
    """Collateral for a quote could not be obtained (PCCS down, malformed answer, ...)."""


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """What a fetcher returns: the PCS API needs headers (issuer chains), not just a body.

    `headers` keys must be lower-case; `header()` looks names up case-insensitively.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


Fetch = Callable[[str], HttpResponse]
"""A blocking HTTP GET. Injectable so tests (and air-gapped deployments) need no network."""


def httpx_fetch(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> HttpResponse:
    """Default fetcher: one bounded GET with httpx (certificate-verified TLS, no redirects).

    Redirects are not followed so that a PCCS URL cannot silently become another host.
    """
    import httpx

    try:
        with (
            httpx.Client(timeout=timeout, follow_redirects=False) as client,
            client.stream("GET", url) as response,
        ):
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_RESPONSE_SIZE:
                    raise CollateralError(f"{url}: response larger than {MAX_RESPONSE_SIZE} bytes")
                chunks.append(chunk)
            headers = {k.lower(): v for k, v in response.headers.items()}
            return HttpResponse(status=response.status_code, headers=headers, body=b"".join(chunks))
    except httpx.HTTPError as exc:
        raise CollateralError(f"GET {url} failed: {exc}") from exc


class CollateralSource(Protocol):
    """Gives the dcap-qvl `QuoteCollateralV3` JSON that verifies a given quote."""

    def collateral_json(self, quote: bytes) -> str:
        """Collateral for `quote` (SGX v3 or TDX v4/v5 with an embedded PCK chain)."""
        ...


@dataclass(frozen=True, slots=True)
class QuoteIdentity:
    """What selects collateral: TEE kind ("sgx"/"tdx"), FMSPC (upper hex) and PCK CA."""

    tee: str
    fmspc: str
    ca: str


def quote_identity(quote: bytes) -> QuoteIdentity:
    """FMSPC and CA type from the PCK certificate embedded in the quote (via dcap-qvl).

    Quotes whose certification data is an encrypted PPID (types 2/3) carry no PCK
    certificate; the QPL must be configured to embed the chain (type 5).
    """
    try:
        parsed = dcap_qvl.parse_quote(quote)
        tee = "tdx" if parsed.is_tdx() else "sgx"
        fmspc = str(parsed.fmspc()).upper()
        ca = str(parsed.ca()).lower()
    except (ValueError, RuntimeError) as exc:
        raise CollateralError(
            f"cannot read FMSPC / PCK CA from the quote ({exc}); the quote must embed its "
            "PCK certificate chain (certification data type 5)"
        ) from exc
    if not re.fullmatch(r"[0-9A-F]{12}", fmspc):
        raise CollateralError(f"quote has a malformed FMSPC {fmspc!r}")
    if ca not in ("processor", "platform"):
        raise CollateralError(f"quote's PCK certificate has an unknown issuer CA {ca!r}")
    return QuoteIdentity(tee=tee, fmspc=fmspc, ca=ca)


@dataclass(frozen=True, slots=True)
class _Cached:
    json: str
    valid_from: int
    valid_until: int
    refresh_at: int
    next_attempt: int


def require_https(url: str, what: str, *, allow_insecure_http: bool) -> None:
    """Refuse `url` unless it is https:// (http:// only when the user explicitly allowed it).

    Why: collateral and chip certificates are signed, so a plain-HTTP hop cannot forge
    them, but it shows every observer which platform (FMSPC, chip ID) is being attested and
    lets anyone on the path withhold or replay stale revocation data. A user-set URL is
    therefore https unless they say otherwise, in so many words.
    """
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("https", "http") or not parts.netloc:
        raise UsageError(f"{what} must be an https:// URL, got {str(url)[:200]!r}")
    if parts.scheme == "http" and not allow_insecure_http:
        raise UsageError(
            f"{what} {url[:200]!r} is plain http://: use https://, or allow it explicitly "
            "(allow_insecure_http=True, or --insecure-http-collateral on the command line)"
        )


class PccsCollateral:
    """A `CollateralSource` backed by a PCCS (or Intel PCS), cached per platform kind."""

    def __init__(
        self,
        base_url: str,
        *,
        fetch: Fetch = httpx_fetch,
        clock: Callable[[], float] = time.time,
        retry_interval: int = RETRY_INTERVAL,
        allow_insecure_http: bool = False,
    ) -> None:
        require_https(base_url, "the PCCS/collateral URL", allow_insecure_http=allow_insecure_http)
        base = base_url.rstrip("/")
        for suffix in ("/sgx/certification/v4", "/tdx/certification/v4"):
            base = base.removesuffix(suffix)
        self._base = base
        self._fetch = fetch
        self._clock = clock
        self._retry_interval = retry_interval
        self._lock = threading.Lock()
        self._cache: dict[QuoteIdentity, _Cached] = {}
        self._key_locks: dict[QuoteIdentity, threading.Lock] = {}

    @property
    def base_url(self) -> str:
        return self._base

    def collateral_json(self, quote: bytes) -> str:
        """Cached collateral for the quote's platform, refreshed near its nextUpdate."""
        ident = quote_identity(quote)
        now = int(self._clock())
        with self._lock:
            entry = self._cache.get(ident)
            key_lock = self._key_locks.setdefault(ident, threading.Lock())
        if entry is not None and (now < entry.refresh_at or now < entry.next_attempt):
            return entry.json
        usable = entry is not None and now < entry.valid_until
        # While one thread refreshes, others keep serving still-valid collateral.
        if not key_lock.acquire(blocking=not usable):
            assert entry is not None
            return entry.json
        try:
            with self._lock:
                current = self._cache.get(ident)
            if (
                current is not None
                and current is not entry
                and (now < current.refresh_at or now < current.next_attempt)
            ):
                return current.json
            try:
                fresh = self._build(ident, now)
            except CollateralError as exc:
                if entry is not None and usable:
                    log.warning(
                        "collateral refresh for %s failed, serving cached copy valid until %d: %s",
                        ident,
                        entry.valid_until,
                        exc,
                    )
                    with self._lock:
                        self._cache[ident] = _replace_attempt(entry, now + self._retry_interval)
                    return entry.json
                raise
            with self._lock:
                self._cache[ident] = fresh
            return fresh.json
        finally:
            key_lock.release()

    # -- building ---------------------------------------------------------------------

    def _url(self, tee: str, path: str) -> str:
        return f"{self._base}/{tee}/certification/v4/{path}"

    def _get(self, url: str) -> HttpResponse:
        try:
            response = self._fetch(url)
        except CollateralError:
            raise
        except Exception as exc:  # a fetcher's transport error, whatever its type
            raise CollateralError(f"GET {url} failed: {exc}") from exc
        if not 200 <= response.status < 300:
            raise CollateralError(f"GET {url}: HTTP {response.status}")
        if len(response.body) > MAX_RESPONSE_SIZE:
            raise CollateralError(f"GET {url}: response larger than {MAX_RESPONSE_SIZE} bytes")
        return response

    def _build(self, ident: QuoteIdentity, now: int) -> _Cached:
        """Fetch the four pieces and assemble the nine-field dcap-qvl JSON."""
        crl_url = self._url("sgx", f"pckcrl?ca={ident.ca}&encoding=der")
        crl_resp = self._get(crl_url)
        pck_crl_issuer_chain = _chain_header(crl_resp, crl_url, "SGX-PCK-CRL-Issuer-Chain")
        pck_crl = _crl_der(crl_resp.body, crl_url)

        tcb_url = self._url(ident.tee, f"tcb?fmspc={ident.fmspc}")
        tcb_resp = self._get(tcb_url)
        tcb_info_issuer_chain = _chain_header(
            tcb_resp, tcb_url, "TCB-Info-Issuer-Chain", "SGX-TCB-Info-Issuer-Chain"
        )
        tcb_info, tcb_info_signature = _signed_json(tcb_resp.body, tcb_url, "tcbInfo")

        qe_url = self._url(ident.tee, "qe/identity?update=standard")
        qe_resp = self._get(qe_url)
        qe_identity_issuer_chain = _chain_header(
            qe_resp, qe_url, "SGX-Enclave-Identity-Issuer-Chain"
        )
        qe_identity, qe_identity_signature = _signed_json(qe_resp.body, qe_url, "enclaveIdentity")

        root_ca_crl = self._root_ca_crl(qe_identity_issuer_chain)

        tcb_doc = _json_object(tcb_info, tcb_url)
        qe_doc = _json_object(qe_identity, qe_url)
        _expect(tcb_doc, "id", "TDX" if ident.tee == "tdx" else "SGX", tcb_url)
        _expect(qe_doc, "id", "TD_QE" if ident.tee == "tdx" else "QE", qe_url)
        if str(tcb_doc.get("fmspc", "")).upper() != ident.fmspc:
            raise CollateralError(
                f"{tcb_url}: TCB info is for FMSPC {tcb_doc.get('fmspc')!r}, not {ident.fmspc}"
            )

        doc = {
            "pck_crl_issuer_chain": pck_crl_issuer_chain,
            "root_ca_crl": root_ca_crl.hex(),
            "pck_crl": pck_crl.hex(),
            "tcb_info_issuer_chain": tcb_info_issuer_chain,
            "tcb_info": tcb_info,
            "tcb_info_signature": tcb_info_signature.hex(),
            "qe_identity_issuer_chain": qe_identity_issuer_chain,
            "qe_identity": qe_identity,
            "qe_identity_signature": qe_identity_signature.hex(),
        }
        text = json.dumps(doc)
        try:
            dcap_qvl.QuoteCollateralV3.from_json(text)
        except Exception as exc:
            raise CollateralError(f"dcap-qvl cannot read the assembled collateral: {exc}") from exc

        valid_from = max(
            _iso_time(tcb_doc, "issueDate", tcb_url),
            _iso_time(qe_doc, "issueDate", qe_url),
            _crl_time(pck_crl, "last"),
            _crl_time(root_ca_crl, "last"),
        )
        valid_until = min(
            _iso_time(tcb_doc, "nextUpdate", tcb_url),
            _iso_time(qe_doc, "nextUpdate", qe_url),
            _crl_time(pck_crl, "next"),
            _crl_time(root_ca_crl, "next"),
        )
        window = max(0, valid_until - valid_from)
        margin = max(REFRESH_MIN_MARGIN, int(window * REFRESH_WINDOW_FRACTION))
        refresh_at = valid_until - margin
        if now >= refresh_at:
            log.warning(
                "PCCS %s served collateral for %s that is already due for refresh "
                "(valid until %d, now %d); is the PCCS cache stale?",
                self._base,
                ident,
                valid_until,
                now,
            )
        return _Cached(
            json=text,
            valid_from=valid_from,
            valid_until=valid_until,
            refresh_at=refresh_at,
            next_attempt=now + self._retry_interval,
        )

    def _root_ca_crl(self, issuer_chain: str) -> bytes:
        """The root CA CRL: PCCS's /rootcacrl, else the root certificate's CRL DP (PCS)."""
        url = self._url("sgx", "rootcacrl")
        try:
            return _crl_der(self._get(url).body, url)
        except CollateralError as exc:
            log.debug(
                "no root CA CRL from %s (%s); using the root's CRL distribution point", url, exc
            )
        certs = _load_chain(issuer_chain, "QE identity issuer chain")
        dp_url = _crl_distribution_point(certs[-1])
        return _crl_der(self._get(dp_url).body, dp_url)


def _replace_attempt(entry: _Cached, next_attempt: int) -> _Cached:
    return _Cached(
        json=entry.json,
        valid_from=entry.valid_from,
        valid_until=entry.valid_until,
        refresh_at=entry.refresh_at,
        next_attempt=next_attempt,
    )


def _chain_header(response: HttpResponse, url: str, *names: str) -> str:
    """An issuer chain header, URL-decoded (`+` stays `+`: it is base64, not a space)."""
    for name in names:
        value = response.header(name)
        if value is not None:
            chain = urllib.parse.unquote(value)
            _load_chain(chain, f"{name} from {url}")
            return chain
    raise CollateralError(f"{url}: response has no {' / '.join(names)} header")


def _load_chain(pem: str, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise CollateralError(f"{what} is not a PEM certificate chain: {exc}") from exc
    if not certs:
        raise CollateralError(f"{what} holds no certificate")
    return certs


def _crl_distribution_point(cert: x509.Certificate) -> str:
    try:
        ext = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    except x509.ExtensionNotFound as exc:
        raise CollateralError("root certificate has no CRL distribution point") from exc
    for point in ext.value:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                return name.value
    raise CollateralError("root certificate's CRL distribution point has no URL")


def _crl_der(body: bytes, url: str) -> bytes:
    """A CRL as DER whatever the encoding the service chose (DER, PEM or hex text).

    The DER returned is exactly the bytes the service sent (after un-armouring), never a
    re-encoding, so that it still matches Intel's signature.
    """
    data = body.strip()
    try:
        if data.startswith(b"-----BEGIN"):
            der = x509.load_pem_x509_crl(data).public_bytes(Encoding.DER)
        elif data[:1] == b"\x30":
            der = bytes(body)
        else:
            der = bytes.fromhex(data.decode("ascii"))
        x509.load_der_x509_crl(der)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CollateralError(f"{url}: body is not a CRL (DER, PEM or hex): {exc}") from exc
    return der


def _crl_time(der: bytes, which: str) -> int:
    crl = x509.load_der_x509_crl(der)
    when = crl.last_update_utc if which == "last" else crl.next_update_utc
    if when is None:
        raise CollateralError("CRL has no nextUpdate")
    return int(when.timestamp())


def _signed_json(body: bytes, url: str, member: str) -> tuple[str, bytes]:
    """The raw text of `member` (byte-exact, as signed) and its hex-decoded signature."""
    if len(body) > MAX_SIGNED_JSON_SIZE:
        raise CollateralError(f"{url}: body larger than {MAX_SIGNED_JSON_SIZE} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CollateralError(f"{url}: body is not UTF-8") from exc
    members = raw_json_members(text, url)
    if member not in members or "signature" not in members:
        raise CollateralError(f"{url}: body lacks {member!r} or 'signature'")
    raw = members[member]
    if not raw.startswith("{"):
        raise CollateralError(f"{url}: {member!r} is not a JSON object")
    try:
        signature_hex = json.loads(members["signature"])
        if not isinstance(signature_hex, str):
            raise ValueError("not a string")
        signature = bytes.fromhex(signature_hex)
    except ValueError as exc:
        raise CollateralError(f"{url}: signature is not a hex string: {exc}") from exc
    if len(signature) != 64:
        raise CollateralError(f"{url}: signature is {len(signature)} bytes, expected 64 (r || s)")
    return raw, signature


_WS = re.compile(r"[ \t\n\r]*")


def raw_json_members(text: str, what: str = "JSON") -> dict[str, str]:
    """Top-level members of a JSON object as their *raw source text*.

    `json.loads` would give values, but Intel signs the exact bytes of `tcbInfo` and
    `enclaveIdentity`; this walks the top-level object and slices each value out.
    """
    decoder = json.JSONDecoder()
    members: dict[str, str] = {}
    try:
        i = _WS.match(text, 0).end()  # type: ignore[union-attr]
        if text[i : i + 1] != "{":
            raise ValueError("not a JSON object")
        i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
        if text[i : i + 1] == "}":
            i += 1
        else:
            while True:
                if text[i : i + 1] != '"':
                    raise ValueError(f"expected a member name at {i}")
                key, i = json.decoder.scanstring(text, i + 1)  # type: ignore[attr-defined]
                i = _WS.match(text, i).end()  # type: ignore[union-attr]
                if text[i : i + 1] != ":":
                    raise ValueError(f"expected ':' at {i}")
                i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
                _, end = decoder.raw_decode(text, i)
                if key in members:
                    raise ValueError(f"duplicate member {key!r}")
                members[key] = text[i:end]
                i = _WS.match(text, end).end()  # type: ignore[union-attr]
                sep = text[i : i + 1]
                if sep == ",":
                    i = _WS.match(text, i + 1).end()  # type: ignore[union-attr]
                    continue
                if sep == "}":
                    i += 1
                    break
                raise ValueError(f"expected ',' or '}}' at {i}")
        if _WS.match(text, i).end() != len(text):  # type: ignore[union-attr]
            raise ValueError("trailing data after the JSON object")
    except (ValueError, RecursionError) as exc:
        raise CollateralError(f"{what}: malformed JSON: {exc}") from exc
    return members


def _json_object(raw: str, url: str) -> dict[str, object]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CollateralError(f"{url}: malformed JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise CollateralError(f"{url}: not a JSON object")
    return doc


def _expect(doc: Mapping[str, object], key: str, expected: str, url: str) -> None:
    if doc.get(key) != expected:
        raise CollateralError(f"{url}: {key} is {doc.get(key)!r}, expected {expected!r}")


def _iso_time(doc: Mapping[str, object], key: str, url: str) -> int:
    value = doc.get(key)
    if not isinstance(value, str):
        raise CollateralError(f"{url}: {key} missing")
    try:
        when = datetime.fromisoformat(value)
    except ValueError as exc:
        raise CollateralError(f"{url}: {key} {value!r} is not an ISO-8601 time") from exc
    if when.tzinfo is None:
        raise CollateralError(f"{url}: {key} {value!r} has no time zone")
    return int(when.timestamp())
