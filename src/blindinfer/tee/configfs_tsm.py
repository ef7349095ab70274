"""`ConfigfsTsmPlatform`: TDX and SEV-SNP evidence through Linux configfs-tsm.

Linux (>= 6.7) offers one ABI for confidential-VM attestation reports, whatever the
hardware (Documentation/ABI/testing/configfs-tsm-report):

    mkdir /sys/kernel/config/tsm/report/$name      the kernel creates the attributes
    $name/generation   (RO) incremented by every write to inblob or an option
    $name/privlevel    (WO, optional) SEV-SNP VMPL, between privlevel_floor and 3
    $name/inblob       (WO) up to 64 bytes, our report_data
    $name/provider     (RO) "tdx_guest" (outblob = TDX DCAP quote) or "sev_guest"
                             (outblob = SNP attestation report)
    $name/outblob      (RO) reading it generates the report over inblob
    $name/auxblob      (RO) sev_guest: the GHCB cert_table (VCEK/VLEK, ASK, ARK)
    rmdir $name

Why an entry per request: the ABI's generation counter detects a concurrent writer but
cannot prevent one; a private, randomly named entry per request prevents it, and the
generation check (before our writes, after our reads) still catches anything else
touching the entry. A mismatch is retried with a new entry, a bounded number of times.

Why the filesystem calls go through `TsmFs`: real configfs creates the attributes on
mkdir and bumps `generation` on writes; tests replace `TsmFs` with a folder that behaves
the same way and serves captured hardware evidence.

The SNP certificate table (auxblob) is the GHCB spec v2 section 4.1.8.1 format: entries
of (GUID[16], offset u32 LE, length u32 LE), offsets relative to the table start, ended
by an all-zero entry. GUIDs are stored in RFC 4122 byte order (as AMD's tools and
go-sev-guest write them).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import struct
import threading
import types
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.utils import CryptographyDeprecationWarning

from blindinfer.attestation.intel.pccs import (
    CollateralSource,
    Fetch,
    HttpResponse,
    httpx_fetch,
    require_https,
)
from blindinfer.errors import BlindInferError, QuoteParseError
from blindinfer.tee.platform import REPORT_DATA_SIZE, Evidence

log = logging.getLogger("blindinfer.tee.configfs_tsm")

DEFAULT_ROOT: Final = Path("/sys/kernel/config/tsm/report")
PROVIDER_TDX: Final = "tdx_guest"
PROVIDER_SNP: Final = "sev_guest"
PLATFORM_KINDS: Final = {PROVIDER_TDX: "tdx", PROVIDER_SNP: "snp"}
EVIDENCE_KINDS: Final = {PROVIDER_TDX: "intel-tdx", PROVIDER_SNP: "amd-snp"}

TSM_PRIVLEVEL_MAX: Final = 3
MAX_BLOB_SIZE: Final = 1024 * 1024
"""Bound on outblob/auxblob reads (kernel maximum is 32 KiB today, 16 MiB in theory)."""
TDX_CWT_THRESHOLD: Final = 8 * 1024
"""The ABI doc: a TDX quote larger than 8 KiB is a DICE-based CWT, not a DCAP quote."""
SNP_REPORT_SIZE: Final = 0x4A0
DEFAULT_ATTEMPTS: Final = 3
CRL_REFRESH_MARGIN: Final = timedelta(days=1)
"""An AMD CRL is fetched again once less than this is left before its nextUpdate."""

# GHCB spec v2, section 4.1.8.1: certificate table GUIDs.
CERT_GUIDS: Final = types.MappingProxyType(
    {
        uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
        uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
        uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
        uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
    }
)
CERT_ROLES: Final = ("vcek", "vlek", "ask", "ark")
"""Role names as `Evidence.certificates` and the wire format spell them, in chain order."""
CERT_TABLE_ENTRY: Final = struct.Struct("<16sII")
MAX_CERT_TABLE_ENTRIES: Final = 64

# SEV-SNP ATTESTATION_REPORT offsets (SNP firmware ABI spec, table "ATTESTATION_REPORT").
_SNP_VERSION = 0x000
_SNP_FLAGS = 0x048
_SNP_REPORTED_TCB = 0x180
_SNP_CPUID_FAM = 0x188
_SNP_CPUID_MOD = 0x189
_SNP_CHIP_ID = 0x1A0
_SNP_SIGNING_KEY_VCEK = 0
_SNP_SIGNING_KEY_VLEK = 1


class TsmError(BlindInferError):
    """configfs-tsm is missing, refused a request, or answered something unusable."""


class SealingKeyUnavailableError(TsmError):
    """This TEE offers no sealing key through the interfaces blindinfer uses (yet)."""


# -- the filesystem, injectable ---------------------------------------------------------


class TsmFs(Protocol):
    """The filesystem calls the provider makes, so tests can emulate configfs."""

    def make_entry(self, root: Path, name: str) -> Path:
        """Create report entry `name` under `root`; configfs creates its attributes."""
        ...

    def remove_entry(self, entry: Path) -> None: ...

    def read(self, path: Path, limit: int) -> bytes:
        """Whole content of an attribute, refusing more than `limit` bytes."""
        ...

    def write(self, path: Path, data: bytes) -> None:
        """Write `data` in one write(2): configfs attributes take a value per write."""
        ...

    def exists(self, path: Path) -> bool: ...


class OsTsmFs:
    """The real thing: plain syscalls on /sys/kernel/config."""

    def make_entry(self, root: Path, name: str) -> Path:
        entry = root / name
        os.mkdir(entry, 0o700)
        return entry

    def remove_entry(self, entry: Path) -> None:
        os.rmdir(entry)

    def read(self, path: Path, limit: int) -> bytes:
        with path.open("rb") as f:  # buffered: read(n) loops over short reads until EOF
            data = f.read(limit + 1)
        if len(data) > limit:
            raise TsmError(f"{path} is larger than {limit} bytes")
        return data

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):
            raise TsmError(f"short write to {path}: {written} of {len(data)} bytes")

    def exists(self, path: Path) -> bool:
        return path.exists()


# -- SNP certificates -----------------------------------------------------------------


def parse_cert_table(blob: bytes) -> dict[str, bytes]:
    """The known certificates ("vcek", "vlek", "ask", "ark") of a GHCB cert_table.

    Every entry is bounds-checked against the blob; a malformed table is a
    `QuoteParseError`. Unknown GUIDs are skipped (the spec allows vendor entries). An
    empty blob, or one starting with the terminator, holds no certificates.
    """
    if not isinstance(blob, bytes | bytearray | memoryview):
        raise QuoteParseError("certificate table must be bytes")
    data = bytes(blob)
    if not data:
        return {}
    entries: list[tuple[uuid.UUID, int, int]] = []
    pos = 0
    while True:
        if len(entries) > MAX_CERT_TABLE_ENTRIES:
            raise QuoteParseError(f"certificate table has over {MAX_CERT_TABLE_ENTRIES} entries")
        if pos + CERT_TABLE_ENTRY.size > len(data):
            raise QuoteParseError("certificate table is not terminated by an all-zero entry")
        raw_guid, offset, length = CERT_TABLE_ENTRY.unpack_from(data, pos)
        pos += CERT_TABLE_ENTRY.size
        if offset == 0 and length == 0 and raw_guid == bytes(16):
            break
        entries.append((uuid.UUID(bytes=raw_guid), offset, length))
    header_end = pos
    certs: dict[str, bytes] = {}
    for guid, offset, length in entries:
        if offset < header_end:
            raise QuoteParseError(f"certificate {guid} starts inside the table header")
        if length == 0 or offset + length > len(data):
            raise QuoteParseError(
                f"certificate {guid} (offset {offset}, length {length}) lies outside the "
                f"{len(data)}-byte table"
            )
        name = CERT_GUIDS.get(guid)
        if name is None:
            continue
        if name in certs:
            raise QuoteParseError(f"certificate table lists the {name.upper()} twice")
        certs[name] = data[offset : offset + length]
    return certs


class CrlSource(Protocol):
    """Supplies AMD's CRL (DER) for an SNP report's product and chip key kind."""

    def crl_for(self, report: bytes) -> bytes:
        """The ARK-signed CRL covering the ASK (VCEK reports) or ASVK (VLEK reports)."""
        ...


class VcekSource(Protocol):
    """Supplies the chip certificate (and possibly ASK/ARK) for an SNP report."""

    def certificates_for(self, report: bytes) -> Mapping[str, bytes]:
        """At least {"vcek": DER}; may add "ask" and "ark"."""
        ...


_TURIN_FAMILY = 0x1A


def snp_product(report: bytes) -> str | None:
    """KDS product name from the CPUID fields of a v3+ report, None if not derivable."""
    if len(report) < SNP_REPORT_SIZE or struct.unpack_from("<I", report, _SNP_VERSION)[0] < 3:
        return None
    family, model = report[_SNP_CPUID_FAM], report[_SNP_CPUID_MOD]
    if family == 0x19 and model >> 4 == 0x0:
        return "Milan"
    if family == 0x19 and model >> 4 in (0x1, 0xA):
        return "Genoa"
    if family == _TURIN_FAMILY and model <= 0x1F:
        return "Turin"
    return None


class KdsVcekSource:
    """Fetches the VCEK (and ASK/ARK chain) for a report from AMD's Key Distribution Service.

    The VCEK depends on the chip and on the reported TCB, both taken from the report;
    the product ("Milan", "Genoa", "Turin") from the report's CPUID fields (v3+) or from
    `product`. Results are cached: a VCEK for a given chip and TCB never changes.
    """

    def __init__(
        self,
        base_url: str,
        *,
        product: str | None = None,
        fetch: Fetch = httpx_fetch,
        allow_insecure_http: bool = False,
    ) -> None:
        require_https(base_url, "the KDS URL", allow_insecure_http=allow_insecure_http)
        self._base = base_url.rstrip("/")
        self._product = product
        self._fetch = fetch
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[bytes, ...]] = {}
        self._crls: dict[str, tuple[bytes, datetime]] = {}

    def _product_of(self, report: bytes) -> str:
        if len(report) < SNP_REPORT_SIZE:
            raise TsmError(f"SNP report is {len(report)} bytes, expected {SNP_REPORT_SIZE}")
        product = snp_product(report) or self._product
        if product is None:
            raise TsmError(
                "cannot tell the AMD product (Milan/Genoa/Turin) from this report (version < 3 "
                "or unknown CPUID); configure it for the KDS VCEK source"
            )
        return product

    def crl_url(self, report: bytes) -> str:
        """KDS's CRL for the report's product and key kind (the VLEK CRL for VLEK reports)."""
        product = self._product_of(report)
        flags = struct.unpack_from("<I", report, _SNP_FLAGS)[0]
        kind = "vlek" if (flags >> 2) & 0x7 == _SNP_SIGNING_KEY_VLEK else "vcek"
        return f"{self._base}/{kind}/v1/{product}/crl"

    def crl_for(self, report: bytes) -> bytes:
        """AMD's CRL (DER) for `report`, cached, refreshed within a day of its nextUpdate.

        Why cached like Intel collateral: every attestation carries it, and KDS rate-limits.
        If a refresh fails while the cached CRL is still current, the cached one is served
        (the client checks its validity window itself); otherwise `TsmError`.
        """
        url = self.crl_url(report)
        now = datetime.now(UTC)
        with self._lock:
            hit = self._crls.get(url)
        if hit is not None and now < hit[1] - CRL_REFRESH_MARGIN:
            return hit[0]
        try:
            der, next_update = self._get_crl(url)
        except TsmError as exc:
            if hit is not None and now < hit[1]:
                log.warning("AMD CRL refresh failed (%s); serving the cached one", exc)
                return hit[0]
            raise
        with self._lock:
            self._crls[url] = (der, next_update)
        return der

    def _get_crl(self, url: str) -> tuple[bytes, datetime]:
        body = self._response(url).body
        try:
            crl = x509.load_der_x509_crl(body)
        except ValueError as exc:
            raise TsmError(f"{url} did not return a DER CRL: {exc}") from exc
        if crl.next_update_utc is None:
            raise TsmError(f"{url} returned a CRL without nextUpdate")
        return body, crl.next_update_utc

    def vcek_url(self, report: bytes) -> str:
        """The KDS URL of the VCEK matching `report`'s chip ID and reported TCB."""
        product = self._product_of(report)
        flags = struct.unpack_from("<I", report, _SNP_FLAGS)[0]
        if (flags >> 2) & 0x7 == _SNP_SIGNING_KEY_VLEK:
            raise TsmError(
                "the report is signed with a VLEK, which AMD KDS does not serve by chip ID; the "
                "host must supply it in the certificate table"
            )
        chip_id = report[_SNP_CHIP_ID : _SNP_CHIP_ID + 64]
        if chip_id == bytes(64):
            raise TsmError("the report's chip ID is masked (MASK_CHIP_ID); KDS needs it")
        tcb = report[_SNP_REPORTED_TCB : _SNP_REPORTED_TCB + 8]
        if product == "Turin":
            fmc, bl, tee, snp, ucode = tcb[0], tcb[1], tcb[2], tcb[3], tcb[7]
            return (
                f"{self._base}/vcek/v1/{product}/{chip_id[:8].hex()}?fmcSPL={fmc:02d}"
                f"&blSPL={bl:02d}&teeSPL={tee:02d}&snpSPL={snp:02d}&ucodeSPL={ucode:02d}"
            )
        bl, tee, snp, ucode = tcb[0], tcb[1], tcb[6], tcb[7]
        return (
            f"{self._base}/vcek/v1/{product}/{chip_id.hex()}?blSPL={bl:02d}&teeSPL={tee:02d}"
            f"&snpSPL={snp:02d}&ucodeSPL={ucode:02d}"
        )

    def certificates_for(self, report: bytes) -> Mapping[str, bytes]:
        url = self.vcek_url(report)
        product = url.split("/vcek/v1/", 1)[1].split("/", 1)[0]
        (vcek,) = self._cached(url, self._get_der)
        ask, ark = self._cached(f"{self._base}/vcek/v1/{product}/cert_chain", self._get_chain)
        return {"vcek": vcek, "ask": ask, "ark": ark}

    def _cached(self, url: str, get: Callable[[str], tuple[bytes, ...]]) -> tuple[bytes, ...]:
        with self._lock:
            hit = self._cache.get(url)
        if hit is not None:
            return hit
        value = get(url)
        with self._lock:
            if len(self._cache) >= 64:
                self._cache.clear()
            self._cache[url] = value
        return value

    def _response(self, url: str) -> HttpResponse:
        try:
            response = self._fetch(url)
        except BlindInferError:
            raise
        except Exception as exc:
            raise TsmError(f"GET {url} failed: {exc}") from exc
        if response.status != 200:
            raise TsmError(f"GET {url}: HTTP {response.status}")
        return response

    def _get_der(self, url: str) -> tuple[bytes]:
        body = self._response(url).body
        try:
            with warnings.catch_warnings():
                # AMD chip certificates carry serial number 0, which cryptography warns about.
                warnings.filterwarnings(
                    "ignore", message=".*serial number", category=CryptographyDeprecationWarning
                )
                x509.load_der_x509_certificate(body)
        except ValueError as exc:
            raise TsmError(f"{url} did not return a DER certificate: {exc}") from exc
        return (body,)

    def _get_chain(self, url: str) -> tuple[bytes, bytes]:
        """ASK and ARK (DER) from KDS's PEM cert_chain, which lists the ASK first."""
        try:
            certs = x509.load_pem_x509_certificates(self._response(url).body)
        except ValueError as exc:
            raise TsmError(f"{url} did not return a PEM chain: {exc}") from exc
        if len(certs) != 2:
            raise TsmError(f"{url} returned {len(certs)} certificates, expected ASK and ARK")
        return certs[0].public_bytes(Encoding.DER), certs[1].public_bytes(Encoding.DER)


