"""`blindinfer audit verify PATH`: check an audit log's hash chain offline.

It runs wherever the log was copied to (no server, no TEE), so that an auditor does not
have to trust the machine that wrote it. Exit status: 0 intact chain, 1 otherwise (a broken
chain, a missing anchor, or a file that cannot be read).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from blindinfer.server.audit import AuditVerification, verify_audit_log

EXIT_INTACT = 0
EXIT_BROKEN = 1


def _document(path: Path, result: AuditVerification) -> dict[str, object]:
    return {
        "path": str(path),
        "intact": result.intact,
        "entries": result.entries,
        "head": result.head,
        "problems": result.problems,
        "repairs": result.repairs,
    }


def run_audit(args: argparse.Namespace) -> int:
    """Dispatches `audit` actions; only `verify` exists, the only one an auditor needs."""
    if args.audit_command != "verify":
        raise SystemExit(f"unknown audit command {args.audit_command!r}")
    path = Path(args.path)
    anchor: str | None = getattr(args, "anchor", None)
    try:
        result = verify_audit_log(path, anchor=anchor)
    except (OSError, ValueError) as exc:
        if args.json:
            print(json.dumps({"path": str(path), "intact": False, "error": str(exc)}, indent=2))
        else:
            print(f"blindinfer: cannot verify {path}: {exc}", file=sys.stderr)
        return EXIT_BROKEN
    if args.json:
        print(json.dumps(_document(path, result), indent=2))
    else:
        print(f"entries  {result.entries}")
        print(f"head     {result.head}")
        if anchor is not None:
            print(f"anchor   {anchor} (a missing anchor is listed as a problem)")
        for repair in result.repairs:
            print(f"repaired {repair}")
        if result.intact:
            print("chain    intact")
        else:
            print(f"chain    BROKEN ({len(result.problems)} problems)")
            for problem in result.problems:
                print(f"  - {problem}")
    return EXIT_INTACT if result.intact else EXIT_BROKEN
