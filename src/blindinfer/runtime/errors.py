"""Errors of model loading and execution; the server maps them to 400s."""

from __future__ import annotations

from blindinfer.errors import BlindInferError


class InvalidModelError(BlindInferError):
    """The uploaded bytes are not a model blindinfer can serve."""


class InvalidTensorError(BlindInferError):
    """Inputs that do not match the model's signature, or that onnxruntime refused."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")