def snp_evidence(
    report: bytes,
    certs: Mapping[str, bytes],
    *,
    vcek_source: VcekSource | None,
    crl_source: CrlSource | None,
    where: str,
) -> Evidence:
    """ "amd-snp" `Evidence`: the report, its chip certificates by role, AMD's CRL.

    Shared by every way of obtaining SNP evidence (configfs-tsm, the CoCo Attestation
    Agent) so that clients receive one shape. `certs` are what the host supplied (`where`
    names it in messages); a missing VCEK comes from `vcek_source` (KDS) if configured.
    """
    if len(report) != SNP_REPORT_SIZE:
        raise TsmError(f"SNP report is {len(report)} bytes, expected {SNP_REPORT_SIZE}")
    signing_key = (struct.unpack_from("<I", report, _SNP_FLAGS)[0] >> 2) & 0x7
    chip_cert = "vlek" if signing_key == _SNP_SIGNING_KEY_VLEK else "vcek"
    if chip_cert not in certs:
        if chip_cert == "vcek" and vcek_source is not None:
            certs = {**vcek_source.certificates_for(report), **certs}
        else:
            hint = (
                "configure an AMD KDS URL (e.g. --kds-url https://kdsintf.amd.com)"
                if chip_cert == "vcek"
                else "the host must provision the VLEK (VLEK certificates are not on KDS)"
            )
            raise TsmError(
                f"the report is signed with the {chip_cert.upper()} but the host put no "
                f"{chip_cert.upper()} in {where}; {hint}"
            )
    return Evidence(
        kind=EVIDENCE_KINDS[PROVIDER_SNP],
        quote=report,
        collateral_json="",
        certificates=tuple((role, certs[role]) for role in CERT_ROLES if role in certs),
        crl=_snp_crl(report, crl_source),
    )


