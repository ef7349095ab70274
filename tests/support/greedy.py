"""Greedy answers of in-process onnxruntime-genai: what a served answer must equal.

Shared by the e2e tests of `blindinfer chat` and of the chat demo, so that both compare the
server's output with the same reference, computed by the runtime the server itself uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from blindinfer.protocol.generation import SamplingParams
from blindinfer.runtime.generative import GenerativeSession, RuntimeOptions


def greedy_chat(folder: Path, messages: Sequence[Mapping[str, str]], max_tokens: int) -> str:
    """The greedy answer to `messages` (chat template applied), at most `max_tokens`."""
    session = GenerativeSession(folder, RuntimeOptions(intra_op_threads=1))
    ids = session.chat_prompt_ids(messages)
    with session.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)) as gen:
        return "".join(token.text for token in gen)
