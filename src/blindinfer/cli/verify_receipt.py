"""`blindinfer verify-receipt proof.json --policy P`: offline check of a receipt's proof."""

from __future__ import annotations

import argparse
import json

import numpy as np

from blindinfer.attestation.policy import load_policy
from blindinfer.client.receipts import load_proof, verify_proof
from blindinfer.errors import BlindInferError

EXIT_REFUSED = 1


def _tensors(path: object) -> dict[str, np.ndarray] | None:
    if path is None:
        return None
    with np.load(str(path)) as archive:
        return {name: archive[name] for name in archive.files}


def run_verify_receipt(args: argparse.Namespace) -> int:
    try:
        receipt = verify_proof(
            load_proof(args.proof),
            policy=load_policy(args.policy),
            simulation=args.simulation,
            inputs=_tensors(args.inputs),
            outputs=_tensors(args.outputs),
        )
    except (BlindInferError, OSError, ValueError) as exc:
        print(f"REFUSED: {type(exc).__name__}: {exc}")
        return EXIT_REFUSED
    checked = ["evidence valid at the receipt's time", "signed by the attested TLS key"]
    checked += [f"{n} match" for n, p in (("inputs", args.inputs), ("outputs", args.outputs)) if p]
    print("VALID: " + "; ".join(checked))
    print(json.dumps(receipt.payload, indent=2, sort_keys=True))
    return 0
