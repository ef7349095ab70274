"""A simulated Intel SGX PKI: certificates, CRLs and signed collateral for dcap-qvl.

It mirrors Intel's hierarchy so that the unmodified dcap-qvl verifier accepts simulation
quotes when given the simulation root, and only then:

    Blindinfer SIMULATION SGX Root CA
    ├── Blindinfer SIMULATION SGX PCK Platform CA
    │   └── Blindinfer SIMULATION SGX PCK Certificate   (Intel SGX extension; signs QE reports)
    └── Blindinfer SIMULATION SGX TCB Signing           (signs TCB info and QE identity)

The private keys are shipped in `keys/` (public by design, see the package docstring).
Certificates have fixed validity and serials and are signed with deterministic ECDSA,
so the same keys always give byte-identical certificates; the root built here is the one
pinned by the client as `attestation/roots/simulation_root.pem`.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

KEY_NAMES: Final = ("root_ca", "pck_platform_ca", "tcb_signing", "pck_leaf", "enclave_signer")
"""Files `keys/<name>.pem`: PKCS#8 P-256 private keys."""

# The simulated platform's TCB, as its PCK certificate states it and TCB info accepts it.
SIM_CPUSVN: Final = bytes([0x0B, 0x0B, 0x02, 0x02, 0x03, 0x01, 0x00, 0x05] + [0x00] * 8)
SIM_PCESVN: Final = 13
SIM_PCEID: Final = bytes(2)
SIM_FMSPC: Final = b"SIM\x00\x00\x00"
SIM_PPID: Final = hashlib.sha256(b"blindinfer SIMULATION PPID").digest()[:16]
SIM_SGX_TYPE: Final = 0  # Standard
SIM_TCB_EVALUATION_DATA_NUMBER: Final = 17

# The simulated quoting enclave, as its report states it and QE identity accepts it.
SIM_QE_MRENCLAVE: Final = hashlib.sha256(b"blindinfer SIMULATION quoting enclave").digest()
SIM_QE_MRSIGNER: Final = hashlib.sha256(b"blindinfer SIMULATION quoting enclave signer").digest()
SIM_QE_ISVPRODID: Final = 1
SIM_QE_ISVSVN: Final = 8
SIM_QE_ATTRIBUTES: Final = bytes([0x11]) + bytes(7) + bytes([0x03]) + bytes(7)  # INIT|PROVISIONKEY

COLLATERAL_ISSUED_BEFORE: Final = 3600
COLLATERAL_LIFETIME: Final = 30 * 86400

_NOT_BEFORE: Final = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
_NOT_AFTER: Final = dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
_ORG: Final = "Blindinfer SIMULATION (insecure: its private keys are public)"
_SGX_EXTENSION_OID: Final = "1.2.840.113741.1.13.1"


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
        ]
    )


ROOT_NAME: Final = _name("Blindinfer SIMULATION SGX Root CA")
PCK_CA_NAME: Final = _name("Blindinfer SIMULATION SGX PCK Platform CA")
TCB_SIGNING_NAME: Final = _name("Blindinfer SIMULATION SGX TCB Signing")
PCK_LEAF_NAME: Final = _name("Blindinfer SIMULATION SGX PCK Certificate")


