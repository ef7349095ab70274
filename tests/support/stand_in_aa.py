"""A loopback HTTP server standing in for the Confidential Containers Attestation Agent's
REST API, serving real evidence bytes.

The Attestation Agent (confidential-containers/guest-components, api-server-rest in front
of attestation-agent) is an external service that runs in a confidential pod VM and asks
the TEE for evidence; no TEE or Attestation Agent runs here, so the tests talk to this
stand-in instead, over real HTTP on loopback. It answers as api-server-rest/src/router.rs
and utils.rs do: ``GET /aa/evidence?runtime_data=...&encoding=base64`` decodes URL-safe
base64 without padding (400 ``BAD REQUEST`` if it cannot, or without ``runtime_data``),
refuses more than 64 bytes with a 500 like the attesters, and otherwise answers 200
``application/octet-stream`` with the evidence JSON it was given; any other ``/aa`` path is
404 ``URL NOT FOUND``. `Answer` (from the CDH stand-in) scripts misbehaviours.

The evidence is what the attesters would write for REAL evidence captured elsewhere
(tests/assets/attestation-vectors): `sev_report_json` turns a report's bytes into the serde
form of virtee/sev 6.3's ``AttestationReport`` the way its ``from_bytes`` reads them,
written here independently of blindinfer's rebuild (tee/coco_agent.py), so a test can check
that the rebuild gives back the very bytes AMD signed. The stand-in cannot make evidence
over a report_data of the test's choosing: a fixed asset covers its own report_data only.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from support.stand_in_cdh import Answer

EVIDENCE_PATH = "/aa/evidence"


# -- what the attesters write ---------------------------------------------------------


def _tcb(raw: bytes, turin: bool) -> dict[str, Any]:
    if turin:
        return {
            "fmc": raw[0],
            "bootloader": raw[1],
            "tee": raw[2],
            "snp": raw[3],
            "microcode": raw[7],
        }
    return {"fmc": None, "bootloader": raw[0], "tee": raw[1], "snp": raw[6], "microcode": raw[7]}


def sev_report_json(report: bytes) -> dict[str, Any]:
    """sev 6.3 ``AttestationReport`` as serde_json writes it, read from `report`'s bytes."""
    assert len(report) == 0x4A0
    version = struct.unpack_from("<I", report, 0)[0]
    chip_id = report[0x1A0:0x1E0]
    turin = chip_id[8:] == bytes(56) if version == 2 else report[0x188] == 0x1A
    u32 = lambda off: struct.unpack_from("<I", report, off)[0]  # noqa: E731
    u64 = lambda off: struct.unpack_from("<Q", report, off)[0]  # noqa: E731
    arr = lambda off, n: list(report[off : off + n])  # noqa: E731
    ver = lambda off: {"major": report[off + 2], "minor": report[off + 1], "build": report[off]}  # noqa: E731
    cpuid = version >= 3
    mit = version >= 5
    return {
        "version": version,
        "guest_svn": u32(0x04),
        "policy": u64(0x08),
        "family_id": arr(0x10, 16),
        "image_id": arr(0x20, 16),
        "vmpl": u32(0x30),
        "sig_algo": u32(0x34),
        "current_tcb": _tcb(report[0x38:0x40], turin),
        "plat_info": u64(0x40),
        "key_info": u32(0x48),
        "report_data": arr(0x50, 64),
        "measurement": arr(0x90, 48),
        "host_data": arr(0xC0, 32),
        "id_key_digest": arr(0xE0, 48),
        "author_key_digest": arr(0x110, 48),
        "report_id": arr(0x140, 32),
        "report_id_ma": arr(0x160, 32),
        "reported_tcb": _tcb(report[0x180:0x188], turin),
        "cpuid_fam_id": report[0x188] if cpuid else None,
        "cpuid_mod_id": report[0x189] if cpuid else None,
        "cpuid_step": report[0x18A] if cpuid else None,
        "chip_id": list(chip_id),
        "committed_tcb": _tcb(report[0x1E0:0x1E8], turin),
        "current": ver(0x1E8),
        "committed": ver(0x1EC),
        "launch_tcb": _tcb(report[0x1F0:0x1F8], turin),
        "launch_mit_vector": u64(0x1F8) if mit else None,
        "current_mit_vector": u64(0x200) if mit else None,
        "signature": {"r": arr(0x2A0, 72), "s": arr(0x2E8, 72)},
    }


def snp_answer(report: bytes, certs: Sequence[tuple[Any, bytes]] | None = None) -> bytes:
    """The SNP attester's JSON: `certs` as (cert_type, DER), cert_type "VCEK", "ASK", ..."""
    chain = None if certs is None else [{"cert_type": t, "data": list(d)} for t, d in certs]
    return json.dumps({"attestation_report": sev_report_json(report), "cert_chain": chain}).encode()


def tdx_answer(quote: bytes, eventlog: bytes | None = None) -> bytes:
    """The TDX attester's JSON: standard base64 quote and (optional) event log."""
    log = None if eventlog is None else base64.b64encode(eventlog).decode()
    return json.dumps({"cc_eventlog": log, "quote": base64.b64encode(quote).decode()}).encode()


# -- the server -----------------------------------------------------------------------


def _decode_runtime_data(value: str, encoding: str | None) -> bytes | None:
    """api-server-rest/src/utils.rs: URL-safe base64 without padding, or raw UTF-8."""
    if encoding is None:
        return value.encode()
    if encoding != "base64" or "=" in value:
        return None
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None


class StandInAa:
    """`evidence`: the answer to every valid evidence request (JSON bytes or an `Answer`),
    or a function of the decoded runtime_data. `requests` lists the paths received."""

    def __init__(self, evidence: bytes | Answer | Callable[[bytes], bytes | Answer]) -> None:
        self.evidence = evidence
        self.requests: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                stand_in.requests.append(self.path)
                stand_in._answer(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _choose(self, path: str) -> Answer:
        url = urllib.parse.urlsplit(path)
        if url.path != EVIDENCE_PATH:
            return Answer(404, b"URL NOT FOUND")
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        if "runtime_data" not in params:
            return Answer(400, b"BAD REQUEST")
        data = _decode_runtime_data(params["runtime_data"], params.get("encoding"))
        if data is None:
            return Answer(400, b"BAD REQUEST")
        if len(data) > 64:
            return Answer(500, b"SNP Attester: Report data must be no more than 64 bytes")
        found = self.evidence(data) if callable(self.evidence) else self.evidence
        if isinstance(found, bytes):
            return Answer(200, found, {"Content-Type": "application/octet-stream"})
        return found

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        answer = self._choose(handler.path)
        if answer.delay_s:
            threading.Event().wait(answer.delay_s)
        handler.send_response(answer.status)
        for name, value in answer.headers.items():
            handler.send_header(name, value)
        handler.send_header("Connection", "close")
        if answer.chunked:
            handler.send_header("Transfer-Encoding", "chunked")
        else:
            handler.send_header("Content-Length", str(len(answer.body)))
        handler.end_headers()
        try:
            if answer.chunked:
                for start in range(0, len(answer.body), 65536):
                    piece = answer.body[start : start + 65536]
                    handler.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                handler.wfile.write(b"0\r\n\r\n")
            else:
                handler.wfile.write(answer.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client stopped reading, as it should past its bound

    def __enter__(self) -> StandInAa:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
