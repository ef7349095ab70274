"""`blindinfer verify`: offline verification of bundles and raw evidence, with a report."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from blindinfer.attestation.bundle import load_bundle
from blindinfer.attestation.offline import (
    OfflineResult,
    verify_intel_offline,
    verify_nvidia_offline,
    verify_snp_offline,
)
from blindinfer.attestation.policy import Policy, load_policy
from blindinfer.cli.args import parse_time
from blindinfer.cli.errors import EXIT_POLICY, EXIT_USAGE, refusal_reason
from blindinfer.cli.errors import EXIT_REFUSED as EXIT_NOT_AUTHENTIC
from blindinfer.client.client import verify_bundle
from blindinfer.errors import (
    AttestationError,
    BlindInferError,
    Mismatch,
    PolicyMismatchError,
    ProtocolError,
    UsageError,
)

__all__ = ["EXIT_NOT_AUTHENTIC", "EXIT_POLICY", "EXIT_USAGE", "run_verify"]


def _read_hex_or_binary(path: Path) -> bytes:
    data = path.read_bytes()
    text = data.strip()
    try:
        return bytes.fromhex(text.decode("ascii")) if text else data
    except (UnicodeDecodeError, ValueError):
        return data


def _print(document: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(document, indent=2))
        return
    print(f"authentic     {document.get('authentic')}")
    for key in ("kind", "root", "tcb_status", "advisory_ids", "report_data"):
        if key in document:
            print(f"{key:<13} {document[key]}")
    claims = document.get("claims", {})
    assert isinstance(claims, dict)
    for name, value in claims.items():
        print(f"  {name:<20} {value}")
    if document.get("policy_applied"):
        mismatches = document.get("mismatches", [])
        assert isinstance(mismatches, list)
        print("policy        " + ("satisfied" if not mismatches else "NOT satisfied"))
        for m in mismatches:
            print(f"  - {m['field']}: expected {m['expected']}, got {m['got']}")
    else:
        print("policy        not checked (authenticity only)")


def _at(value: object) -> int | None:
    """`--at` as parsed by the CLI (an int), or as text from callers of run_verify."""
    if value is None or isinstance(value, int):
        return value
    try:
        return parse_time(str(value))
    except ValueError as exc:
        raise UsageError(f"--at: {exc}") from None


def _nonce(text: str | None) -> bytes | None:
    if text is None:
        return None
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"--nonce: {text!r} is not hex (e.g. --nonce 9f2c...)") from None


def _rejected(exc: BlindInferError, as_json: bool, source: str = "the server") -> int:
    if as_json:
        print(
            json.dumps(
                {"authentic": False, "error": type(exc).__name__, "reason": str(exc)}, indent=2
            )
        )
    else:
        print(f"REJECTED: {refusal_reason(exc, source)}")
    return EXIT_NOT_AUTHENTIC


def _usage(message: str) -> int:
    print(f"blindinfer verify: {message}", file=sys.stderr)
    return EXIT_USAGE


def _mismatch_dicts(mismatches: tuple[Mismatch, ...]) -> list[dict[str, str]]:
    return [{"field": m.field, "expected": m.expected, "got": m.got} for m in mismatches]


def run_verify(args: argparse.Namespace) -> int:
    policy: Policy | None = load_policy(args.policy) if args.policy else None
    given = _at(args.at)
    at = given if given is not None else int(time.time())
    try:
        if args.bundle is not None:
            return _bundle(args, policy)
        results: list[dict[str, object]] = []
        if args.intel_quote:
            if not args.collateral:
                return _usage("--intel-quote needs --collateral")
            collateral = args.collateral.read_text(encoding="utf-8")
            results.append(
                _offline(
                    verify_intel_offline(
                        args.intel_quote.read_bytes(),
                        collateral,
                        policy=policy,
                        at=at,
                        simulation=args.simulation,
                    )
                )
            )
        if args.snp_report:
            if not args.vcek:
                return _usage("--snp-report needs --vcek")
            chain = args.ask_ark.read_bytes() if args.ask_ark else None
            results.append(
                _offline(
                    verify_snp_offline(
                        args.snp_report.read_bytes(),
                        args.vcek.read_bytes(),
                        chain,
                        policy=policy,
                        at=at,
                        crl=args.snp_crl.read_bytes() if args.snp_crl else b"",
                    )
                )
            )
        if args.nvidia_report:
            if not args.nvidia_certs:
                return _usage("--nvidia-report needs --nvidia-certs")
            claims, mismatches = verify_nvidia_offline(
                _read_hex_or_binary(args.nvidia_report),
                args.nvidia_certs.read_bytes(),
                nonce=_nonce(args.nonce),
                policy=policy,
                at=at,
            )
            results.append(
                {
                    "authentic": True,
                    "kind": "nvidia-h100",
                    "claims": dict(claims),
                    "policy_applied": bool(policy and policy.gpu),
                    "mismatches": _mismatch_dicts(mismatches),
                }
            )
    except AttestationError as exc:
        return _rejected(exc, args.json)
    if not results:
        return _usage(
            "nothing to verify: give a bundle, --intel-quote, --snp-report or --nvidia-report"
        )
    for document in results:
        _print(document, args.json)
    failed = any(document.get("mismatches") for document in results)
    return EXIT_POLICY if failed else 0


def _offline(result: OfflineResult) -> dict[str, object]:
    return result.to_dict()


def _bundle(args: argparse.Namespace, policy: Policy | None) -> int:
    try:
        bundle = load_bundle(args.bundle)
    except ProtocolError as exc:
        raise UsageError(
            f"{args.bundle} is not an evidence bundle ({exc.message})\n"
            "give the file that `blindinfer attest --save` wrote, or raw evidence options"
        ) from exc
    given = _at(args.at)
    at = given if given is not None else bundle.captured_at
    try:
        report = verify_bundle(bundle, policy=policy, simulation=args.simulation, now=at)
    except PolicyMismatchError as exc:
        _print(
            {
                "authentic": True,
                "source": bundle.source,
                "policy_applied": True,
                "mismatches": _mismatch_dicts(exc.mismatches),
            },
            args.json,
        )
        return EXIT_POLICY
    except BlindInferError as exc:
        return _rejected(exc, args.json, f"the server of {args.bundle} ({bundle.source})")
    document = {
        "authentic": True,
        "source": bundle.source,
        **report.to_dict(),
        "bound_to_tls_key": True,
        "fresh_for_nonce": bundle.nonce.hex(),
        "policy_applied": policy is not None,
        "mismatches": [],
    }
    _print(document, args.json)
    return 0
