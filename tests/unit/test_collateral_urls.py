"""User-set collateral URLs (issue 21, item 19): plain http:// is refused unless the user
allows it in so many words, before anything is fetched."""

from __future__ import annotations

import subprocess
import sys

import pytest

import blindinfer
from blindinfer.attestation.intel.pccs import PccsCollateral
from blindinfer.errors import UsageError
from blindinfer.tee.configfs_tsm import KdsVcekSource


def _never(url: str) -> object:
    raise AssertionError(f"fetched {url}")


@pytest.mark.parametrize(
    "make",
    [
        lambda url, **kw: PccsCollateral(url, fetch=_never, **kw),  # type: ignore[arg-type]
        lambda url, **kw: KdsVcekSource(url, fetch=_never, **kw),  # type: ignore[arg-type]
    ],
    ids=["pccs", "kds"],
)
def test_plain_http_is_refused_unless_allowed(make: object) -> None:
    with pytest.raises(UsageError, match=r"plain http://.*allow_insecure_http=True"):
        make("http://collateral.test")  # type: ignore[operator]
    make("http://collateral.test", allow_insecure_http=True)  # type: ignore[operator]
    make("https://collateral.test")  # type: ignore[operator]
    with pytest.raises(UsageError, match="must be an https:// URL"):
        make("ftp://collateral.test")  # type: ignore[operator]


def test_connect_refuses_an_http_collateral_url_before_connecting() -> None:
    policy = {"sgx": {"mrenclave": ["11" * 32]}}
    with pytest.raises(UsageError, match="plain http://"):
        # port 9 (discard) on loopback: nothing must be sent there for this refusal
        blindinfer.connect(
            "https://127.0.0.1:9", policy=policy, collateral_url="http://pccs.test", timeout=2
        )
    with pytest.raises(blindinfer.BlindInferError) as info:  # allowed: gets as far as TLS
        blindinfer.connect(
            "https://127.0.0.1:9",
            policy=policy,
            collateral_url="http://pccs.test",
            allow_insecure_http=True,
            timeout=2,
        )
    assert not isinstance(info.value, UsageError)


def test_the_cli_says_how_to_allow_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "blindinfer.cli.main", "attest", "https://127.0.0.1:9",
         "--collateral-url", "http://pccs.test"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--insecure-http-collateral" in result.stdout + result.stderr
