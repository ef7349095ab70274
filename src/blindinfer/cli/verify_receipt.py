"""`blindinfer verify-receipt proof.json --policy P`: offline check of a receipt's proof.

A generation's proof is also its transcript (`messages` or `prompt`, `output`, optionally
token ids): each one present is recomputed and must match the receipt's digest; what is
absent is reported as not checked."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from blindinfer.attestation.policy import load_policy
from blindinfer.cli.errors import EXIT_REFUSED, refusal_reason
from blindinfer.client.receipts import load_proof, verify_proof
from blindinfer.errors import BlindInferError, UsageError
from blindinfer.protocol.receipts import GENERATION_KIND

__all__ = ["EXIT_REFUSED", "run_verify_receipt"]


def _tensors(path: object, option: str) -> dict[str, np.ndarray] | None:
    """The arrays of an .npz by name; anything else is a usage error naming `option`."""
    if path is None:
        return None
    try:
        loaded = np.load(str(path), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise UsageError(f"{option}: {path} is not a NumPy .npz file ({exc})") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise UsageError(
            f"{option}: {path} holds one bare array; receipts name each tensor, so save them "
            "by name: numpy.savez(path, input_name=array)"
        )
    with loaded as archive:
        return {name: archive[name] for name in archive.files}


def _transcript_checks(transcript: Mapping[str, object]) -> list[str]:
    """What of a generation's transcript was recomputed (and matched), and what was not."""
    parts = [
        ("prompt", "messages" in transcript or "prompt" in transcript),
        ("output", "output" in transcript),
        ("prompt tokens", "prompt_token_ids" in transcript),
        ("output tokens", "output_token_ids" in transcript),
    ]
    matched = [name for name, present in parts if present]
    missing = [name for name, present in parts if not present]
    result = [f"{', '.join(matched)} match the transcript"] if matched else []
    if missing:
        result.append(f"not in the transcript, not checked: {', '.join(missing)}")
    return result


def run_verify_receipt(args: argparse.Namespace) -> int:
    """Exit 0 valid, 1 refused (printed on stdout, with the reason); a missing or malformed
    policy or tensor file raises (usage errors, exit 2, via blindinfer.cli.errors)."""
    policy = load_policy(args.policy)
    inputs = _tensors(args.inputs, "--inputs")
    outputs = _tensors(args.outputs, "--outputs")
    try:
        receipt = verify_proof(
            load_proof(args.proof),
            policy=policy,
            simulation=args.simulation,
            inputs=inputs,
            outputs=outputs,
        )
    except (BlindInferError, OSError, ValueError) as exc:
        print(f"REFUSED: {refusal_reason(exc, f'the server of {Path(args.proof).name}')}")
        return EXIT_REFUSED
    checked = ["evidence valid at the receipt's time", "signed by the attested TLS key"]
    checked += [f"{n} match" for n, p in (("inputs", args.inputs), ("outputs", args.outputs)) if p]
    if receipt.payload.get("kind") == GENERATION_KIND:
        checked += _transcript_checks(receipt.transcript)
    print("VALID: " + "; ".join(checked))
    print(json.dumps(receipt.payload, indent=2, sort_keys=True))
    return 0