# --- DER, by hand: the SGX extension is a private SEQUENCE of (OID, value) pairs. ---


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _der_oid(dotted: str) -> bytes:
    arcs = [int(a) for a in dotted.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body += bytes(reversed(chunk))
    return _tlv(0x06, bytes(body))


def _der_uint(value: int, tag: int = 0x02) -> bytes:
    """INTEGER (or ENUMERATED) in minimal two's complement; a high bit needs a 0x00 pad."""
    return _tlv(tag, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _pair(oid: str, value: bytes) -> bytes:
    return _tlv(0x30, _der_oid(oid) + value)


def sgx_extension_der(
    *, ppid: bytes, cpusvn: bytes, pcesvn: int, pceid: bytes, fmspc: bytes, sgx_type: int
) -> bytes:
    """Intel's SGX extension (OID 1.2.840.113741.1.13.1) as in a PCK certificate."""
    base = _SGX_EXTENSION_OID
    tcb = b"".join(_pair(f"{base}.2.{i + 1}", _der_uint(svn)) for i, svn in enumerate(cpusvn))
    tcb += _pair(f"{base}.2.17", _der_uint(pcesvn))
    tcb += _pair(f"{base}.2.18", _tlv(0x04, cpusvn))
    return _tlv(
        0x30,
        _pair(f"{base}.1", _tlv(0x04, ppid))
        + _pair(f"{base}.2", _tlv(0x30, tcb))
        + _pair(f"{base}.3", _tlv(0x04, pceid))
        + _pair(f"{base}.4", _tlv(0x04, fmspc))
        + _pair(f"{base}.5", _der_uint(sgx_type, tag=0x0A)),
    )


# --- keys and certificates ---


def load_key(name: str) -> ec.EllipticCurvePrivateKey:
    """A shipped simulation private key (see `KEY_NAMES`)."""
    pem = resources.files(__package__).joinpath("keys", f"{name}.pem").read_bytes()
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"keys/{name}.pem is not an EC private key")
    return key


def raw_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    """x || y, 32 bytes each big-endian: the form SGX quotes carry public keys in."""
    numbers = key.public_numbers()
    return numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")


def raw_signature(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ECDSA-P256-SHA256 as r || s (64 bytes), the encoding SGX quotes and dcap-qvl use."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _certificate(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    key: ec.EllipticCurvePublicKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    serial: int,
    ca_path_length: int | None,
    extra: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    """A v3 certificate shaped like Intel's: CA certs sign certs and CRLs, leaves sign data."""
    is_ca = ca_path_length is not None
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key)
        .serial_number(serial)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=ca_path_length), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not is_ca,
                content_commitment=not is_ca,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=is_ca,
                crl_sign=is_ca,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    for ext in extra:
        builder = builder.add_extension(ext, False)
    return builder.sign(issuer_key, hashes.SHA256(), ecdsa_deterministic=True)


def build_root_certificate(root_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    """The self-signed simulation root; deterministic, pinned by the client."""
    return _certificate(
        subject=ROOT_NAME,
        issuer=ROOT_NAME,
        key=root_key.public_key(),
        issuer_key=root_key,
        serial=0x51A0_0001,
        ca_path_length=1,
    )


def _pem(*certs: x509.Certificate) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in certs)


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Collateral:
    """dcap-qvl `QuoteCollateralV3` JSON and the unix time it stops being valid."""

    json: str
    issue_date: int
    next_update: int


