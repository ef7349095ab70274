"""What the client learns about models from the server."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blindinfer.client.receipts import Receipt


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model_id: str
    name: str
    sha256: str
    size: int
    owner: str = ""
    shared_with: tuple[str, ...] = ()
    receipt: Receipt | None = field(default=None, compare=False)
    """The verified upload or delete receipt, when one was asked for."""
    kind: str = "tensor"
    """"tensor" (an ONNX file) or "generative" (an onnxruntime-genai folder)."""

    @classmethod
    def from_json(cls, document: Any) -> ModelInfo:
        return cls(
            model_id=str(document["model_id"]),
            name=str(document["name"]),
            sha256=str(document["sha256"]),
            size=int(document["size"]),
            owner=str(document.get("owner", "")),
            shared_with=tuple(str(t) for t in document.get("shared_with", ())),
            kind=str(document.get("kind", "tensor")),
        )


@dataclass(frozen=True, slots=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelMetadata:
    name: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]

    @classmethod
    def from_json(cls, document: Any) -> ModelMetadata:
        def specs(items: Any) -> tuple[TensorMetadata, ...]:
            return tuple(
                TensorMetadata(
                    str(i["name"]), str(i["datatype"]), tuple(int(d) for d in i["shape"])
                )
                for i in items
            )

        return cls(str(document["name"]), specs(document["inputs"]), specs(document["outputs"]))
