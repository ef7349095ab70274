"""`CocoAgentPlatform`: TDX and SEV-SNP evidence from the Confidential Containers
Attestation Agent (AA), for a server inside a Kata confidential pod.

Why: a Kata container gets a fresh ``/sys`` without configfs, so configfs-tsm
(tee/configfs_tsm.py) is out of reach inside a Confidential Containers pod. The pod VM's
guest components offer evidence to workloads instead, over the same loopback REST API
as the Confidential Data Hub (store/key_release.py). ``serve --platform coco-tdx`` or
``--platform coco-snp`` takes its evidence there and hands clients exactly what the
configfs-tsm provider hands them ("intel-tdx": the DCAP quote and collateral; "amd-snp":
the 0x4A0-byte report, chip certificates by role, AMD's CRL), so the client's
verification is the same.

Why the TEE is named, not detected: the overlay that deploys the pod is per TEE, the
two need different collateral (a PCCS for TDX, AMD's KDS for SNP) checked at start, and a
pod scheduled on the other kind of node must fail on its first evidence with a clear
message (`CocoAgentError` ``wrong_tee``) rather than attest as something unplanned.
``--platform auto`` never picks these: detection makes no network calls.

What the REST API does (confidential-containers/guest-components, read at commit
8246e5e0, not copied):

- ``api-server-rest/src/main.rs`` lines 31-35, 78-89: binds ``127.0.0.1:8006``; the
  ``/aa/*`` routes exist only with ``--features attestation`` or ``all``. The Kata agent
  starts it with the features of the kernel parameter ``agent.guest_components_rest_api``
  (kata-containers ``src/agent/src/config.rs``, ``GuestComponentsFeatures``, default
  ``resource``: CDH only), so the pod VM's command line needs ``...=all`` (CDH and AA).
- ``api-server-rest/src/router.rs`` lines 101-104 (a non-loopback peer: 403), 150-155
  (attestation feature off: 404 ``Attestation Feature Not Enabled``), 173-196:
  ``GET /aa/evidence?runtime_data=...&encoding=base64`` answers 200
  ``application/octet-stream`` with the AA's evidence bytes; 400 ``BAD REQUEST`` without
  ``runtime_data`` or with undecodable data; 500 with the error's text when the AA fails;
  256-258: 404 ``URL NOT FOUND`` for any other ``/aa`` path.
- ``api-server-rest/src/utils.rs`` lines 9-21: with ``encoding=base64`` the value is
  URL-safe base64 without padding, decoded to raw bytes; without it the value's UTF-8
  bytes are used as they are (arbitrary bytes cannot pass that way). ``encoding`` exists
  since guest-components v0.21.0 (commit 00c0851a); an older server takes the 86 base64
  characters as the data, which the attesters refuse (over 64 bytes): a 500.
- ``attestation-agent/attestation-agent/src/lib.rs`` lines 198-204: runtime data goes to
  the primary attester unchanged (not hashed); the answer is the attester's JSON value as
  text.
- ``attestation-agent/attester/src/tdx/mod.rs`` lines 38-47, 105-124: refuses more than 64
  bytes, zero-pads to 64, and takes the quote from configfs-tsm in the guest; the JSON is
  ``{"cc_eventlog": base64 | null, "quote": standard base64 of the DCAP quote}``.
- ``attestation-agent/attester/src/snp/mod.rs`` lines 23-27, 34-55: refuses more than 64
  bytes, zero-pads to 64, calls ``get_ext_report`` at VMPL 0, and serialises
  ``{"attestation_report": sev::AttestationReport, "cert_chain": [CertTableEntry] | null}``
  with serde (crate ``sev`` 6.3.1, Cargo.lock).

The SNP report arrives parsed, not as its signed bytes. virtee/sev v6.3.0 (the newest tag
of the 6.3 line in the mirror read; v7.1.0 has the same fields and serde shapes),
``src/firmware/guest/types/snp.rs``: lines 228-298 the fields, 350-453 ``from_bytes``,
456-533 ``write_bytes``; ``src/util/array.rs`` line 20 (byte arrays as JSON arrays of
numbers), ``src/certs/snp/ecdsa/mod.rs`` lines 22-26, 55-72 (signature ``r``/``s``, 72
bytes each, then 368 reserved bytes), ``src/firmware/host/types/snp.rs`` lines 50-74,
158-164 (``cert_type``: ``"VCEK"``, ``"VLEK"``, ``"ASK"``, ``"ARK"``, ``"CRL"``,
``"Empty"`` or ``{"OTHER": uuid}``; ``data``: the DER), 456-522 (``TcbVersion``: legacy
bytes ``[bootloader, tee, 0, 0, 0, 0, snp, microcode]`` with ``fmc`` null; Turin bytes
``[fmc, bootloader, tee, snp, 0, 0, 0, microcode]``), ``src/lib.rs`` lines 249-274
(generation from CPUID family: 0x19 Milan/Genoa, 0x1A Turin). `snp_report_bytes` writes
the fields back at their offsets the way ``write_bytes`` does (reserved bytes zero,
layout by report version and generation), so the bytes are the ones the firmware signed
whenever the reserved bytes were zero, as the SNP ABI requires; otherwise the client's
signature check fails, never passes wrongly. The evidence must also cover exactly the
report_data asked for, or it is refused here.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import struct
from collections.abc import Mapping
from typing import Any, Final, Literal

import httpx

from blindinfer.attestation.intel.pccs import CollateralSource
from blindinfer.attestation.intel.tdx_quote import parse_tdx_quote
from blindinfer.attestation.snp.report import parse_snp_report
from blindinfer.errors import BlindInferError, QuoteParseError, UsageError
from blindinfer.tee.configfs_tsm import (
    EVIDENCE_KINDS,
    PROVIDER_TDX,
    SNP_REPORT_SIZE,
    TDX_CWT_THRESHOLD,
    CrlSource,
    SealingKeyUnavailableError,
    VcekSource,
    snp_evidence,
)
from blindinfer.tee.loopback_url import bounded_get, check_loopback_url, printable, reason
from blindinfer.tee.platform import REPORT_DATA_SIZE, Evidence

log = logging.getLogger("blindinfer.tee.coco_agent")

Tee = Literal["tdx", "snp"]
PLATFORMS: Final[Mapping[str, Tee]] = {"coco-tdx": "tdx", "coco-snp": "snp"}
"""`--platform` values and the TEE each expects the Attestation Agent to run in."""

DEFAULT_AA_URL: Final = "http://127.0.0.1:8006"
"""api-server-rest's default bind address (guest-components api-server-rest/src/main.rs)."""
EVIDENCE_PATH: Final = "/aa/evidence"
MAX_EVIDENCE_BYTES: Final = 4 * 1024 * 1024
"""The answer is read up to this: an SNP report and chain as JSON numbers is ~30 KiB, a
TDX quote ~6 KiB in base64; the TDX event log (CCEL and AA's own log) takes the rest."""
DEFAULT_TIMEOUT_S: Final = 30.0
"""Per evidence request: a TDX quote goes through the host's quote generation service."""
MAX_CERT_ENTRIES: Final = 64
MAX_CERT_BYTES: Final = 64 * 1024

