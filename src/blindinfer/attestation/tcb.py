"""Intel's TCB statuses that leave the decision to policy (Revoked is always an error)."""

from __future__ import annotations

from typing import Final

TCB_STATUSES: Final = (
    "UpToDate",
    "SWHardeningNeeded",
    "ConfigurationNeeded",
    "ConfigurationAndSWHardeningNeeded",
    "OutOfDate",
    "OutOfDateConfigurationNeeded",
)