@dataclass(frozen=True, slots=True)
class SimulationPki:
    """The loaded keys and certificates of the simulated PKI (one per process)."""

    root_key: ec.EllipticCurvePrivateKey
    pck_ca_key: ec.EllipticCurvePrivateKey
    tcb_signing_key: ec.EllipticCurvePrivateKey
    pck_leaf_key: ec.EllipticCurvePrivateKey
    enclave_signer_key: ec.EllipticCurvePrivateKey
    root: x509.Certificate
    pck_ca: x509.Certificate
    tcb_signing: x509.Certificate
    pck_leaf: x509.Certificate

    @property
    def pck_chain_pem(self) -> bytes:
        """Certification data type 5: PCK leaf, PCK CA, root."""
        return _pem(self.pck_leaf, self.pck_ca, self.root).encode("ascii")

    def collateral(self, now: int) -> Collateral:
        """Fresh CRLs, TCB info and QE identity, valid from now - 1 h to now + 30 days."""
        issue = int(now) - COLLATERAL_ISSUED_BEFORE
        next_update = int(now) + COLLATERAL_LIFETIME
        tcb_info = self._tcb_info(issue, next_update)
        qe_identity = self._qe_identity(issue, next_update)
        signing_chain = _pem(self.tcb_signing, self.root)
        doc = {
            "pck_crl_issuer_chain": _pem(self.pck_ca, self.root),
            "root_ca_crl": self._crl(self.root_key, ROOT_NAME, issue, next_update).hex(),
            "pck_crl": self._crl(self.pck_ca_key, PCK_CA_NAME, issue, next_update).hex(),
            "tcb_info_issuer_chain": signing_chain,
            "tcb_info": tcb_info,
            "tcb_info_signature": raw_signature(self.tcb_signing_key, tcb_info.encode()).hex(),
            "qe_identity_issuer_chain": signing_chain,
            "qe_identity": qe_identity,
            "qe_identity_signature": raw_signature(
                self.tcb_signing_key, qe_identity.encode()
            ).hex(),
        }
        return Collateral(json=json.dumps(doc), issue_date=issue, next_update=next_update)

    @staticmethod
    def _crl(
        key: ec.EllipticCurvePrivateKey, issuer: x509.Name, issue: int, next_update: int
    ) -> bytes:
        """An empty CRL: dcap-qvl refuses any certificate that no CRL covers."""
        crl = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer)
            .last_update(dt.datetime.fromtimestamp(issue, dt.UTC))
            .next_update(dt.datetime.fromtimestamp(next_update, dt.UTC))
            .add_extension(x509.CRLNumber(1), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False
            )
            .sign(key, hashes.SHA256())
        )
        return crl.public_bytes(serialization.Encoding.DER)

    @staticmethod
    def _tcb_info(issue: int, next_update: int) -> str:
        level = {
            "tcb": {
                "sgxtcbcomponents": [{"svn": svn} for svn in SIM_CPUSVN],
                "pcesvn": SIM_PCESVN,
            },
            "tcbDate": "2025-01-01T00:00:00Z",
            "tcbStatus": "UpToDate",
        }
        body = {
            "id": "SGX",
            "version": 3,
            "issueDate": _iso(issue),
            "nextUpdate": _iso(next_update),
            "fmspc": SIM_FMSPC.hex().upper(),
            "pceId": SIM_PCEID.hex().upper(),
            "tcbType": 0,
            "tcbEvaluationDataNumber": SIM_TCB_EVALUATION_DATA_NUMBER,
            "tcbLevels": [level],
        }
        return json.dumps(body, separators=(",", ":"))

    @staticmethod
    def _qe_identity(issue: int, next_update: int) -> str:
        body = {
            "id": "QE",
            "version": 2,
            "issueDate": _iso(issue),
            "nextUpdate": _iso(next_update),
            "tcbEvaluationDataNumber": SIM_TCB_EVALUATION_DATA_NUMBER,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": SIM_QE_ATTRIBUTES[:8].hex().upper() + "00" * 8,
            "attributesMask": "FBFFFFFFFFFFFFFF" + "00" * 8,
            "mrsigner": SIM_QE_MRSIGNER.hex().upper(),
            "isvprodid": SIM_QE_ISVPRODID,
            "tcbLevels": [
                {
                    "tcb": {"isvsvn": SIM_QE_ISVSVN},
                    "tcbDate": "2025-01-01T00:00:00Z",
                    "tcbStatus": "UpToDate",
                }
            ],
        }
        return json.dumps(body, separators=(",", ":"))


@functools.cache
def simulation_pki() -> SimulationPki:
    """Load the shipped keys and build the certificates once per process."""
    root_key, pck_ca_key, tcb_key, leaf_key, signer_key = (load_key(n) for n in KEY_NAMES)
    root = build_root_certificate(root_key)
    pck_ca = _certificate(
        subject=PCK_CA_NAME,
        issuer=ROOT_NAME,
        key=pck_ca_key.public_key(),
        issuer_key=root_key,
        serial=0x51A0_0002,
        ca_path_length=0,
    )
    tcb_signing = _certificate(
        subject=TCB_SIGNING_NAME,
        issuer=ROOT_NAME,
        key=tcb_key.public_key(),
        issuer_key=root_key,
        serial=0x51A0_0003,
        ca_path_length=None,
    )
    sgx_ext = sgx_extension_der(
        ppid=SIM_PPID,
        cpusvn=SIM_CPUSVN,
        pcesvn=SIM_PCESVN,
        pceid=SIM_PCEID,
        fmspc=SIM_FMSPC,
        sgx_type=SIM_SGX_TYPE,
    )
    pck_leaf = _certificate(
        subject=PCK_LEAF_NAME,
        issuer=PCK_CA_NAME,
        key=leaf_key.public_key(),
        issuer_key=pck_ca_key,
        serial=0x51A0_0004,
        ca_path_length=None,
        extra=(x509.UnrecognizedExtension(x509.ObjectIdentifier(_SGX_EXTENSION_OID), sgx_ext),),
    )
    return SimulationPki(
        root_key=root_key,
        pck_ca_key=pck_ca_key,
        tcb_signing_key=tcb_key,
        pck_leaf_key=leaf_key,
        enclave_signer_key=signer_key,
        root=root,
        pck_ca=pck_ca,
        tcb_signing=tcb_signing,
        pck_leaf=pck_leaf,
    )
