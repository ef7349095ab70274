"""The `simulation` argument of `connect()`, `attest()` and `AsyncClient`, and its warning.

Trusting the simulation root means trusting a server that runs in no TEE at all, so:

- the argument must be a real bool: `simulation="false"`, `"0"`, `"no"`, `[0]` or `1` are
  truthy values a config file or an environment variable easily produces, and each would
  silently turn simulation ON; they are a `UsageError` instead;
- the `SimulationWarning` is shown every time simulation is accepted, as the docs promise.
  `warnings.warn` shows a warning once per call site under Python's default filters (a
  loop or a reconnecting service would warn once, then never); we go through
  `warnings.warn_explicit` with a fresh registry, so only the filters decide: the default
  shows it every time, and a caller that silences `SimulationWarning` on purpose
  (`warnings.simplefilter("ignore", SimulationWarning)`) still can.
"""

from __future__ import annotations

import sys
import warnings

from blindinfer.errors import SimulationWarning, UsageError

__all__ = ["SIMULATION_BANNER", "simulation_flag", "warn_simulation"]

SIMULATION_BANNER = (
    "blindinfer: SIMULATION MODE. You asked to trust the simulation root: the server is NOT "
    "in a TEE, its operator can read everything you send. Never use this with real data."
)


def simulation_flag(value: object) -> bool:
    """`value` if it is True or False; anything else is a UsageError (never truthiness)."""
    if not isinstance(value, bool):
        shown = repr(value)[:40]
        raise UsageError(
            f"simulation must be True or False, got {type(value).__name__} {shown}: "
            "a string such as 'false' would turn simulation on"
        )
    return value


def warn_simulation(stacklevel: int = 2) -> None:
    """Shows the SimulationWarning, every time, attributed to the frame that
    `warnings.warn(..., stacklevel=stacklevel)` would name from the caller."""
    try:
        frame = sys._getframe(stacklevel)
    except ValueError:  # fewer frames than asked for: attribute it to the outermost
        filename, lineno, module = "sys", 1, "sys"
    else:
        filename, lineno = frame.f_code.co_filename, frame.f_lineno
        module = str(frame.f_globals.get("__name__", "<unknown>"))
    # No module_globals, as warnings.warn passes none: with them, a caller running as
    # __main__ (`python -m ...`) makes linecache ask its loader for "__main__", which fails.
    warnings.warn_explicit(
        SIMULATION_BANNER,
        SimulationWarning,
        filename,
        lineno,
        module=module,
        registry=None,  # a fresh registry: no "already shown at this line" memory
    )
