"""The generative runtime on a real (tiny, random) onnxruntime-genai model: exactness against
onnxruntime-genai itself and transformers, reproducible sampling, every bound, the server's
session options over the model's, and cancellation."""

from __future__ import annotations

import gc
import json
import re
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blindinfer.protocol.genai_config import session_options
from blindinfer.protocol.generation import SamplingParams
from blindinfer.protocol.model_archive import MAX_CONFIG_BYTES
from blindinfer.runtime.errors import (
    ContextLengthError,
    GenerationRequestError,
    InvalidModelError,
    InvalidTensorError,
)
from blindinfer.runtime.generative import GenerativeSession, RuntimeOptions

og = pytest.importorskip("onnxruntime_genai")

MESSAGES = [{"role": "user", "content": "What does blindinfer attest?"}]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


@pytest.fixture(scope="module")
def folder(tiny_llm: tuple[Path, Path]) -> Path:
    return tiny_llm[1]


@pytest.fixture(scope="module")
def session(folder: Path) -> GenerativeSession:
    return GenerativeSession(folder, RuntimeOptions(intra_op_threads=1, max_context_tokens=200))


@pytest.fixture(scope="module")
def prompt(session: GenerativeSession) -> list[int]:
    return session.chat_prompt_ids(MESSAGES)


def _og_greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    """onnxruntime-genai used directly, as its examples do."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    out: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def test_greedy_is_token_identical_to_onnxruntime_genai(
    session: GenerativeSession, folder: Path, prompt: list[int]
) -> None:
    generation = session.generate(prompt, GREEDY)
    ours = [t.token_id for t in generation]
    assert ours == _og_greedy(folder, prompt, GREEDY.max_tokens)
    assert len(ours) == GREEDY.max_tokens


def test_greedy_is_token_identical_to_transformers(
    session: GenerativeSession, tiny_llm: tuple[Path, Path], prompt: list[int]
) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llm[0], dtype=torch.float32)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=GREEDY.max_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    theirs = out[0, len(prompt) :].tolist()
    ours = [t.token_id for t in session.generate(prompt, GREEDY)]
    assert ours == theirs


def test_chat_template_renders_chatml(session: GenerativeSession) -> None:
    text = session.render_chat(MESSAGES)
    assert text == (
        "<|im_start|>user\nWhat does blindinfer attest?<|im_end|>\n<|im_start|>assistant\n"
    )
    # The rendered template holds the special tokens as single ids; nothing is added.
    ids = session.encode(text)
    (im_start,) = session.encode("<|im_start|>")
    (im_end,) = session.encode("<|im_end|>")
    assert ids[0] == im_start
    assert (ids.count(im_start), ids.count(im_end)) == (2, 1)


def test_text_pieces_concatenate_to_the_decoded_output(
    session: GenerativeSession, prompt: list[int]
) -> None:
    tokens = list(session.generate(prompt, GREEDY))
    assert "".join(t.text for t in tokens) == session.decode([t.token_id for t in tokens])


def test_sampling_with_a_seed_is_reproducible(
    session: GenerativeSession, prompt: list[int]
) -> None:
    def run(seed: int) -> list[int]:
        params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=seed)
        return [t.token_id for t in session.generate(prompt, params)]

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    assert first != [t.token_id for t in session.generate(prompt, GREEDY)]


def test_max_tokens_ends_with_length_and_exact_count(
    session: GenerativeSession, prompt: list[int]
) -> None:
    for n in (1, 5):
        generation = session.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0))
        assert len(list(generation)) == n
        assert generation.finish_reason == "length"
        assert generation.completion_tokens == n
        assert generation.prompt_tokens == len(prompt)
        assert generation.closed


def test_stop_token_ends_with_stop(session: GenerativeSession, prompt: list[int]) -> None:
    greedy = [t.token_id for t in session.generate(prompt, GREEDY)]
    stop_id = greedy[2]
    first = greedy.index(stop_id)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    generation = session.generate(prompt, params, stop_token_ids=(stop_id,))
    tokens = list(generation)
    assert [t.token_id for t in tokens] == greedy[: first + 1]
    assert tokens[-1].text == ""  # the stop token's text is not part of the answer
    assert generation.finish_reason == "stop"
    assert generation.completion_tokens == first + 1


def test_stop_string_cuts_the_text(session: GenerativeSession, prompt: list[int]) -> None:
    greedy = list(session.generate(prompt, GREEDY))
    full = "".join(t.text for t in greedy)
    stop = full[3:6]
    assert stop.strip()
    generation = session.generate(
        prompt, SamplingParams(max_tokens=24, temperature=0.0, stop=(stop,))
    )
    text = "".join(t.text for t in generation)
    assert text == full[: full.index(stop)]
    assert generation.finish_reason == "stop"
    assert generation.completion_tokens < len(greedy)


def test_context_bound_is_refused_before_generating(
    session: GenerativeSession, prompt: list[int]
) -> None:
    # The server limit (200) is below the model's context (256): it is the one that binds.
    assert session.max_total_tokens == 200
    with pytest.raises(ContextLengthError) as info:
        session.generate(prompt, SamplingParams(max_tokens=201 - len(prompt)))
    assert info.value.code == "context_length_exceeded"
    assert (info.value.needed, info.value.limit) == (201, 200)
    assert isinstance(info.value, InvalidTensorError)  # answered 400 with its code
    # Exactly at the limit is allowed.
    session.check(prompt, SamplingParams(max_tokens=200 - len(prompt)))
    # A long prompt alone hits it too.
    with pytest.raises(ContextLengthError):
        session.generate(prompt * 20, SamplingParams(max_tokens=1))


@pytest.mark.parametrize(
    ("prompt_ids", "params", "stop_ids", "code"),
    [
        ([], SamplingParams(16), (), "empty_prompt"),
        ([1, 10**6], SamplingParams(16), (), "invalid_token_id"),
        ([1, -1], SamplingParams(16), (), "invalid_token_id"),
        ([1, 5], SamplingParams(max_tokens=10**9), (), "invalid_max_tokens"),
        ([1, 5], SamplingParams(16), (10**6,), "invalid_stop"),
        ([1, 5], SamplingParams(16), (-1,), "invalid_stop"),
    ],
)
def test_bad_requests_are_refused_with_a_code(
    session: GenerativeSession,
    prompt_ids: list[int],
    params: SamplingParams,
    stop_ids: tuple[int, ...],
    code: str,
) -> None:
    """What depends on the model (vocabulary, context) and the server's limits."""
    with pytest.raises(GenerationRequestError) as info:
        session.generate(prompt_ids, params, stop_token_ids=stop_ids)
    assert info.value.code == code


