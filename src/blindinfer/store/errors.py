"""Store refusals; the server maps each to one HTTP status. Also the store key's start-up
refusals (`StoreKeyConfigError`, `StoreKeyUnavailableError`): a server without its key
does not start, so those never reach a client."""

from __future__ import annotations

from blindinfer.errors import BlindInferError, UsageError


class UnknownModelError(BlindInferError):
    """No model has that name, model_id or SHA-256."""


class ModelConflictError(BlindInferError):
    """The name is taken by a different model."""


class StoreFullError(BlindInferError):
    """Accepting the model would exceed the configured number of models."""


class InvalidModelNameError(BlindInferError):
    """A model name that could be confused with an id or a hash, or has odd characters."""


class MemoryBudgetError(BlindInferError):
    """One model alone needs more memory than the server's whole model budget."""


class TenantMemoryQuotaError(MemoryBudgetError):
    """One model alone needs more loaded memory than its owning tenant's memory quota."""


class StoreKeyConfigError(UsageError):
    """`--store-key-resource` or `--cdh-url` is unusable (store/key_release.py): a malformed
    KBS resource URI, or a Confidential Data Hub URL that is not a loopback http:// URL."""


class StoreKeyUnavailableError(BlindInferError):
    """The store key could not be obtained from the KBS through the Confidential Data Hub,
    so the shared store cannot be opened and the server does not start.

    `reason` is machine-readable: ``cdh_unreachable``, ``cdh_timeout``, ``cdh_broken``,
    ``cdh_endpoint_not_found`` (404), ``key_not_released`` (500: the CDH or the KBS
    refused), ``cdh_unexpected_status``, ``secret_too_large``, ``secret_wrong_size``.
    The message is what went wrong, then what to do; it never holds the secret."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)
