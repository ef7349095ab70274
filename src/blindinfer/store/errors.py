"""Store refusals; the server maps each to one HTTP status."""

from __future__ import annotations

from blindinfer.errors import BlindInferError


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
