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


class ExecutionError(BlindInferError):
    """A model could not be executed in its isolated worker; `code` is machine-readable.

    These are failures of the sandbox around onnxruntime (time, memory, crashes, queueing),
    as opposed to InvalidTensorError, which onnxruntime reports for the request itself.
    """

    code = "execution_failed"

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class InferenceTimeoutError(ExecutionError):
    """The run exceeded the pool's time limit; its worker was killed and replaced."""

    code = "inference_timeout"


class WorkerCrashedError(ExecutionError):
    """The worker process died during the request (segfault, abort, kill); it was replaced."""

    code = "worker_crashed"


class MemoryLimitError(WorkerCrashedError):
    """The model needed more memory than a worker may use; the worker was replaced.

    A subclass of WorkerCrashedError because the outcome is the same for the caller: the
    request failed and every model of that worker is reloaded on its next use.
    """

    code = "memory_limit"


class ModelLoadCrashedError(InvalidModelError, WorkerCrashedError):
    """The model killed (or exhausted) its worker while loading: the upload is refused.

    Both an InvalidModelError (the server answers 400 as for any unloadable model) and a
    WorkerCrashedError (the worker was replaced).
    """

    code = "invalid_model"


class OverloadedError(ExecutionError):
    """Too many requests already wait for the worker that holds this model.

    `retry_after_s` is an estimate of when the queue will have drained (for Retry-After).
    """

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class ResponseTooLargeError(ExecutionError):
    """The outputs would make a response larger than the server's response limit.

    Refused in the worker, before a single output byte crossed into the server: a tiny
    model (an Expand of a scalar) can ask for gigabytes of output with a tiny request, and
    the server must never receive, copy or encode them. `size` is the response size the
    outputs would have needed (for JSON outputs, its upper bound), `limit` the setting.
    """

    code = "response_too_large"

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(message)


class GenerationRequestError(InvalidTensorError):
    """A generation request the runtime refuses before generating (bad token ids, sampling
    parameters out of range, too many new tokens); `code` is machine-readable. An
    InvalidTensorError, so the server answers 400 with that code like any bad input."""


class ContextLengthError(GenerationRequestError):
    """Prompt tokens plus `max_tokens` exceed the model's context or the server's limit.

    Refused before any KV cache is allocated: the cache grows with the context, so this is
    the bound on a request's memory. `needed` and `limit` are token counts (no content).
    """

    def __init__(self, *, needed: int, limit: int) -> None:
        self.needed = needed
        self.limit = limit
        super().__init__(
            "context_length_exceeded",
            f"prompt tokens plus max_tokens ({needed}) exceed the context limit ({limit})",
        )
