"""Explicit bounds for parsing untrusted tensor messages.

Every number here caps work or memory an attacker could otherwise make us spend before a
single model op runs; the parser checks them before it allocates. The server passes its
own request size limit as `max_total_bytes`; the client uses the defaults for responses.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TensorLimits"]

_MAX_INTP = (1 << 63) - 1
_NUMPY_MAX_DIMS = 64


@dataclass(frozen=True, slots=True)
class TensorLimits:
    """Bounds applied to one inference message (request or response).

    max_tensors: inputs (or outputs, or requested outputs) per message.
    max_rank: dimensions per tensor.
    max_elements: elements per tensor, and the bound on any single dimension.
    max_total_bytes: decoded tensor bytes over the whole message (binary and JSON).
    max_name_length: characters in a tensor name, request id or model name/version.
    max_header_bytes: bytes of JSON (the JSON header, or the whole pure-JSON body).
    """

    max_tensors: int = 64
    max_rank: int = 16
    max_elements: int = 1 << 28
    max_total_bytes: int = 1 << 30
    max_name_length: int = 256
    max_header_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        """Reject nonsense configuration early: limits are trusted, but must be coherent."""
        for field in (
            "max_tensors",
            "max_rank",
            "max_elements",
            "max_total_bytes",
            "max_name_length",
            "max_header_bytes",
        ):
            value = getattr(self, field)
            if type(value) is not int or not 1 <= value <= _MAX_INTP:
                raise ValueError(f"TensorLimits.{field} must be a positive int, got {value!r}")
        if self.max_rank > _NUMPY_MAX_DIMS:
            raise ValueError(f"TensorLimits.max_rank cannot exceed numpy's {_NUMPY_MAX_DIMS}")
