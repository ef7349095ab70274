"""Cost of one receipt's JWS alone: `sign_receipt` (ES256 signature included) and
`parse_and_verify_jws`, this tree's against another checkout's, in one run.

The payload is the inference receipt saved in tests/assets/receipts (570 bytes of JSON);
both variants sign with the same P-256 key and verify the same receipts. Timings are
interleaved blocks (bench/timing.py), so load on a shared machine hits both alike. Not a
test: asserts only that both sides produce receipts the other accepts.
Run: `.venv/bin/python bench/bench_receipt_jws.py --baseline-src ROOT [--quick]`, ROOT a
checkout's root (e.g. `git worktree add --detach /tmp/base HEAD`), not its src/.
"""

from __future__ import annotations

import argparse
import base64
import functools
import importlib.util
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from timing import interleaved, machine, percentile  # noqa: E402

from blindinfer.protocol import receipts as current  # noqa: E402


def _load(root: Path) -> ModuleType:
    """`protocol/receipts.py` of the checkout at `root`, as a module of its own (its imports
    of other blindinfer modules resolve to this tree's, which the JWS code does not use)."""
    path = root / "src" / "blindinfer" / "protocol" / "receipts.py"
    if not path.is_file():
        raise SystemExit(f"--baseline-src {root}: no {path.relative_to(root)} (give the root)")
    spec = importlib.util.spec_from_file_location("baseline_receipts", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _payload() -> dict[str, Any]:
    proof = json.loads((ROOT / "tests/assets/receipts/inference.json").read_text())
    text = proof["receipt"]["payload"]
    document: dict[str, Any] = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    return document


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", type=Path, required=True, metavar="ROOT")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    iterations, block = (400, 50) if args.quick else (4000, 100)
    baseline = _load(args.baseline_src.resolve())
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    kid = current.key_id(public)
    payload = _payload()
    modules = {"baseline": baseline, "this tree": current}
    receipts = {
        name: module.sign_receipt(payload, lambda m, mod=module: mod.es256_sign(key, m), kid)
        for name, module in modules.items()
    }
    for name, module in modules.items():  # each side accepts the other's receipts
        for receipt in receipts.values():
            assert module.parse_and_verify_jws(receipt, public) == payload, name
    variants: dict[str, Callable[[], object]] = {}
    for name, module in modules.items():
        signer = functools.partial(module.es256_sign, key)
        variants[f"sign   {name}"] = functools.partial(module.sign_receipt, payload, signer, kid)
        variants[f"verify {name}"] = functools.partial(
            module.parse_and_verify_jws, receipts[name], public
        )
    print(machine())
    print(f"{iterations} calls per variant, interleaved blocks of {block}")
    print(f"baseline: {args.baseline_src}")
    results = interleaved(variants, iterations, block)
    for operation in ("sign  ", "verify"):
        old = results[f"{operation} baseline"]
        new = results[f"{operation} this tree"]
        delta = (statistics.median(new) - statistics.median(old)) * 1000
        print(
            f"  {operation.strip():<6} baseline median {statistics.median(old) * 1000:6.1f} us "
            f"p90 {percentile(old, 90) * 1000:6.1f} us | this tree median "
            f"{statistics.median(new) * 1000:6.1f} us p90 {percentile(new, 90) * 1000:6.1f} us "
            f"| {delta:+.1f} us"
        )


if __name__ == "__main__":
    main()
