"""A loaded ONNX model: one onnxruntime session, its signature, and checked execution.

Sessions are created from bytes in memory. Models that reference external data files are
refused before onnxruntime sees them, so a model can never make the server read a file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from blindinfer.protocol.datatypes import dtype_to_datatype, onnx_to_datatype
from blindinfer.runtime.device import Device, check_active, ort_providers, prepare_session
from blindinfer.runtime.errors import InvalidModelError, InvalidTensorError
from blindinfer.runtime.external_data import refuse_external_data
from blindinfer.runtime.signature import ModelSignature, TensorSpec


def _spec(arg: ort.NodeArg) -> TensorSpec:
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or ()))
    try:
        datatype = onnx_to_datatype(arg.type)
    except Exception as exc:  # any unsupported type names the tensor
        raise InvalidModelError(
            f"tensor {arg.name!r} has type {arg.type}, which blindinfer does not serve"
        ) from exc
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)


def session_options(
    *,
    intra_op_threads: int = 0,
    device: Device = "cpu",
    gpu_mem_limit: int | None = None,
    spin_us: int | None = None,
) -> ort.SessionOptions:
    """The options of every session the server creates (ModelSession); one function so
    that benchmarks (bench/bench_ort_settings.py) measure exactly what the workers run."""
    options = ort.SessionOptions()
    prepare_session(options, device, gpu_mem_limit)
    options.intra_op_num_threads = intra_op_threads
    if spin_us is not None and spin_us < 0:
        raise ValueError(f"spin_us must not be negative, got {spin_us}")
    if spin_us == 0:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    elif spin_us is not None:
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
    # No arena: tensors are freed after each run instead of kept at their peak, so a
    # loaded model costs what was measured when it loaded, not its largest request. (An
    # arena shrunk after every run, `memory.enable_memory_arena_shrinkage`, still keeps its
    # first region, sized by the first run: docs/performance.md, "onnxruntime settings in
    # the worker"; tests/unit/test_worker_arena_memory.py holds the rule.)
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 4  # fatal only: onnxruntime errors quote node names
    return options


class ModelSession:
    """An onnxruntime session that only ever runs on inputs matching its signature."""

    def __init__(
        self,
        model_bytes: bytes,
        *,
        intra_op_threads: int = 0,
        device: Device = "cpu",
        gpu_mem_limit: int | None = None,
        external_data_refused: bool = False,
        spin_us: int | None = None,
    ) -> None:
        """`device` and `gpu_mem_limit`: runtime/device.py (the server's choice, never the
        model's); a session meant for CUDA that comes up without it raises.
        `external_data_refused`: the caller has just run `refuse_external_data` on these
        same (immutable) bytes, so parsing all of them once more is skipped (~60 ms for
        128 MiB: docs/performance.md).
        `spin_us`: how long onnxruntime's pool threads busy-wait for the next operator
        before they sleep (None: onnxruntime's default; 0: never); the server's workers
        cap it (WorkerPool, --intra-op-spin-us)."""
        if not external_data_refused:
            refuse_external_data(model_bytes)
        options = session_options(
            intra_op_threads=intra_op_threads,
            device=device,
            gpu_mem_limit=gpu_mem_limit,
            spin_us=spin_us,
        )
        try:
            self._session = ort.InferenceSession(
                model_bytes,
                sess_options=options,
                providers=ort_providers(device, gpu_mem_limit),
            )
        except Exception as exc:
            raise InvalidModelError(
                "onnxruntime cannot load this model: " + _first_line(str(exc))
            ) from exc
        # onnxruntime's Python wrapper keeps the serialized model (`_model_bytes`) for the
        # session's lifetime, only to rebuild it when an accelerator provider fails: with
        # the CPU provider alone that never happens, and it doubles every model's memory.
        # On CUDA the rebuild would be the silent CPU fallback: refused as well.
        self._session.disable_fallback()
        check_active(self._session, device)
        if getattr(self._session, "_model_bytes", None) is not None:
            self._session._model_bytes = None
        self.signature = ModelSignature(
            inputs=tuple(_spec(arg) for arg in self._session.get_inputs()),
            outputs=tuple(_spec(arg) for arg in self._session.get_outputs()),
        )
        # Read on every run: built once (a run of a small model is a few microseconds, and
        # rebuilding these was a sizeable part of the worker's own time; docs/performance.md,
        # "Session 2026-12-07: fixed cost").
        self._input_names = frozenset(spec.name for spec in self.signature.inputs)
        self._output_names = self.signature.output_names
        self._known_outputs = frozenset(self._output_names)

    def run(
        self, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Runs the model after checking names, dtypes and shapes against the signature."""
        self._check_inputs(inputs)
        names = list(outputs) if outputs else list(self._output_names)
        unknown = [n for n in names if n not in self._known_outputs]
        if unknown:
            raise InvalidTensorError(
                "unknown_output",
                f"the model has no output named {unknown[0]!r}; "
                f"outputs are {list(self.signature.output_names)}",
            )
        native = {name: _native_byte_order(array) for name, array in inputs.items()}
        try:
            results = self._session.run(names, native)
        except Exception as exc:
            raise InvalidTensorError(
                "inference_failed", "onnxruntime refused these inputs: " + _first_line(str(exc))
            ) from exc
        return {name: np.asarray(value) for name, value in zip(names, results, strict=True)}

    def _check_inputs(self, inputs: Mapping[str, np.ndarray]) -> None:
        expected = self._input_names
        if inputs.keys() != expected:  # the names, as a set: one comparison when they match
            missing = sorted(expected - inputs.keys())
            extra = sorted(inputs.keys() - expected)
            raise InvalidTensorError(
                "wrong_inputs",
                f"the model takes inputs {sorted(expected)}; missing {missing}, unexpected {extra}",
            )
        for spec in self.signature.inputs:
            array = inputs[spec.name]
            got = dtype_to_datatype(array.dtype)
            if got != spec.datatype:
                raise InvalidTensorError(
                    "wrong_datatype",
                    f"input {spec.name!r} must be {spec.datatype}, got {got}",
                )
            if not spec.accepts_shape(tuple(array.shape)):
                raise InvalidTensorError(
                    "wrong_shape",
                    f"input {spec.name!r} must have shape {list(spec.shape)} "
                    f"(-1 = any), got {list(array.shape)}",
                )


def _native_byte_order(array: np.ndarray) -> np.ndarray:
    """onnxruntime reads raw buffers in native order; a big-endian array must be converted."""
    if array.dtype.byteorder in ("=", "|"):
        return array
    return array.astype(array.dtype.newbyteorder("="))


def _first_line(text: str) -> str:
    """onnxruntime messages can be long; keep the first line, bounded."""
    line = text.strip().splitlines()[0] if text.strip() else "unknown error"
    return line[:300]
