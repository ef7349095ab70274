"""`blindinfer proxy`: an attesting proxy for any Open Inference Protocol client.

    blindinfer proxy --policy P --upstream https://host:9924 --listen 127.0.0.1:8000 \\
        [--simulation] [--api-key K] [--reattest-seconds N]

Point tritonclient, KServe's SDK or curl at http://127.0.0.1:8000: the proxy forwards to
the upstream only while its attestation verifies against the policy, over TLS pinned to
the attested key. Also runnable as `python -m blindinfer.cli.proxy ...`.

This module imports only argparse at import time; uvicorn and the proxy are loaded by
`run_proxy`, so `add_proxy_arguments` is cheap for the main parser.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

READY_PREFIX = "blindinfer proxy: listening on "


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="policy TOML file the upstream must meet")
    parser.add_argument(
        "--upstream", required=True, metavar="URL", help="the blindinfer server, https://host:port"
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:8000",
        metavar="HOST:PORT",
        help="local plain-HTTP address (default 127.0.0.1:8000; loopback only without "
        "--allow-remote)",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --listen: its side is plain HTTP without authentication, "
        "and requests through it carry the proxy's API key",
    )
    parser.add_argument(
        "--simulation", action="store_true", help="accept a SIMULATION upstream (no TEE, insecure)"
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("BLINDINFER_API_KEY"),
        help="added by the proxy on the attested channel (or BLINDINFER_API_KEY)",
    )
    parser.add_argument(
        "--forward-client-authorization",
        action="store_true",
        help="pass local callers' Authorization header upstream (dropped by default)",
    )
    parser.add_argument(
        "--reattest-seconds",
        type=float,
        default=300.0,
        help="attest again with a fresh nonce this often (default 300)",
    )
    parser.add_argument(
        "--collateral-url", help="fetch Intel collateral from this PCCS/PCS, not from the server"
    )
    parser.add_argument("--max-request-bytes", type=int, default=1 << 30)
    parser.add_argument("--max-response-bytes", type=int, default=1 << 30)
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="upstream timeout in seconds (default 120)"
    )


def run_proxy(args: argparse.Namespace) -> int:
    """Serves until interrupted. Exit status 2 for a refused --listen or bad options."""
    from blindinfer.attestation.policy import load_policy
    from blindinfer.client.client import SIMULATION_BANNER
    from blindinfer.errors import SimulationWarning
    from blindinfer.proxy.forward import (
        REMOTE_REFUSAL,
        AttestingProxy,
        ProxyConfig,
        is_loopback,
        parse_listen,
        serve_proxy,
    )

    try:
        host, port = parse_listen(args.listen)
        if not is_loopback(host) and not args.allow_remote:
            print(f"blindinfer: {REMOTE_REFUSAL.format(host=host)}", file=sys.stderr)
            return 2
        config = ProxyConfig(
            upstream=args.upstream,
            policy=load_policy(args.policy),
            simulation=args.simulation,
            api_key=args.api_key or None,
            forward_client_authorization=args.forward_client_authorization,
            reattest_seconds=args.reattest_seconds,
            collateral_url=args.collateral_url,
            max_request_bytes=args.max_request_bytes,
            max_response_bytes=args.max_response_bytes,
            timeout=args.timeout,
        )
    except ValueError as exc:
        print(f"blindinfer: {exc}", file=sys.stderr)
        return 2
    if args.simulation:
        warnings.warn(SIMULATION_BANNER, SimulationWarning, stacklevel=1)
    shown = f"[{host}]" if ":" in host else host

    def ready(app: AttestingProxy, bound: int) -> None:
        status = app.upstream.failure
        state = (
            "attested" if status is None else f"NOT attested, refusing: {status.document['error']}"
        )
        print(f"{READY_PREFIX}http://{shown}:{bound} -> {config.upstream} ({state})", flush=True)

    serve_proxy(config, host, port, on_ready=ready)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from blindinfer.errors import BlindInferError, SimulationWarning

    parser = argparse.ArgumentParser(prog="blindinfer proxy", description=__doc__)
    add_proxy_arguments(parser)
    args = parser.parse_args(argv)
    warnings.simplefilter("always", SimulationWarning)
    try:
        return run_proxy(args)
    except BlindInferError as exc:
        print(f"blindinfer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
