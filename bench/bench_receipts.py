"""Cost of a receipt per inference, end to end (server signs, client verifies).

For each model (a small MLP; MiniLM b1 x 128 tokens if available) runs the same inference
with and without `receipt=True` in alternating blocks on one attested connection, and
prints the median latency of each and the difference (absolute and relative). Also prints
the server-side cost alone (tensor digests + ES256 signature). Not a test: asserts nothing.
Run: `.venv/bin/python bench/bench_receipts.py [--quick] [--no-minilm]`.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
import warnings
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from bench_inference import models  # noqa: E402

import blindinfer  # noqa: E402
from blindinfer.protocol.receipts import es256_sign, key_id, sign_receipt, tensor_digest  # noqa: E402
from blindinfer.server.config import ServerConfig  # noqa: E402
from blindinfer.server.platforms import simulated_mrenclave  # noqa: E402
from blindinfer.server.process import start_server  # noqa: E402
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER  # noqa: E402


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args()
    blocks, per_block = (5, 10) if args.quick else (20, 25)
    policy = blindinfer.Policy(
        sgx=blindinfer.SgxPolicy(
            mrenclave=(simulated_mrenclave(ServerConfig(simulation=True)),),
            mrsigner=(SIMULATION_MRSIGNER,),
        )
    )
    try:
        chosen = models(not args.no_minilm)
    except Exception as exc:
        print(f"MiniLM unavailable ({exc}); MLP only")
        chosen = models(False)
    with start_server(["--simulation"]) as server:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = blindinfer.connect(server.url, policy=policy, simulation=True)
        with client:
            for label, data, feed in chosen:
                sha = client.upload_model(data).sha256
                for receipt in (False, True):
                    client.run_model(sha, feed, receipt=receipt)  # warm up
                plain: list[float] = []
                receipted: list[float] = []
                for _ in range(blocks):
                    for receipt, samples in ((False, plain), (True, receipted)):
                        for _ in range(per_block):
                            start = time.perf_counter()
                            client.run_model(sha, feed, receipt=receipt)
                            samples.append(time.perf_counter() - start)
                base, with_receipt = _median_ms(plain), _median_ms(receipted)
                delta = with_receipt - base
                print(
                    f"{label:<20} without {base:8.3f} ms  with receipt {with_receipt:8.3f} ms  "
                    f"cost {delta:+.3f} ms ({delta / base * 100:+.1f}%)"
                )
                outputs = client.run_model(sha, feed)
                key = ec.generate_private_key(ec.SECP256R1())
                kid = key_id(key.public_key())
                n = 200
                start = time.perf_counter()
                for _ in range(n):
                    sign_receipt(
                        {
                            "inputs_digest": tensor_digest(feed),
                            "outputs_digest": tensor_digest(outputs),
                        },
                        functools.partial(es256_sign, key),
                        kid,
                    )
                server_side = (time.perf_counter() - start) / n * 1000
                print(f"{'':<20} server-side digests + ES256 signature alone: {server_side:.3f} ms")


if __name__ == "__main__":
    main()