@pytest.mark.parametrize(
    "fields",
    [
        {"max_tokens": 0},
        {"max_tokens": True},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": 2.5},
        {"top_p": 0.0},
        {"top_k": -1},
        {"seed": -3},
        {"seed": 1 << 31},
        {"stop": ("",)},
        {"stop": ("a", "b", "c", "d", "e")},
    ],
)
def test_sampling_params_the_runtime_gets_are_bounded_by_construction(
    fields: dict[str, Any],
) -> None:
    """The one SamplingParams type (parsed from the wire) holds its invariants for values
    built in code too, so the runtime never hands og NaN, a negative seed or an empty stop."""
    with pytest.raises(ValueError, match=f"^{next(iter(fields))} must"):
        SamplingParams(**{"max_tokens": 16, **fields})


def test_top_k_above_the_vocabulary_is_clamped(
    session: GenerativeSession, prompt: list[int]
) -> None:
    params = SamplingParams(max_tokens=4, temperature=0.7, top_k=10**6, seed=3)
    assert session.top_k(params) == session.vocab_size
    clamped = SamplingParams(max_tokens=4, temperature=0.7, top_k=session.vocab_size, seed=3)
    assert [t.token_id for t in session.generate(prompt, params)] == [
        t.token_id for t in session.generate(prompt, clamped)
    ]


def _hostile_copy(folder: Path, tmp_path: Path, edit: dict[str, object]) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"].update(edit)
    (copy / "genai_config.json").write_text(json.dumps(config))
    return copy


def test_model_cannot_choose_threads_providers_or_profiling(
    folder: Path, tmp_path: Path, prompt: list[int]
) -> None:
    hostile = _hostile_copy(
        folder,
        tmp_path,
        {
            "intra_op_num_threads": 64,
            "inter_op_num_threads": 16,
            "session.intra_op.allow_spinning": "1",
            "session.inter_op.allow_spinning": "1",
            "enable_profiling": str(tmp_path / "profile"),
            "provider_options": [{"cuda": {"device_id": "3"}}],
        },
    )
    session = GenerativeSession(hostile, RuntimeOptions(intra_op_threads=2))
    rendered = json.loads(session.rendered_config)
    used = rendered["model"]["decoder"]["session_options"]
    assert used == session_options(intra_op_threads=2)
    assert (used["intra_op_num_threads"], used["inter_op_num_threads"]) == (2, 1)
    assert used["session.intra_op.allow_spinning"] == "0"
    assert used["session.inter_op.allow_spinning"] == "0"
    assert used["provider_options"] == []  # CPU
    assert str(tmp_path) not in session.rendered_config.decode()
    # The model's search defaults are replaced by neutral ones (each request sets its own).
    assert rendered["search"]["top_k"] == 0
    assert rendered["search"]["max_length"] == session.max_total_tokens
    # It loads with the server's options and generates as the original.
    assert [t.token_id for t in session.generate(prompt, GREEDY)] == _og_greedy(
        folder, prompt, GREEDY.max_tokens
    )
    assert not list(tmp_path.glob("profile*"))  # no profiling file was written


