"""A tiny random Llama-style model, built in seconds, for the generative runtime's tests.

Why not a real model: the fast tests must not download anything and must run in seconds on
two shared cores. A random 2-layer Llama with a byte-level BPE tokenizer trained here on the
repository's own text exercises exactly the same code paths as SmolLM2 (the same
architecture family, the same ChatML template, the same onnxruntime-genai builder), and
greedy decoding of random weights is still deterministic, which is all exactness tests need.

`build_hf_model(dir)` writes the Hugging Face folder (config, safetensors, tokenizer,
tokenizer_config with a chat template); `build_genai_model(hf_dir, out)` converts it with
onnxruntime-genai's model builder, as `blindinfer convert` will, in a subprocess of the
same interpreter (the builder is a script; it runs offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 384
MAX_POSITIONS = 256
SEED = 1234

# SmolLM2-Instruct's template (ChatML), without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _training_text() -> list[str]:
    """Local text to train the tokenizer on: a frozen corpus (tests/assets/tiny-llm), so
    that editing the docs never changes the tokenizer or a token id a test sees."""
    return [(ROOT / "tests" / "assets" / "tiny-llm" / "corpus.txt").read_text(encoding="utf-8")]


def build_tokenizer(out: Path) -> None:
    """Train a byte-level BPE tokenizer of VOCAB_SIZE tokens and save it into `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}),
        encoding="utf-8",
    )


def build_hf_model(
    out: Path, *, max_positions: int = MAX_POSITIONS, hidden_size: int = 64, layers: int = 2
) -> Path:
    """Write the tiny Hugging Face model folder (random weights, fixed seed) into `out`;
    a longer context and a larger size (slower tokens) let a test hold a generation running."""
    import torch
    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tok.token_to_id("<|im_start|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|im_end|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    # Random init is tiny (std 0.02): scale it up so logits differ clearly between tokens and
    # greedy decoding does not hinge on float rounding between runtimes.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    model.eval()  # type: ignore[no-untyped-call]
    model.save_pretrained(out)
    _flatten_rope(out / "config.json")
    return out


def _flatten_rope(config_path: Path) -> None:
    """Write RoPE settings in the flat form the og 0.18 builder reads (transformers 5 nests them
    in `rope_parameters`, which some builder paths do not understand)."""
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") == "default":
            cfg["rope_scaling"] = None
    config_path.write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def build_genai_model(hf_dir: Path, out: Path, *, precision: str = "fp32") -> Path:
    """Convert `hf_dir` into an onnxruntime-genai folder `out` with og's model builder."""
    out.mkdir(parents=True, exist_ok=True)
    cache = out.parent / (out.name + ".builder-cache")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
           "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    if done.returncode != 0 or not (out / "genai_config.json").is_file():
        raise RuntimeError(f"og model builder failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return out


def build_tiny_llm(
    root: Path, *, max_positions: int = MAX_POSITIONS, hidden_size: int = 64, layers: int = 2
) -> tuple[Path, Path]:
    """Both folders under `root`: (Hugging Face folder, onnxruntime-genai folder)."""
    hf = build_hf_model(
        root / "hf", max_positions=max_positions, hidden_size=hidden_size, layers=layers
    )
    return hf, build_genai_model(hf, root / "genai")


if __name__ == "__main__":
    print(build_tiny_llm(Path(sys.argv[1])))
