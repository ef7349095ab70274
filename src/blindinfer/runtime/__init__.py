"""Model execution: onnxruntime sessions and the typed signatures of loaded models."""
