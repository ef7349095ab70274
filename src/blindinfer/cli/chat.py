"""`blindinfer chat MODEL`: a terminal chat with a generative model on an attested server.

Why a command of its own: the first thing a person does with an uploaded LLM is talk to it,
and the first thing they should see is what they are talking to. So `chat` connects like
every client command (`connect()` verifies the evidence against the policy before anything
is sent), prints a short attestation summary (TEE kind, measurement, TCB status; the loud
simulation banner where it applies), and only then reads prompts. Tokens are printed as
they arrive, through the official `openai` SDK that `Client.openai()` builds on the pinned,
attested connection: the same path a program would take.

Modes: a terminal gets a prompt loop (history kept, `/exit` or EOF ends); `--once PROMPT`
answers one prompt (`--once -`: the prompt is all of stdin); stdin that is not a terminal is
read one prompt per line, the conversation kept across lines. Answers go to stdout, exactly
as generated and ended by one newline; everything else goes to stderr, so scripts can take
stdout as it is.

Ctrl-C while an answer streams closes that stream (the server cancels the generation and
frees its slot), drops the unanswered turn and returns to the prompt; Ctrl-C at the prompt
exits 130. Every failure is one or two lines and the exit status of docs/cli.md: the SDK's
exceptions are translated into blindinfer's own here, so `cli.errors` explains them like
any other command's.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from blindinfer.errors import ConnectionFailedError, ServerError, UsageError

HELP = "chat with a generative model, attestation first, tokens as they come"
DESCRIPTION = (
    "Chat with a generative model on an attested server through the openai SDK (needs "
    "pip install 'blindinfer[openai]'). Prints the verified attestation first, then reads "
    "prompts: in a terminal a prompt loop (/exit or Ctrl-D ends, Ctrl-C stops an answer); "
    "from a pipe one prompt per line; with --once one prompt. Answers go to stdout, "
    "everything else to stderr."
)
EPILOG = (
    "Exit status: 0 ok (/exit, end of input); 1 evidence refused; 2 usage error (bad value, "
    "a tensor model, the openai extra not installed); 3 policy mismatch; 4 server error or "
    "unreachable (unknown model, refused request, broken connection); 130 interrupted "
    "(Ctrl-C at the prompt)."
)
EXIT_WORDS = ("/exit", "/quit")
PROMPT = "> "
STOPPED = "(stopped: this answer is not kept in the conversation)"
RECOVERABLE = frozenset({400, 413, 422, 429, 503})
"""Refusals of one request that leave the chat usable: the loop reports them and goes on."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The chat options; main adds the connection options every client command has."""
    parser.add_argument("model", help="name, model_id or SHA-256 of a generative model")
    parser.add_argument("--system", metavar="TEXT", help="system message opening the chat")
    parser.add_argument(
        "--max-tokens",
        type=_positive_int,
        metavar="N",
        help="most tokens per answer (default: the server's --max-new-tokens)",
    )
    parser.add_argument(
        "--temperature",
        type=_temperature,
        metavar="T",
        help="0 for greedy (reproducible); default: the server's (1.0, sampling)",
    )
    parser.add_argument("--seed", type=int, help="sampling seed: the same seed, the same answer")
    parser.add_argument(
        "--once",
        metavar="PROMPT",
        help="answer this one prompt and exit ('-': read the prompt from stdin)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 2.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2, not {value}")
    return value


@dataclass
class Conversation:
    """The messages so far, and one streamed answer at a time through the SDK."""

    sdk: Any
    model: str
    options: dict[str, Any]
    messages: list[dict[str, str]] = field(default_factory=list)

    def ask(self, prompt: str, out: TextIO) -> str | None:
        """Streams the answer to `prompt` into `out` and keeps both turns; None (and nothing
        kept) when Ctrl-C stopped it. SDK failures are raised as blindinfer errors."""
        import openai

        self.messages.append({"role": "user", "content": prompt})
        parts: list[str] = []
        try:
            stream = self.sdk.chat.completions.create(
                model=self.model, messages=self.messages, stream=True, **self.options
            )
            with stream:  # closing it mid-answer is what tells the server to cancel
                for chunk in stream:
                    for choice in chunk.choices:
                        text = choice.delta.content
                        if text:
                            parts.append(text)
                            out.write(text)
                            out.flush()
        except KeyboardInterrupt:
            self.messages.pop()
            out.write("\n")
            out.flush()
            print(STOPPED, file=sys.stderr, flush=True)
            return None
        except openai.APIError as exc:
            self.messages.pop()
            raise sdk_error(exc, self.model) from exc
        answer = "".join(parts)
        out.write("\n")
        out.flush()
        self.messages.append({"role": "assistant", "content": answer})
        return answer


