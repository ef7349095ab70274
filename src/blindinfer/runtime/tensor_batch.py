"""Dynamic batching of tensor runs (`serve --max-tensor-batch N`): which queued runs may
share one onnxruntime run, how their inputs are joined and how the outputs are split.

Opt-in, and only where it cannot change an answer's shape or mix tenants: runs of the same
model AND the same tenant (a hostile shared model could copy one request's rows into
another's outputs), with the same input names, dtypes and non-batch dimensions, the same
requested outputs and output encoding, where the model declares axis 0 of every input and
of every requested output dynamic. Inputs are concatenated along axis 0; every output
must come back with exactly the total row count on axis 0, or the batch is not trusted
and each run is done again alone (`WorkerPool`): nothing here ever guesses a split. Each
request gets a copy of its rows, never a view into a buffer another request also holds.

Rows are assumed independent, as in any dynamic batcher (Triton's): a model whose row i
depends on other rows (a reduction over axis 0) answers differently when batched, which
is why this is off by default and never crosses tenants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from blindinfer.runtime.signature import ModelSignature

Array = npt.NDArray[Any]


def batch_outputs(signature: ModelSignature) -> frozenset[str] | None:
    """The outputs whose axis 0 the model declares dynamic, or None when any input's is
    not (or an input has no axis 0): such a model is never batched."""
    if not signature.inputs or any(
        not spec.shape or spec.shape[0] != -1 for spec in signature.inputs
    ):
        return None
    return frozenset(spec.name for spec in signature.outputs if spec.shape and spec.shape[0] == -1)


def rows(arrays: Mapping[str, Array]) -> int | None:
    """The request's row count: axis 0, the same in every input; None if it has none."""
    counts = {int(array.shape[0]) if array.ndim else -1 for array in arrays.values()}
    if len(counts) != 1:
        return None
    (count,) = counts
    return count if count >= 1 else None


@dataclass(eq=False, slots=True)
class TensorRun:
    """One queued run that may join a batch: from `WorkerPool.submit` until its future is
    resolved. `claimed`: taken by a turn (its own or a batch's leader's)."""

    model_key: str
    tenant: str
    arrays: dict[str, Array]
    header: dict[str, Any]
    rows: int
    nbytes: int
    key: tuple[Any, ...]
    future: Future[dict[str, Array]] = field(default_factory=Future)
    claimed: bool = False


def new_run(
    model_key: str,
    tenant: str,
    arrays: dict[str, Array],
    header: dict[str, Any],
    outputs: Sequence[str] | None,
    dynamic_outputs: frozenset[str],
) -> TensorRun | None:
    """A batchable run, or None if this request must run alone (no common row count, or
    a requested output whose axis 0 is not dynamic; unnamed outputs: all must be)."""
    count = rows(arrays)
    if count is None or not arrays:
        return None
    if outputs is not None and not set(outputs) <= dynamic_outputs:
        return None
    shapes = tuple(
        (name, array.dtype.str, tuple(array.shape[1:])) for name, array in sorted(arrays.items())
    )
    wanted = tuple(outputs) if outputs is not None else None
    key = (model_key, tenant, shapes, wanted, repr(header.get("encoding")))
    nbytes = sum(int(array.nbytes) for array in arrays.values())
    return TensorRun(model_key, tenant, arrays, header, count, nbytes, key)


def joined(runs: Sequence[TensorRun]) -> dict[str, Array]:
    """The batch's inputs: each input's rows, run after run, along axis 0."""
    names = list(runs[0].arrays)
    return {name: np.concatenate([run.arrays[name] for run in runs], axis=0) for name in names}


def split(
    outputs: Mapping[str, Array], counts: Sequence[int], expected: frozenset[str] | None
) -> list[dict[str, Array]] | None:
    """Each run's own rows of every output (copies), or None when the outputs do not have
    exactly the total row count on axis 0, or are not the dynamic ones the model declared
    (`expected`; None: any): the batch is then done again run by run, never guessed."""
    total = sum(counts)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            return None
        if expected is not None and name not in expected:
            return None
    parts: list[dict[str, Array]] = []
    start = 0
    for count in counts:
        parts.append({name: array[start : start + count].copy() for name, array in outputs.items()})
        start += count
    return parts