_AA_HINT: Final = (
    "give the Attestation Agent's REST API on this pod's loopback, e.g. --aa-url " + DEFAULT_AA_URL
)
_ENABLE_HINT: Final = (
    "the pod VM's kernel command line needs agent.guest_components_rest_api=all "
    "(docs/kubernetes.md)"
)


class AgentConfigError(UsageError):
    """`--aa-url` is not ``http://`` to a loopback address (tee/loopback_url.py), or
    ``coco-tdx`` lacks the PCCS its quotes' collateral comes from."""


class CocoAgentError(BlindInferError):
    """No usable evidence from the Attestation Agent. `reason` is machine-readable:
    ``aa_unreachable``, ``aa_timeout``, ``aa_broken``, ``aa_not_enabled`` (404),
    ``aa_bad_request`` (400), ``aa_failed`` (500), ``aa_unexpected_status``,
    ``evidence_too_large``, ``malformed_evidence``, ``wrong_tee``,
    ``report_data_mismatch``. The message is one line: what went wrong; what to do."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def check_aa_url(text: str) -> str:
    """``http://<loopback address>:<port>``, normalised, or `AgentConfigError`."""
    return check_loopback_url(
        text,
        service="Attestation Agent",
        why="evidence from outside the pod VM would not be this server's",
        hint=_AA_HINT,
        error=AgentConfigError,
    )


def encode_runtime_data(report_data: bytes) -> str:
    """The ``runtime_data`` query value for ``encoding=base64``: URL-safe, no padding."""
    return base64.urlsafe_b64encode(report_data).rstrip(b"=").decode("ascii")