def _snp_crl(report: bytes, crl_source: CrlSource | None) -> bytes:
    """AMD's CRL for the report, or b"" (the client then refuses by default)."""
    if crl_source is None:
        return b""
    try:
        return crl_source.crl_for(report)
    except TsmError as exc:
        log.warning(
            "no AMD CRL for this SNP evidence (%s): clients refuse it unless their policy "
            "sets [snp] allow_missing_crl",
            exc,
        )
        return b""


# -- the platform ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Report:
    provider: str
    outblob: bytes
    auxblob: bytes


class ConfigfsTsmPlatform:
    """The `Platform` of a TDX or SEV-SNP confidential VM, through configfs-tsm."""

    def __init__(
        self,
        root: Path = DEFAULT_ROOT,
        *,
        collateral: CollateralSource | None,
        vcek_source: VcekSource | None = None,
        crl_source: CrlSource | None = None,
        privlevel: int | None = None,
        provider: str | None = None,
        fs: TsmFs | None = None,
        attempts: int = DEFAULT_ATTEMPTS,
    ) -> None:
        if privlevel is not None and not 0 <= privlevel <= TSM_PRIVLEVEL_MAX:
            raise ValueError(f"privlevel must be between 0 and {TSM_PRIVLEVEL_MAX}")
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        self._root = Path(root)
        self._collateral = collateral
        self._vcek_source = vcek_source
        self._crl_source = crl_source
        self._privlevel = privlevel
        self._fs: TsmFs = fs if fs is not None else OsTsmFs()
        self._attempts = attempts
        found = provider if provider is not None else probe_provider(self._root, fs=self._fs)
        if found not in PLATFORM_KINDS:
            raise TsmError(
                f"configfs-tsm provider {found!r} is not supported (expected {PROVIDER_TDX!r} "
                f"or {PROVIDER_SNP!r})"
            )
        if found == PROVIDER_TDX and collateral is None:
            raise TsmError(
                "TDX quotes need DCAP collateral: configure a PCCS URL (e.g. --pccs-url)"
            )
        self._provider = found

    @property
    def kind(self) -> str:
        return PLATFORM_KINDS[self._provider]

    @property
    def provider(self) -> str:
        return self._provider

    def evidence(self, report_data: bytes) -> Evidence:
        """A fresh TDX quote / SNP report over exactly `report_data` (64 bytes)."""
        if not isinstance(report_data, bytes) or len(report_data) != REPORT_DATA_SIZE:
            raise ValueError(f"report_data must be exactly {REPORT_DATA_SIZE} bytes")
        report = self._generate(report_data)
        if report.provider != self._provider:
            raise TsmError(
                f"configfs-tsm provider changed from {self._provider!r} to {report.provider!r}"
            )
        if not report.outblob:
            raise TsmError("configfs-tsm returned an empty outblob")
        if self._provider == PROVIDER_TDX:
            return self._tdx_evidence(report.outblob)
        return self._snp_evidence(report.outblob, report.auxblob)

    def sealing_key(self) -> bytes:
        """None here: neither TDX nor SNP offers one through configfs-tsm.

        TDX has no sealing key at all: a persistent store takes its key from a key broker
        after attestation (`--store-key-resource`, store/key_release.py). SNP derives keys
        via the SNP_GET_DERIVED_KEY ioctl of /dev/sev-guest, which configfs-tsm does not
        expose; the same key broker serves it.
        """
        if self._provider == PROVIDER_TDX:
            raise SealingKeyUnavailableError(
                "TDX has no hardware sealing key; take the store key from a key broker: "
                "configure --store-key-resource kbs:///REPO/TYPE/TAG (Trustee's KBS through "
                "the Confidential Data Hub)"
            )
        raise SealingKeyUnavailableError(
            "SEV-SNP sealing keys come from /dev/sev-guest (SNP_GET_DERIVED_KEY), which "
            "configfs-tsm does not expose; take the store key from a key broker: configure "
            "--store-key-resource kbs:///REPO/TYPE/TAG (Trustee's KBS through the Confidential "
            "Data Hub)"
        )

    # -- internals --------------------------------------------------------------------

    def _tdx_evidence(self, quote: bytes) -> Evidence:
        if len(quote) > TDX_CWT_THRESHOLD:
            raise TsmError(
                f"the TDX quote is {len(quote)} bytes (> 8 KiB): a DICE/CWT-format quote, "
                "which blindinfer cannot verify"
            )
        assert self._collateral is not None  # checked in __init__
        return Evidence(
            kind=EVIDENCE_KINDS[PROVIDER_TDX],
            quote=quote,
            collateral_json=self._collateral.collateral_json(quote),
        )

    def _snp_evidence(self, report: bytes, auxblob: bytes) -> Evidence:
        """The report with its chip certificates by role; no DCAP collateral (hence "")."""
        return snp_evidence(
            report,
            parse_cert_table(auxblob),
            vcek_source=self._vcek_source,
            crl_source=self._crl_source,
            where="the certificate table (auxblob)",
        )

    def _generate(self, report_data: bytes) -> _Report:
        for attempt in range(1, self._attempts + 1):
            report = self._generate_once(report_data)
            if report is not None:
                return report
            log.warning("configfs-tsm generation changed under us (attempt %d)", attempt)
        raise TsmError(
            f"configfs-tsm report entry was modified concurrently {self._attempts} times "
            "(generation mismatch); refusing evidence that may not cover our report_data"
        )

    def _generate_once(self, report_data: bytes) -> _Report | None:
        """One private entry: write, read, verify the generation count, remove."""
        fs = self._fs
        entry = _make_entry(fs, self._root, f"blindinfer-{secrets.token_hex(16)}")
        try:
            before = _read_generation(fs, entry)
            writes = 0
            if self._privlevel is not None:
                _write(fs, entry / "privlevel", f"{self._privlevel}\n".encode("ascii"))
                writes += 1
            _write(fs, entry / "inblob", report_data)
            writes += 1
            provider = _read_text(fs, entry / "provider")
            outblob = _read(fs, entry / "outblob")
            auxblob = b""
            if provider == PROVIDER_SNP and fs.exists(entry / "auxblob"):
                auxblob = _read(fs, entry / "auxblob")
            after = _read_generation(fs, entry)
        finally:
            try:
                fs.remove_entry(entry)
            except OSError as exc:
                log.warning("could not remove configfs-tsm entry %s: %s", entry, exc)
        if after != before + writes:
            return None
        return _Report(provider=provider, outblob=outblob, auxblob=auxblob)


