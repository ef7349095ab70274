"""`blindinfer demo`: the whole flow on a fresh machine, in about a second.

It measures the server code the way a user would pin it, starts a simulation server in
its own process, connects with that policy (simulation explicitly accepted), uploads a
small real ONNX classifier, runs it, checks the result against onnxruntime in-process,
deletes the model, stops the server, and ends with a summary: what was verified, and
what a simulation server cannot prove.
"""

from __future__ import annotations

import warnings

import numpy as np

from blindinfer.attestation.intel.sgx_policy import SgxPolicy
from blindinfer.attestation.policy import Policy
from blindinfer.attestation.report import VerifiedAttestation
from blindinfer.cli.demo_model import demo_input, demo_model
from blindinfer.client.client import SIMULATION_BANNER, connect
from blindinfer.errors import SimulationWarning
from blindinfer.server.config import ServerConfig
from blindinfer.server.platforms import simulated_mrenclave
from blindinfer.server.process import start_server
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER


def _say(*parts: object) -> None:
    # Flushed, so that the lines keep their order next to the server's own (stderr)
    # messages when the output goes to a pipe or a CI log.
    print(*parts, flush=True)


def run_demo() -> int:
    mrenclave = simulated_mrenclave(ServerConfig(simulation=True))
    policy = Policy(
        sgx=SgxPolicy(
            mrenclave=(mrenclave,),
            mrsigner=(SIMULATION_MRSIGNER,),
            isvprodid=(1,),
            min_isvsvn=1,
        )
    )
    _say("1. measured this server build: mrenclave", mrenclave.hex())
    with start_server(["--simulation"]) as server:
        _say(f"2. started a SIMULATION server at {server.url}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)  # printed once, here
            _say(SIMULATION_BANNER)
            client = connect(server.url, policy=policy, simulation=True)
        with client:
            report = client.attestation
            _say("3. attestation verified (fresh nonce, TLS key bound, policy satisfied):")
            _say(report.summary())
            model = client.upload_model(demo_model(), name="demo-classifier")
            _say(f"4. uploaded {model.name}: model_id {model.model_id}, sha256 {model.sha256}")
            inputs = demo_input()
            outputs = client.run_model(model.model_id, inputs)
            _say("5. inference over the attested channel:")
            for name, value in outputs.items():
                _say(f"   {name} = {np.array2string(value, precision=4)}")
            expected = _in_process(demo_model(), inputs)
            same = set(outputs) == set(expected) and all(
                np.array_equal(outputs[k], expected[k]) for k in expected
            )
            _say(f"   bit-identical to onnxruntime in-process: {same}")
            client.delete_model(model.model_id)
            left = client.list_models()
            deleted = all(m.model_id != model.model_id for m in left)
            _say(f"6. deleted {model.model_id}; models left: {len(left)}")
    _say("7. server stopped")
    _say()
    _say("\n".join(summary(report, bit_exact=same, deleted=deleted)))
    return 0 if same and deleted else 1


def summary(report: VerifiedAttestation, *, bit_exact: bool, deleted: bool) -> list[str]:
    """The demo's closing lines: what was checked, and what simulation cannot prove.

    The attestation lines hold because `connect()` returned: each of those checks raises
    otherwise, and nothing would have been sent.
    """
    return [
        "Verified (connect() refuses the server if any attestation check fails):",
        f"  - the quote's signature chain ends at the pinned root: {report.root}",
        "  - the quote binds the TLS certificate's key this connection uses (report_data[0:32])",
        "  - the quote answers the fresh nonce this client drew (report_data[32:64])",
        f"  - the measurement equals the policy: mrenclave {report.mrenclave.hex()[:16]}..."
        " as measured in step 1",
        f"  - inference is bit-exact with onnxruntime in-process: {'yes' if bit_exact else 'NO'}",
        f"  - the model was deleted from the server: {'yes' if deleted else 'NO'}",
        "NOT proven, because this is a simulation:",
        "  - there is no TEE: the server's operator can read its memory, your model and inputs",
        "  - the simulation root is not Intel's: anyone can sign quotes with its shipped key",
        "  - a real deployment needs TEE hardware and a policy from a measured build",
        "    (docs/deploy-gramine-sgx.md, docs/deploy-tdx-snp.md)",
    ]


def _in_process(model: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))
