"""GGUF file -> plain Hugging Face model folder, the input onnxruntime-genai's builder takes.

Run by `blindinfer convert` as a child process (`python -m blindinfer.client.gguf_to_hf GGUF
DIR`), so that torch, transformers and the dequantized weights never live in the CLI's
process and their progress bars and warnings go to the conversion log, not the terminal.

transformers loads a GGUF with `from_pretrained(dir, gguf_file=name)` and dequantizes it to
fp32, but refuses `save_pretrained` on a model "quantized with gguf": the weights are copied
into a fresh model of the same class whose config has no `quantization_config`, and that is
saved, with the tokenizer and chat template embedded in the GGUF.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def export(gguf: Path, out: Path) -> None:
    """Writes config.json, model.safetensors and the tokenizer files of `gguf` into `out`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    model_class = type(loaded)
    del loaded
    plain = model_class(config)  # same class, same shapes: every weight is overwritten below
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if unexpected or [key for key in missing if not key.endswith("lm_head.weight")]:
        raise SystemExit(
            f"the GGUF's weights do not fit {model_class.__name__} "
            f"({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m blindinfer.client.gguf_to_hf GGUF_FILE OUT_DIR")
    export(Path(sys.argv[1]), Path(sys.argv[2]))
