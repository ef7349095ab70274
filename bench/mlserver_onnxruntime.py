"""A minimal MLServer runtime that serves an ONNX model with onnxruntime.

MLServer (Seldon) ships runtimes for scikit-learn, XGBoost, MLflow, Hugging Face ... but none
for ONNX, so the peer of bench/bench_inference.py needs this one: what a user writing their
own runtime would write, following MLServer's custom-runtime guide (an `MLModel` subclass,
the NumPy codec for tensors). It runs inside MLServer's own virtualenv
(bench/requirements-mlserver.txt), never in .venv: `mlserver` is not importable there.

The session uses onnxruntime's defaults, like the in-process baseline of the benchmark.
"""

from __future__ import annotations

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):  # type: ignore[misc]  # mlserver is untyped for mypy here
    """One onnxruntime InferenceSession; every input decoded with the NumPy codec."""

    async def load(self) -> bool:
        path = await get_model_uri(self._settings)
        self._session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self._outputs = [output.name for output in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {item.name: NumpyCodec.decode_input(item) for item in payload.inputs}
        wanted = [item.name for item in payload.outputs or []] or self._outputs
        results = self._session.run(wanted, feed)
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[
                NumpyCodec.encode_output(name, array)
                for name, array in zip(wanted, results, strict=True)
            ],
        )
