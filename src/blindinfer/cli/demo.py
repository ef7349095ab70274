"""`blindinfer demo`: the whole flow on a fresh machine, in about a second.

It measures the server code the way a user would pin it, starts a simulation server in
its own process, connects with that policy (simulation explicitly accepted), uploads a
small real ONNX classifier, runs it, checks the result against onnxruntime in-process,
deletes the model and stops the server.
"""

from __future__ import annotations

import warnings

import numpy as np

from blindinfer.attestation.policy import Policy, SgxPolicy
from blindinfer.cli.demo_model import demo_input, demo_model
from blindinfer.client.client import SIMULATION_BANNER, connect
from blindinfer.errors import SimulationWarning
from blindinfer.server.config import ServerConfig
from blindinfer.server.platforms import simulated_mrenclave
from blindinfer.server.process import start_server
from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER


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
    print("1. measured this server build: mrenclave", mrenclave.hex())
    with start_server(["--simulation"]) as server:
        print(f"2. started a SIMULATION server at {server.url}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SimulationWarning)  # printed once, here
            print(SIMULATION_BANNER)
            client = connect(server.url, policy=policy, simulation=True)
        with client:
            print("3. attestation verified (fresh nonce, TLS key bound, policy satisfied):")
            print(client.attestation.summary())
            model = client.upload_model(demo_model(), name="demo-classifier")
            print(f"4. uploaded {model.name}: model_id {model.model_id}, sha256 {model.sha256}")
            inputs = demo_input()
            outputs = client.run_model(model.model_id, inputs)
            print("5. inference over the attested channel:")
            for name, value in outputs.items():
                print(f"   {name} = {np.array2string(value, precision=4)}")
            expected = _in_process(demo_model(), inputs)
            same = all(np.array_equal(outputs[k], expected[k]) for k in expected)
            print(f"   bit-identical to onnxruntime in-process: {same}")
            client.delete_model(model.model_id)
            print(f"6. deleted {model.model_id}; models left: {len(client.list_models())}")
    print("7. server stopped")
    return 0 if same else 1


def _in_process(model: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))
