"""What a loaded model accepts and returns, as the wire protocol names it."""

from __future__ import annotations

from dataclasses import dataclass

Dim = int | str  # a fixed size, or the name of a dynamic axis


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One named input or output: OIP datatype and shape (-1 for a dynamic axis)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.shape):
            return False
        return all(want in (-1, got) for want, got in zip(self.shape, shape, strict=True))


@dataclass(frozen=True, slots=True)
class ModelSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec | None:
        return next((spec for spec in self.inputs if spec.name == name), None)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.outputs)
