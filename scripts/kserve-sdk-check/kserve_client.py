"""Runs in the KServe SDK's own virtualenv: live, ready, model ready, one binary infer
through the proxy's plaintext gRPC listener; prints the feed and the outputs as JSON."""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

TYPES = {
    "tensor(float)": ("FP32", "float32"),
    "tensor(int64)": ("INT64", "int64"),
    "tensor(bool)": ("BOOL", "bool"),
}


async def main(spec: dict) -> None:
    client = InferenceGRPCClient(f"127.0.0.1:{spec['port']}")
    live, ready = await client.is_server_live(), await client.is_server_ready()
    model_ready = await client.is_model_ready(spec["model"])
    print(f"KServe SDK: live {live}, ready {ready}, model ready {model_ready}", file=sys.stderr)
    rng = np.random.default_rng(1)
    inputs, feed = [], {}
    for name, (onnx_type, shape) in spec["inputs"].items():
        datatype, dtype = TYPES[onnx_type]
        if dtype == "bool":
            array = rng.integers(0, 2, shape).astype(bool)
        else:
            array = (rng.standard_normal(shape) * 3).astype(dtype)
        tensor = InferInput(name=name, shape=list(shape), datatype=datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        inputs.append(tensor)
        feed[name] = [array.ravel().tolist(), dtype, list(shape)]
    request = InferRequest(model_name=spec["model"], infer_inputs=inputs, request_id="1")
    result = await client.infer(request)
    out = {}
    for output in result.outputs:
        array = output.as_numpy()
        out[output.name] = [array.ravel().tolist(), str(array.dtype), list(array.shape)]
    print(json.dumps({"feed": feed, "out": out}))
    assert live and ready and model_ready


asyncio.run(main(json.loads(sys.argv[1])))