def sdk_error(exc: BaseException, model: str) -> BaseException:
    """The `openai` SDK's exception as the blindinfer error `cli.errors` explains: a transport
    failure as ConnectionFailedError (its cause chain kept, to say why), a refusal as
    ServerError with the server's status and code, a tensor model as a UsageError."""
    import openai

    if isinstance(exc, openai.APIConnectionError):
        return ConnectionFailedError(f"the request failed: {exc}")
    body = getattr(exc, "body", None)
    details = body if isinstance(body, dict) else {}
    code = str(details.get("code") or "error")
    message = str(details.get("message") or exc)
    if code == "not_generative":
        return _tensor_model(model)
    if isinstance(exc, openai.APIStatusError):
        return ServerError(exc.status_code, code, message)
    # an error event inside a stream that had started: its status is in its OpenAI type
    status = {"rate_limit_error": 429, "server_error": 500}.get(str(details.get("type")), 400)
    return ServerError(status, code, message)


def _tensor_model(model: str) -> UsageError:
    return UsageError(
        f"{model!r} is a tensor model, not a generative one: it cannot chat\n"
        f"run it with `blindinfer run {model} inputs.npz`, or upload an onnxruntime-genai folder"
    )


def check_model(client: Any, model: str) -> None:
    """Refuses, before any prompt is typed, a model this key cannot see (the server's 404,
    exit 4) or a tensor model (a usage error, exit 2)."""
    for info in client.list_models():
        if model in (info.name, info.model_id, info.sha256):
            if info.kind != "generative":
                raise _tensor_model(model)
            return
    raise ServerError(404, "unknown_model", f"no model {model!r} visible to this key")


def attestation_lines(report: Any) -> list[str]:
    """Three lines: what was verified, the measurement the policy pinned, the TCB status."""
    measured = [
        f"{name} {value}"
        for name, value in report.claims.items()
        if name in ("mrenclave", "mrtd", "measurement") and isinstance(value, str)
    ]
    root = "SIMULATION root (no TEE)" if report.simulation else f"chain to {report.root}"
    return [
        f"attested: {report.kind} evidence, {root}; fresh nonce, TLS key bound, policy satisfied",
        "  " + ("; ".join(measured) or "measurement: see `blindinfer attest`"),
        f"  TCB status {report.tcb_status}"
        + (f" (advisories: {', '.join(report.advisory_ids)})" if report.advisory_ids else ""),
    ]


def require_sdk() -> None:
    """The UsageError `Client.openai()` raises without the `openai` extra, but before any
    connection is made."""
    try:
        import httpx2  # noqa: F401
        import openai  # noqa: F401
    except ImportError as exc:
        raise UsageError(
            "the openai SDK (3.x, on httpx2) is not installed\n"
            "install the extra: pip install 'blindinfer[openai]'"
        ) from exc


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.max_tokens is not None:
        options["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.seed is not None:
        options["seed"] = args.seed
    return options


def _prompts_from_pipe(lines: Iterable[str]) -> Iterable[str]:
    for line in lines:
        prompt = line.rstrip("\r\n")
        if prompt.strip() in EXIT_WORDS:
            return
        if prompt.strip():
            yield prompt


def _prompt_loop(conversation: Conversation) -> int:
    """The terminal loop: EOF or /exit end it (0); Ctrl-C here propagates (130); a request
    the server refused (RECOVERABLE) is reported and the loop goes on."""
    from blindinfer.cli.errors import explain

    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401  (line editing and history for input())
    print("type a message; /exit or Ctrl-D ends, Ctrl-C stops an answer", file=sys.stderr)
    while True:
        try:
            prompt = input(PROMPT)
        except EOFError:
            print(file=sys.stderr)
            return 0
        if prompt.strip() in EXIT_WORDS:
            return 0
        if prompt.strip():
            try:
                conversation.ask(prompt, sys.stdout)
            except ServerError as exc:
                if exc.status not in RECOVERABLE:
                    raise
                # a refused request (too long, a quota): say so, keep the conversation
                for line in explain(exc, target="the server")[1]:
                    print(line, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from blindinfer.client.client import connect

    require_sdk()  # before connecting: a missing extra is a usage error, not a server's
    once: str | None = args.once
    if once == "-":
        once = sys.stdin.read().strip()
    if once is not None and not once.strip():
        raise UsageError("--once: the prompt is empty\ngive the prompt, or '-' and pipe it in")
    with connect(
        args.url, policy=args.policy, simulation=args.simulation, api_key=args.api_key
    ) as client:
        print("\n".join(attestation_lines(client.attestation)), file=sys.stderr, flush=True)
        check_model(client, args.model)
        sdk = client.openai()
        try:
            conversation = Conversation(sdk, args.model, _options(args))
            if args.system:
                conversation.messages.append({"role": "system", "content": args.system})
            if once is not None:
                return 0 if conversation.ask(once, sys.stdout) is not None else 130
            if not sys.stdin.isatty():
                for prompt in _prompts_from_pipe(sys.stdin):
                    if conversation.ask(prompt, sys.stdout) is None:
                        return 130
                return 0
            return _prompt_loop(conversation)
        finally:
            sdk.close()