# -- the answers ----------------------------------------------------------------------


def _malformed(what: str) -> CocoAgentError:
    return CocoAgentError(
        "malformed_evidence",
        f"the Attestation Agent's evidence is malformed: {what}; is api-server-rest what "
        "listens at --aa-url?",
    )


def _json_object(body: bytes, tee: Tee) -> dict[str, Any]:
    """The answer as a JSON object written by `tee`'s attester (`wrong_tee` if the other's)."""
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, too many digits
        raise _malformed("not JSON") from None
    if not isinstance(value, dict):
        raise _malformed("not a JSON object")
    mine, other = ("quote", "attestation_report")
    if tee == "snp":
        mine, other = other, mine
    if mine not in value and other in value:
        found, switch = ("SEV-SNP", "snp") if tee == "tdx" else ("TDX", "tdx")
        raise CocoAgentError(
            "wrong_tee",
            f"--platform coco-{tee}, but the Attestation Agent answered {found} evidence; use "
            f"--platform coco-{switch}, or run the pod on the runtime class its overlay names",
        )
    if mine not in value:
        raise _malformed(f'no "{mine}"')
    return value


def _int(value: object, what: str, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise _malformed(f"{what} is not an unsigned {bits}-bit integer")
    return value


def _byte_array(value: object, what: str, size: int) -> bytes:
    if not isinstance(value, list) or len(value) != size:
        raise _malformed(f"{what} is not an array of {size} bytes")
    return bytes(_int(item, what, 8) for item in value)


def _fields(value: object, what: str, names: tuple[str, ...]) -> dict[str, Any]:
    """A JSON object with exactly `names`: the report's layout depends on every field."""
    if not isinstance(value, dict):
        raise _malformed(f"{what} is not an object")
    if set(value) != set(names):
        extra = sorted(set(value) - set(names))[:3]
        missing = sorted(set(names) - set(value))[:3]
        raise _malformed(f"{what} has fields {extra} and lacks {missing}")
    return value


def parse_tdx_answer(body: bytes) -> bytes:
    """The DCAP quote from the TDX attester's ``{"cc_eventlog": ..., "quote": base64}``."""
    answer = _json_object(body, "tdx")
    quote = answer["quote"]
    if not isinstance(quote, str):
        raise _malformed('"quote" is not a string')
    eventlog = answer.get("cc_eventlog")
    if eventlog is not None and not isinstance(eventlog, str):
        raise _malformed('"cc_eventlog" is not a string')
    try:
        raw = base64.b64decode(quote, validate=True)
    except (binascii.Error, ValueError):
        raise _malformed('"quote" is not base64') from None
    if not raw:
        raise _malformed('"quote" is empty')
    return raw


_TCB_FIELDS: Final = ("fmc", "bootloader", "tee", "snp", "microcode")
_REPORT_FIELDS: Final = (
    "version", "guest_svn", "policy", "family_id", "image_id", "vmpl", "sig_algo",
    "current_tcb", "plat_info", "key_info", "report_data", "measurement", "host_data",
    "id_key_digest", "author_key_digest", "report_id", "report_id_ma", "reported_tcb",
    "cpuid_fam_id", "cpuid_mod_id", "cpuid_step", "chip_id", "committed_tcb", "current",
    "committed", "launch_tcb", "launch_mit_vector", "current_mit_vector", "signature",
)  # fmt: skip
_TURIN_FAMILY: Final = 0x1A
_LEGACY_FAMILY: Final = 0x19


def _tcb(value: object, what: str, *, turin: bool) -> bytes:
    tcb = _fields(value, what, _TCB_FIELDS)
    b, t, s, m = (_int(tcb[k], f"{what}.{k}", 8) for k in ("bootloader", "tee", "snp", "microcode"))
    if turin:
        if tcb["fmc"] is None:
            raise _malformed(f"{what}.fmc is null in a Turin report")
        return bytes([_int(tcb["fmc"], f"{what}.fmc", 8), b, t, s, 0, 0, 0, m])
    if tcb["fmc"] is not None:
        raise _malformed(f"{what}.fmc is set in a Milan/Genoa report")
    return bytes([b, t, 0, 0, 0, 0, s, m])


def _version(value: object, what: str) -> bytes:
    version = _fields(value, what, ("major", "minor", "build"))
    return bytes(_int(version[k], f"{what}.{k}", 8) for k in ("build", "minor", "major"))


def _optional(value: object, what: str, bits: int, *, present: bool) -> int:
    """A field that exists from some report version on: an integer then, null before."""
    if not present:
        if value is not None:
            raise _malformed(f"{what} is set in a report version without it")
        return 0
    if value is None:
        raise _malformed(f"{what} is null in a report version that has it")
    return _int(value, what, bits)


def snp_report_bytes(value: object) -> bytes:
    """The 0x4A0-byte ATTESTATION_REPORT from sev's serde form of `AttestationReport`.

    Field by field at the SNP ABI's offsets, as sev's ``write_bytes`` lays them out:
    report versions 2, 3-4 and 5+ differ in the CPUID bytes and mitigation vectors; the
    TCB layout follows the generation (chip ID for version 2, CPUID family after).
    """
    r = _fields(value, "attestation_report", _REPORT_FIELDS)
    version = _int(r["version"], "version", 32)
    if version < 2:
        raise _malformed(f"report version {version} (the SNP ABI starts at 2)")
    has_cpuid, has_mit = version >= 3, version >= 5
    chip_id = _byte_array(r["chip_id"], "chip_id", 64)
    family = _optional(r["cpuid_fam_id"], "cpuid_fam_id", 8, present=has_cpuid)
    model = _optional(r["cpuid_mod_id"], "cpuid_mod_id", 8, present=has_cpuid)
    step = _optional(r["cpuid_step"], "cpuid_step", 8, present=has_cpuid)
    if has_cpuid:
        if family not in (_LEGACY_FAMILY, _TURIN_FAMILY):
            raise _malformed(f"CPUID family {family:#x} is not an SEV-SNP processor")
        turin = family == _TURIN_FAMILY
    else:
        if chip_id == bytes(64):
            raise _malformed("a version 2 report with a masked chip ID")
        turin = chip_id[8:] == bytes(56)
    signature = _fields(r["signature"], "signature", ("r", "s"))
    out = bytearray(SNP_REPORT_SIZE)

    def put(offset: int, data: bytes) -> None:
        out[offset : offset + len(data)] = data

    put(0x000, struct.pack("<II", version, _int(r["guest_svn"], "guest_svn", 32)))
    put(0x008, struct.pack("<Q", _int(r["policy"], "policy", 64)))
    put(0x010, _byte_array(r["family_id"], "family_id", 16))
    put(0x020, _byte_array(r["image_id"], "image_id", 16))
    put(0x030, struct.pack("<II", _int(r["vmpl"], "vmpl", 32), _int(r["sig_algo"], "sig_algo", 32)))
    put(0x038, _tcb(r["current_tcb"], "current_tcb", turin=turin))
    put(0x040, struct.pack("<Q", _int(r["plat_info"], "plat_info", 64)))
    put(0x048, struct.pack("<I", _int(r["key_info"], "key_info", 32)))
    put(0x050, _byte_array(r["report_data"], "report_data", 64))
    put(0x090, _byte_array(r["measurement"], "measurement", 48))
    put(0x0C0, _byte_array(r["host_data"], "host_data", 32))
    put(0x0E0, _byte_array(r["id_key_digest"], "id_key_digest", 48))
    put(0x110, _byte_array(r["author_key_digest"], "author_key_digest", 48))
    put(0x140, _byte_array(r["report_id"], "report_id", 32))
    put(0x160, _byte_array(r["report_id_ma"], "report_id_ma", 32))
    put(0x180, _tcb(r["reported_tcb"], "reported_tcb", turin=turin))
    if has_cpuid:
        put(0x188, bytes([family, model, step]))
    put(0x1A0, chip_id)
    put(0x1E0, _tcb(r["committed_tcb"], "committed_tcb", turin=turin))
    put(0x1E8, _version(r["current"], "current"))
    put(0x1EC, _version(r["committed"], "committed"))
    put(0x1F0, _tcb(r["launch_tcb"], "launch_tcb", turin=turin))
    launch_mit = _optional(r["launch_mit_vector"], "launch_mit_vector", 64, present=has_mit)
    current_mit = _optional(r["current_mit_vector"], "current_mit_vector", 64, present=has_mit)
    if has_mit:
        put(0x1F8, struct.pack("<QQ", launch_mit, current_mit))
    put(0x2A0, _byte_array(signature["r"], "signature.r", 72))
    put(0x2E8, _byte_array(signature["s"], "signature.s", 72))
    return bytes(out)


_CERT_ROLES: Final = {"VCEK": "vcek", "VLEK": "vlek", "ASK": "ask", "ARK": "ark"}
_CERT_IGNORED: Final = ("CRL", "Empty")


def _cert_chain(value: object) -> dict[str, bytes]:
    """Chip certificates by role from sev's ``[CertTableEntry]`` (null: the host gave none).

    CRL and vendor (``OTHER``) entries are skipped, as configfs_tsm.parse_cert_table skips
    unknown GUIDs; the CRL clients check comes from AMD's KDS (`--kds-url`)."""
    if value is None:
        return {}
    if not isinstance(value, list) or len(value) > MAX_CERT_ENTRIES:
        raise _malformed(f"cert_chain is not a list of up to {MAX_CERT_ENTRIES} entries")
    certs: dict[str, bytes] = {}
    for entry in value:
        fields = _fields(entry, "a cert_chain entry", ("cert_type", "data"))
        cert_type, data = fields["cert_type"], fields["data"]
        if isinstance(cert_type, dict) and set(cert_type) == {"OTHER"}:
            continue
        if cert_type in _CERT_IGNORED:
            continue
        role = _CERT_ROLES.get(cert_type) if isinstance(cert_type, str) else None
        if role is None:
            raise _malformed(f"unknown cert_type {str(cert_type)[:40]!r}")
        if not isinstance(data, list) or not 0 < len(data) <= MAX_CERT_BYTES:
            raise _malformed(f"the {cert_type} is not 1 to {MAX_CERT_BYTES} bytes")
        if role in certs:
            raise _malformed(f"cert_chain lists the {cert_type} twice")
        certs[role] = _byte_array(data, f"the {cert_type}", len(data))
    return certs


def parse_snp_answer(body: bytes) -> tuple[bytes, dict[str, bytes]]:
    """The report's signed bytes and the chip certificates by role, from the SNP
    attester's ``{"attestation_report": ..., "cert_chain": ...}``."""
    answer = _json_object(body, "snp")
    report = snp_report_bytes(answer["attestation_report"])
    try:
        parse_snp_report(report)
    except QuoteParseError as exc:
        raise _malformed(f"the rebuilt report does not parse ({exc})") from None
    return report, _cert_chain(answer.get("cert_chain"))


# -- the platform ---------------------------------------------------------------------


class CocoAgentPlatform:
    """The `Platform` of a Confidential Containers pod on TDX or SEV-SNP, through the
    Attestation Agent's REST API."""

    def __init__(
        self,
        tee: Tee,
        *,
        aa_url: str = DEFAULT_AA_URL,
        collateral: CollateralSource | None = None,
        vcek_source: VcekSource | None = None,
        crl_source: CrlSource | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        if tee not in ("tdx", "snp"):
            raise ValueError(f"tee must be 'tdx' or 'snp', not {tee!r}")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if tee == "tdx" and collateral is None:
            raise AgentConfigError(
                "TDX quotes need DCAP collateral: configure a PCCS URL (e.g. --pccs-url)"
            )
        self._tee: Tee = tee
        self._base = check_aa_url(aa_url)
        self._collateral = collateral
        self._vcek_source = vcek_source
        self._crl_source = crl_source
        self._timeout_s = timeout_s

    @property
    def kind(self) -> str:
        """ "tdx" or "snp": the TEE (the wire's informative `platform`, as configfs-tsm's)."""
        return self._tee

    @property
    def aa_url(self) -> str:
        return self._base

    def evidence(self, report_data: bytes) -> Evidence:
        """Evidence from the Attestation Agent over exactly `report_data` (64 bytes)."""
        if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes")
        body = self._get(report_data)
        if self._tee == "tdx":
            return self._tdx_evidence(parse_tdx_answer(body), report_data)
        report, certs = parse_snp_answer(body)
        _check_report_data(report[0x050:0x090], report_data)
        return snp_evidence(
            report,
            certs,
            vcek_source=self._vcek_source,
            crl_source=self._crl_source,
            where="the Attestation Agent's cert_chain",
        )

    def sealing_key(self) -> bytes:
        """None: the store key comes from a key broker (`--store-key-resource`)."""
        if self._tee == "tdx":
            raise SealingKeyUnavailableError(
                "TDX has no hardware sealing key; take the store key from a key broker: "
                "configure --store-key-resource kbs:///REPO/TYPE/TAG (Trustee's KBS through "
                "the Confidential Data Hub)"
            )
        raise SealingKeyUnavailableError(
            "SEV-SNP sealing keys come from /dev/sev-guest (SNP_GET_DERIVED_KEY), which the "
            "Attestation Agent's REST API does not expose; take the store key from a key "
            "broker: configure --store-key-resource kbs:///REPO/TYPE/TAG (Trustee's KBS "
            "through the Confidential Data Hub)"
        )

    # -- internals --------------------------------------------------------------------

    def _tdx_evidence(self, quote: bytes, report_data: bytes) -> Evidence:
        if len(quote) > TDX_CWT_THRESHOLD:
            raise _malformed(
                f"the TDX quote is {len(quote)} bytes (> 8 KiB): a DICE/CWT-format quote, "
                "which blindinfer cannot verify"
            )
        try:
            parsed = parse_tdx_quote(quote)
        except QuoteParseError as exc:
            raise _malformed(f"the quote does not parse ({exc})") from None
        _check_report_data(parsed.body.report_data, report_data)
        assert self._collateral is not None  # checked in __init__
        return Evidence(
            kind=EVIDENCE_KINDS[PROVIDER_TDX],
            quote=quote,
            collateral_json=self._collateral.collateral_json(quote),
        )

    def _get(self, report_data: bytes) -> bytes:
        """The answer's body for a 200; `CocoAgentError` otherwise. Bounded in size and
        time; no proxy from the environment, no redirects, no content encoding."""
        where = f"the Attestation Agent at {self._base}"
        try:
            answer = bounded_get(
                self._base + EVIDENCE_PATH,
                limit=MAX_EVIDENCE_BYTES,
                timeout_s=self._timeout_s,
                params={"runtime_data": encode_runtime_data(report_data), "encoding": "base64"},
            )
            status, encoding, body = answer.status, answer.content_encoding, answer.body
        except httpx.TimeoutException:
            raise CocoAgentError(
                "aa_timeout",
                f"{where} did not answer within {self._timeout_s:g} s; check that the "
                "attestation agent runs in this pod VM",
            ) from None
        except httpx.ConnectError as exc:
            raise CocoAgentError(
                "aa_unreachable",
                f"cannot reach {where}: {reason(exc)}; is api-server-rest running in this "
                f"pod (default {DEFAULT_AA_URL})? else set --aa-url",
            ) from None
        except httpx.HTTPError as exc:
            raise CocoAgentError(
                "aa_broken",
                f"the connection to {where} broke: {reason(exc)}; is api-server-rest what "
                "listens at --aa-url?",
            ) from None
        said = printable(bytes(body[:4096]))
        if status == 200:
            if encoding != "identity":
                raise CocoAgentError(
                    "aa_unexpected_status",
                    f"{where} sent evidence with content encoding {encoding[:40]!r}; is "
                    "api-server-rest what listens at --aa-url?",
                )
            if len(body) > MAX_EVIDENCE_BYTES:
                raise CocoAgentError(
                    "evidence_too_large",
                    f"{where} answered more than {MAX_EVIDENCE_BYTES} bytes of evidence; is "
                    "api-server-rest what listens at --aa-url?",
                )
            return bytes(body)
        if status == 404:
            raise CocoAgentError(
                "aa_not_enabled",
                f"{where} serves no evidence (HTTP 404: {said}); {_ENABLE_HINT}",
            )
        if status == 400:
            raise CocoAgentError(
                "aa_bad_request",
                f"{where} refused the request (HTTP 400: {said}); api-server-rest older "
                "than guest-components v0.21.0 lacks encoding=base64",
            )
        if status == 500:
            raise CocoAgentError(
                "aa_failed",
                f"the Attestation Agent could not produce evidence (HTTP 500: {said}); check "
                "its log, and that api-server-rest is v0.21.0 or newer (encoding=base64)",
            )
        raise CocoAgentError(
            "aa_unexpected_status",
            f"{where} answered HTTP {status} ({said}); is api-server-rest what listens at "
            "--aa-url?",
        )


def _check_report_data(found: bytes, asked: bytes) -> None:
    """The evidence must cover what was asked: it binds this server's TLS key and the
    client's nonce, and the client would refuse anything else less clearly."""
    if found != asked:
        raise CocoAgentError(
            "report_data_mismatch",
            "the Attestation Agent returned evidence over other report_data than asked "
            f"(starts {found[:8].hex()}, asked {asked[:8].hex()}); refusing it: is "
            "api-server-rest v0.21.0 or newer (encoding=base64)?",
        )