def probe_provider(root: Path = DEFAULT_ROOT, *, fs: TsmFs | None = None) -> str:
    """The provider name of configfs-tsm at `root`, from a short-lived entry.

    Reads only `provider`: no inblob is written and no report is generated, so probing
    never asks the hardware for evidence over a constant report_data.
    """
    fs = fs if fs is not None else OsTsmFs()
    entry = _make_entry(fs, root, f"blindinfer-probe-{secrets.token_hex(8)}")
    try:
        return _read_text(fs, entry / "provider")
    finally:
        try:
            fs.remove_entry(entry)
        except OSError as exc:
            log.warning("could not remove configfs-tsm entry %s: %s", entry, exc)


def _make_entry(fs: TsmFs, root: Path, name: str) -> Path:
    try:
        return fs.make_entry(root, name)
    except FileNotFoundError as exc:
        raise TsmError(
            f"{root} does not exist: no configfs-tsm (needs Linux >= 6.7 in a TDX or SEV-SNP "
            "guest, with configfs mounted at /sys/kernel/config)"
        ) from exc
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            raise TsmError(
                f"{root} exists but no TSM provider is registered (tdx_guest / sev_guest "
                "driver not loaded, or not a confidential VM)"
            ) from exc
        raise TsmError(f"cannot create a configfs-tsm report entry in {root}: {exc}") from exc


def _read(fs: TsmFs, path: Path) -> bytes:
    try:
        return fs.read(path, MAX_BLOB_SIZE)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            raise TsmError(f"{path}: report exceeds the kernel's configfs-tsm maximum") from exc
        raise TsmError(f"reading {path} failed: {exc}") from exc


def _read_text(fs: TsmFs, path: Path) -> str:
    try:
        return _read(fs, path).decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise TsmError(f"{path} is not ASCII text") from exc


def _read_generation(fs: TsmFs, entry: Path) -> int:
    text = _read_text(fs, entry / "generation")
    if not text.isdigit():
        raise TsmError(f"{entry / 'generation'} is not a number: {text!r}")
    return int(text)


def _write(fs: TsmFs, path: Path, data: bytes) -> None:
    try:
        fs.write(path, data)
    except OSError as exc:
        raise TsmError(f"writing {path} failed: {exc}") from exc
