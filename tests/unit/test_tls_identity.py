"""The server's TLS identity: made in memory, never written where the host could read it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cryptography import x509

from blindinfer.server import tls


def _no_memfd(*args: object) -> int:
    raise OSError(38, "Function not implemented")


def test_identity_binds_the_certificate_key() -> None:
    identity = tls.make_tls_identity()
    certificate = x509.load_der_x509_certificate(identity.certificate_der)
    assert identity.spki_sha256 == tls.spki_sha256(certificate)
    assert certificate.subject.rfc4514_string() == f"CN={tls.CERTIFICATE_COMMON_NAME}"
    assert identity != tls.make_tls_identity()  # a fresh key pair each start


def test_without_memfd_and_without_tmpfs_the_server_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "memfd_create", _no_memfd)
    monkeypatch.delenv(tls.TMPDIR_VARIABLE, raising=False)
    with pytest.raises(RuntimeError, match="refusing to write the TLS key"):
        tls.make_tls_identity()


def test_without_memfd_the_key_passes_through_the_enclave_tmpfs_and_is_removed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "memfd_create", _no_memfd)
    monkeypatch.setenv(tls.TMPDIR_VARIABLE, str(tmp_path))
    identity = tls.make_tls_identity()
    assert len(identity.spki_sha256) == 32
    assert list(tmp_path.iterdir()) == []