def test_model_cannot_load_a_library(folder: Path, tmp_path: Path) -> None:
    hostile = _hostile_copy(folder, tmp_path, {"custom_ops_library": str(tmp_path / "evil.so")})
    # Read as-is, onnxruntime-genai obeys the model: it tries to load the library.
    with pytest.raises(RuntimeError, match=r"evil\.so"):
        og.Model(str(hostile))
    with pytest.raises(InvalidModelError, match=r"session_options\.custom_ops_library") as info:
        GenerativeSession(hostile, RuntimeOptions())
    assert "evil" not in str(info.value)


def _decoder(config: dict[str, Any]) -> dict[str, Any]:
    decoder: dict[str, Any] = config["model"]["decoder"]
    return decoder


# Each attack goes through GenerativeSession (the runtime's own path: load_config, that is
# parse_genai_config, then render); the key in the refusal names what was refused.
@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda c: c.update(engine={"dynamic_batching": {}}), "engine"),
        (lambda c: c.update(speculative={"max_draft_tokens": 4}), "speculative"),
        (lambda c: c["model"].update(vision={"filename": "v.onnx"}), "model.vision"),
        (lambda c: _decoder(c).update(run_options={"x": "1"}), "model.decoder.run_options"),
        (lambda c: _decoder(c).update(pipeline=[{"filename": "x"}]), "model.decoder.pipeline"),
        (lambda c: _decoder(c).update(filename="../model.onnx"), "model.decoder.filename"),
        (lambda c: _decoder(c).update(filename="/etc/passwd"), "model.decoder.filename"),
        (lambda c: _decoder(c).update(filename="sub/model.onnx"), "model.decoder.filename"),
        (lambda c: _decoder(c).update(filename="other.onnx"), "model.decoder.filename"),
        (lambda c: _decoder(c).update(filename="tokenizer.json"), "model.decoder.filename"),
        (lambda c: c["model"].update(context_length=10**12), "model.context_length"),
        (lambda c: c["model"].update(vocab_size=1 << 40), "model.vocab_size"),
        (lambda c: _decoder(c).update(num_hidden_layers=10**6), "model.decoder.num_hidden_layers"),
        (lambda c: _decoder(c).update(hidden_size=1 << 17), "model.decoder.hidden_size"),
        (lambda c: _decoder(c).update(head_size=0), "model.decoder.head_size"),
        (lambda c: c.update(search={"num_beams": 8}), "search.num_beams"),
        (
            lambda c: _decoder(c)["inputs"].update(past_key_names="k.%s.%d"),
            "model.decoder.inputs.past_key_names",
        ),
        (
            lambda c: _decoder(c)["outputs"].update(present_key_names="k.%n"),
            "model.decoder.outputs.present_key_names",
        ),
        (
            lambda c: _decoder(c)["inputs"].update(input_ids="ids%x"),
            "model.decoder.inputs.input_ids",
        ),
        (
            lambda c: _decoder(c)["inputs"].update(input_ids="i" * 49),
            "model.decoder.inputs.input_ids",
        ),
        (lambda c: c["model"].update(eos_token_id=[10**7]), "model.eos_token_id"),
        (
            lambda c: _decoder(c)["session_options"].update(custom_ops_library="x.so"),
            "model.decoder.session_options.custom_ops_library",
        ),
    ],
)
def test_hostile_configs_are_refused(
    folder: Path, tmp_path: Path, edit: Callable[[dict[str, Any]], None], key: str
) -> None:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "genai_config.json").read_text())
    edit(config)
    (copy / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidModelError, match=rf"^genai_config\.json {re.escape(key)}: "):
        GenerativeSession(copy, RuntimeOptions())


def test_oversized_or_malformed_config_is_refused(folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    raw = (copy / "genai_config.json").read_bytes()
    (copy / "genai_config.json").write_bytes(raw + b" " * MAX_CONFIG_BYTES)
    with pytest.raises(InvalidModelError, match=f"limit of {MAX_CONFIG_BYTES}"):
        GenerativeSession(copy, RuntimeOptions())
    (copy / "genai_config.json").write_bytes(b'{"model": {}, "model": {}}')
    with pytest.raises(InvalidModelError, match="duplicate"):
        GenerativeSession(copy, RuntimeOptions())
    (copy / "genai_config.json").unlink()
    with pytest.raises(InvalidModelError, match="missing or unreadable"):
        GenerativeSession(copy, RuntimeOptions())


@pytest.mark.parametrize("name", ["tokenizer.json", "model.onnx", "genai_config.json"])
def test_links_in_the_model_folder_are_refused(folder: Path, tmp_path: Path, name: str) -> None:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / name).unlink()
    (copy / name).symlink_to(folder / name)
    with pytest.raises(InvalidModelError, match="regular files"):
        GenerativeSession(copy, RuntimeOptions())


