"""The server-wide body budget and the connection settings (the attacks themselves run
against a real server in tests/e2e/test_connection_limits_e2e.py)."""

from __future__ import annotations

import pytest

from blindinfer.cli.main import _config, build_parser
from blindinfer.errors import UsageError
from blindinfer.runtime.errors import OverloadedError
from blindinfer.server.body_guard import BodyBudget
from blindinfer.server.config import ConnectionLimits, ServerConfig


def test_the_budget_bounds_bodies_and_their_bytes_and_gives_them_back() -> None:
    budget = BodyBudget(max_bodies=2, max_bytes=100)
    budget.open()
    budget.open()
    with pytest.raises(OverloadedError, match="--max-concurrent-bodies"):
        budget.open()
    budget.grow(60)
    with pytest.raises(OverloadedError, match="--max-body-buffer-bytes"):
        budget.grow(41)
    budget.grow(40)
    assert budget.usage == (2, 100)
    budget.body_done()  # complete: no longer received, its bytes held until the end
    budget.open()
    assert budget.usage == (2, 100)
    budget.close(60, still_open=False)
    budget.close(40, still_open=True)
    budget.close(0, still_open=True)
    assert budget.usage == (0, 0)


@pytest.mark.parametrize(
    "field", ["header_timeout_s", "body_timeout_s", "max_connections", "min_body_rate"]
)
@pytest.mark.parametrize("value", [0, -1, float("inf"), float("nan"), True])
def test_connection_limits_must_be_positive_and_finite(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ConnectionLimits(**{field: value})  # type: ignore[arg-type]


def test_the_command_line_sets_the_connection_limits() -> None:
    options = "--header-timeout-s 2.5 --max-header-bytes 16K --min-body-rate 1M"
    args = build_parser().parse_args(
        ["serve", "--simulation", *options.split(), "--max-connections", "50"]
    )
    config = _config(args)
    assert isinstance(config, ServerConfig)
    assert config.connections.header_timeout_s == 2.5
    assert config.connections.max_header_bytes == 16 << 10
    assert config.connections.min_body_rate == 1 << 20
    assert config.connections.max_connections == 50
    # not pinned by the measurement: availability, not what the server accepts
    assert "connections" not in config.security_relevant()
    bad = build_parser().parse_args(["serve", "--simulation", "--max-headers", "0"])
    with pytest.raises(UsageError, match="--max-headers "):
        _config(bad)
