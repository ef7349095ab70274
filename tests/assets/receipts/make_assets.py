"""Regenerates the saved receipt proofs in this folder from a real simulated server.

Not run by the tests: the files it writes are frozen on purpose (they prove that receipts
made by an older build still verify). Run from the repository root:
`.venv/bin/python tests/assets/receipts/make_assets.py tests/assets/receipts`
(see README.md for the commit the checked-in files were made at).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))

import blindinfer  # noqa: E402
from blindinfer.attestation.policy import load_policy  # noqa: E402
from blindinfer.server.process import start_server  # noqa: E402
from support.onnx_models import model_bytes, multi_io_feed, multi_io_model  # noqa: E402
from support.tiny_llm import build_tiny_llm  # noqa: E402

MESSAGES = [
    {"role": "system", "content": "Réponds brièvement."},
    {"role": "user", "content": "tell me about the quiet river 👋"},
]


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    args = ["--simulation", "--workers=1", "--max-new-tokens=16"]
    with start_server(args) as server, tempfile.TemporaryDirectory() as scratch:
        policy = subprocess.run(
            [
                sys.executable,
                "-m",
                "blindinfer.cli.main",
                "policy",
                "--from",
                server.url,
                "--simulation",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (out / "policy.toml").write_text(policy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", blindinfer.SimulationWarning)
            client = blindinfer.connect(
                server.url, policy=load_policy(out / "policy.toml"), simulation=True
            )
        with client:
            feed = multi_io_feed(batch=2)
            uploaded = client.upload_model(model_bytes(multi_io_model()), receipt=True)
            outputs = client.run_model(uploaded.sha256, feed, receipt=True)
            assert isinstance(outputs, blindinfer.client.receipts.ReceiptedOutputs)
            outputs.receipt.save(out / "inference.json")
            np.savez(out / "inputs.npz", **feed)  # type: ignore[arg-type]
            np.savez(out / "outputs.npz", **dict(outputs))  # type: ignore[arg-type]

            _, genai = build_tiny_llm(Path(scratch))
            tiny = client.upload_model(genai, name="tiny").name
            answer = client.openai().chat.completions.create(
                model=tiny, messages=MESSAGES, max_tokens=12, temperature=0, stop=["§"]
            )
            receipt = client.verify_generation(answer, messages=MESSAGES)
            receipt.save(out / "generation.json")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
