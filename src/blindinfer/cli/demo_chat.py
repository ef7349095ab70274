"""`blindinfer demo chat`: generative serving end to end, on this machine, in a minute.

What it shows, in order, each as a short line: SmolLM2-135M-Instruct converted to int4 by
`blindinfer convert` (once; cached after, `demo_chat_model`), a simulation server started
with the policy measured from this build, the attestation verified, the model folder
uploaded, one answer streamed by the unmodified `openai` SDK through `client.openai()`, the
same question through `blindinfer proxy` with a stock `openai.OpenAI(base_url=...)`, both
compared (greedy: they must be identical) and with in-process onnxruntime-genai on the same
folder, and, where the server signs generation receipts, the streamed answer's receipt
verified offline. `--model DIR` runs it on another onnxruntime-genai folder (the tests use
a tiny one).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from blindinfer.attestation.intel.sgx_policy import SgxPolicy
from blindinfer.attestation.policy import Policy
from blindinfer.cli.chat import attestation_lines, require_sdk, sdk_error
from blindinfer.cli.demo_chat_model import converted
from blindinfer.client.client import SIMULATION_BANNER, connect
from blindinfer.errors import BlindInferError, SimulationWarning, UsageError
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.platforms import simulated_mrenclave
from blindinfer.server.process import start_server
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER

QUESTION = "What is the capital of France? Answer in one sentence."
MAX_TOKENS = 48
MODEL_NAME = "demo-chat"
PROXY_READY = "blindinfer proxy: listening on "


def _say(*parts: object) -> None:
    print(*parts, flush=True)  # flushed: keeps its order next to the children's stderr


def run_chat_demo(model: Path | None = None) -> int:
    started = time.monotonic()
    _require_extras()
    folder = _model_folder(model)
    config = ServerConfig(simulation=True, limits=Limits(workers=1, max_new_tokens=MAX_TOKENS))
    mrenclave = simulated_mrenclave(config)
    _say(f"2. measured this server build: mrenclave {mrenclave.hex()}")
    with tempfile.TemporaryDirectory(prefix="blindinfer-demo-") as scratch:
        server_log = Path(scratch) / "server.log"
        try:
            with server_log.open("w") as log:
                same, exact, receipt_ok = _serve_and_compare(folder, mrenclave, Path(scratch), log)
        except BaseException:
            tail = server_log.read_text(errors="replace").strip().splitlines()[-5:]
            print("\n".join(["the server's last lines:", *tail]), file=sys.stderr, flush=True)
            raise
    _say("9. model deleted, server stopped")
    ok = same and exact and receipt_ok is not False
    _say(
        f"{'verified' if ok else 'NOT verified'} in {time.monotonic() - started:.0f} s "
        "(simulation: no TEE, so nothing here was confidential; docs/generative.md)"
    )
    return 0 if ok else 1


def _require_extras() -> None:
    """Before a 40 s conversion: the SDK and the generative runtime must be importable."""
    import importlib.util

    require_sdk()
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise UsageError(
            "the generative runtime (onnxruntime-genai) is not installed\n"
            "install the extras: pip install 'blindinfer[server,generative,convert,openai]' "
            "(scripts/demo-chat.sh does)"
        )


def _serve_and_compare(
    folder: Path, mrenclave: bytes, scratch: Path, log: TextIO
) -> tuple[bool, bool, bool | None]:
    """Steps 3 to 8: (direct == proxy, direct == in-process, receipt verified or None)."""
    policy = Policy(
        sgx=SgxPolicy(
            mrenclave=(mrenclave,),
            mrsigner=(SIMULATION_MRSIGNER,),
            isvprodid=(1,),
            min_isvsvn=1,
        )
    )
    policy_file = scratch / "policy.toml"
    policy_file.write_text(_policy_toml(mrenclave), encoding="utf-8")
    messages = [{"role": "user", "content": QUESTION}]
    server_args = ["--simulation", "--workers=1", f"--max-new-tokens={MAX_TOKENS}"]
    with start_server(server_args, stderr=log) as server:
        _say(f"3. started a SIMULATION server at {server.url}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)  # printed once, here
            _say(SIMULATION_BANNER)
            client = connect(server.url, policy=policy, simulation=True)
        with client:
            _say("4. " + "\n   ".join(x.strip() for x in attestation_lines(client.attestation)))
            info = client.upload_model(folder, name=MODEL_NAME)
            _say(f"5. uploaded the folder as {info.name!r} ({info.kind}, sha256 {info.sha256})")
            _say("6. openai SDK on the attested channel (client.openai()), streamed:")
            _say(f"   Q: {QUESTION}")
            with client.openai() as sdk:
                direct, chunks = _stream(sdk, messages)
            with _proxy(server.url, policy_file, scratch) as local:
                _say(f"7. the same through `blindinfer proxy` ({local}), stock openai.OpenAI:")
                import openai

                with openai.OpenAI(base_url=local + "/v1", api_key="unused") as plain:
                    through, _ = _stream(plain, messages)
            expected = _in_process(folder, messages)
            _say(f"   identical to the direct stream: {_yes(direct == through)}")
            _say(f"   token-identical to in-process onnxruntime-genai: {_yes(direct == expected)}")
            receipt_ok = _receipt(client, chunks, messages, direct, scratch)
            client.delete_model(MODEL_NAME)
    return direct == through, direct == expected, receipt_ok


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _model_folder(model: Path | None) -> Path:
    if model is not None:
        _say(f"1. model: the onnxruntime-genai folder {model}")
        return model
    _say("1. model: SmolLM2-135M-Instruct (Apache-2.0) from its GGUF, int4")
    began = time.monotonic()
    folder, cached = converted(_say)
    if cached:
        _say(f"   converted before, cached at {folder} (delete it to convert again)")
    else:
        _say(f"   converted by `blindinfer convert` in {time.monotonic() - began:.0f} s, "
             f"cached at {folder}: the next run skips this")  # fmt: skip
    return folder


def _policy_toml(mrenclave: bytes) -> str:
    return (
        f'[sgx]\nmrenclave = ["{mrenclave.hex()}"]\nmrsigner = ["{SIMULATION_MRSIGNER.hex()}"]\n'
        "isvprodid = [1]\nmin_isvsvn = 1\n"
    )


def _stream(sdk: Any, messages: list[dict[str, str]]) -> tuple[str, list[Any]]:
    """Streams one greedy answer, printing its tokens as they come; (text, chunks). The
    SDK's failures are raised as blindinfer's errors (one or two lines, cli.errors)."""
    import openai

    try:
        stream = sdk.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        chunks = list(_printed(stream))
    except openai.APIError as exc:
        print(flush=True)
        raise sdk_error(exc, MODEL_NAME) from exc
    print(flush=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def _printed(stream: Any) -> Iterator[Any]:
    print("   A: ", end="", flush=True)
    with stream:
        for chunk in stream:
            for choice in chunk.choices:
                print(choice.delta.content or "", end="", flush=True)
            yield chunk


@contextmanager
def _proxy(upstream: str, policy_file: Path, scratch: Path) -> Iterator[str]:
    """`blindinfer proxy` on a free loopback port, as a user starts it; yields its URL."""
    log = scratch / "proxy.log"
    command = [sys.executable, "-m", "blindinfer.cli.proxy", "--policy", str(policy_file),
               "--upstream", upstream, "--listen", "127.0.0.1:0", "--simulation"]  # fmt: skip
    with log.open("w") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith(PROXY_READY):
            process.wait(10)
            raise RuntimeError(f"blindinfer proxy did not start: {log.read_text()[-300:]}")
        yield line[len(PROXY_READY) :].split(" ")[0]
    finally:
        process.terminate()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def _in_process(folder: Path, messages: list[dict[str, str]]) -> str:
    """The greedy answer of onnxruntime-genai in this process, on the same folder."""
    from blindinfer.protocol.generation import SamplingParams
    from blindinfer.runtime.generative import GenerativeSession, RuntimeOptions

    session = GenerativeSession(folder, RuntimeOptions(intra_op_threads=1))
    ids = session.chat_prompt_ids(messages)
    with session.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)) as gen:
        return "".join(token.text for token in gen)


def _receipt(
    client: Any, chunks: list[Any], messages: list[dict[str, str]], answer: str, scratch: Path
) -> bool | None:
    """The streamed answer's receipt (on its last chunk): checked by the client against the
    attested key and the prompt and answer it sent and got, saved as a transcript, then
    verified offline by `blindinfer verify-receipt` as a third party would. None where the
    server sends no receipt."""
    last = next((c for c in reversed(chunks) if "receipt" in (c.model_extra or {})), None)
    if last is None or not hasattr(client, "verify_generation"):
        _say("8. receipt: none in this stream (this server does not sign generations)")
        return None
    try:
        receipt = client.verify_generation(last, messages=messages, output=answer)
    except BlindInferError as exc:
        _say(f"8. receipt of the streamed answer: REFUSED: {exc}")
        return False
    proof = scratch / "receipt.json"
    receipt.save(proof)
    command = [sys.executable, "-m", "blindinfer.cli.main", "verify-receipt", str(proof),
               "--policy", str(scratch / "policy.toml"), "--simulation"]  # fmt: skip
    offline = subprocess.run(command, capture_output=True, text=True, check=False)
    verdict = (offline.stdout.splitlines() or [offline.stderr.strip()])[0]
    _say("8. receipt of the streamed answer: signed by the attested key; prompt and answer match")
    _say("   offline (`blindinfer verify-receipt` on the saved transcript): " + (
        "VALID" if offline.returncode == 0 else verdict[:200]))  # fmt: skip
    return offline.returncode == 0