def test_folders_in_the_model_folder_are_refused(folder: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    (copy / "sub").mkdir()
    with pytest.raises(InvalidModelError, match="regular files"):
        GenerativeSession(copy, RuntimeOptions())


def test_staging_folder_is_removed(folder: Path, tmp_path: Path) -> None:
    GenerativeSession(folder, RuntimeOptions(), staging_parent=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cancellation_stops_at_once_and_frees_the_generator(
    session: GenerativeSession, prompt: list[int]
) -> None:
    generation = session.generate(prompt, SamplingParams(max_tokens=100, temperature=0.0))
    ref = weakref.ref(generation._generator)
    it = iter(generation)
    next(it)
    next(it)
    generation.close()
    gc.collect()
    assert ref() is None  # the og.Generator (and its KV cache) is gone
    assert generation.closed
    assert list(it) == []
    assert generation.finish_reason is None
    assert generation.completion_tokens == 2
    # The session goes on serving.
    assert len(list(session.generate(prompt, SamplingParams(max_tokens=3, temperature=0.0)))) == 3


def test_context_manager_closes(session: GenerativeSession, prompt: list[int]) -> None:
    with session.generate(prompt, GREEDY) as generation:
        next(iter(generation))
    assert generation.closed


# --- the batched path (og.Engine) -------------------------------------------------------


def test_batched_greedy_is_token_identical_and_requests_share_steps(
    session: GenerativeSession, prompt: list[int]
) -> None:
    from blindinfer.runtime.generative_batch import BatchedGenerator

    batch = BatchedGenerator(session)
    other = session.chat_prompt_ids([{"role": "user", "content": "Seal the model."}])
    expected = {
        n: [t.token_id for t in session.generate(p, SamplingParams(max_tokens=n, temperature=0))]
        for n, p in ((24, prompt), (9, other), (16, prompt))
    }
    runs = {
        n: batch.submit(p, SamplingParams(max_tokens=n, temperature=0.0))
        for n, p in ((24, prompt), (9, other), (16, prompt))
    }
    steps = 0
    while batch.pending():
        batch.step()
        steps += 1
    assert steps <= 25  # one step per token for all three, not 24 + 9 + 16
    for n, generation in runs.items():
        tokens = list(generation)
        assert [t.token_id for t in tokens] == expected[n]
        assert generation.finish_reason == "length"
        assert generation.completion_tokens == n


def test_batched_stop_cancel_and_seed(session: GenerativeSession, prompt: list[int]) -> None:
    from blindinfer.runtime.generative_batch import BatchedGenerator

    batch = BatchedGenerator(session)
    greedy = [t.token_id for t in session.generate(prompt, GREEDY)]
    stop_id = greedy[3]
    stopped = batch.submit(
        prompt, SamplingParams(max_tokens=24, temperature=0.0), stop_token_ids=(stop_id,)
    )
    cancelled = batch.submit(prompt, SamplingParams(max_tokens=24, temperature=0.0))
    full = batch.submit(prompt, GREEDY)
    it = iter(cancelled)
    assert [next(it).token_id for _ in range(2)] == greedy[:2]
    cancelled.close()
    assert list(it) == []
    assert cancelled.finish_reason is None
    assert [t.token_id for t in stopped] == greedy[: greedy.index(stop_id) + 1]
    assert stopped.finish_reason == "stop"
    assert [t.token_id for t in full] == greedy  # the others went on undisturbed
    assert not batch.pending()
    with pytest.raises(GenerationRequestError) as info:
        batch.submit(prompt, SamplingParams(16, seed=1))
    assert info.value.code == "seed_not_batched"
    with pytest.raises(ContextLengthError):
        batch.submit(prompt, SamplingParams(max_tokens=200))


def test_batched_sampling_runs_within_bounds(session: GenerativeSession, prompt: list[int]) -> None:
    from blindinfer.runtime.generative_batch import BatchedGenerator

    batch = BatchedGenerator(session)
    params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, top_k=40)
    runs = [batch.submit(prompt, params) for _ in range(2)]
    for generation in runs:
        tokens = list(generation)
        assert 1 <= len(tokens) <= 12
        assert generation.finish_reason in {"stop", "length"}
        assert all(0 <= t.token_id < session.vocab_size for t in tokens)
