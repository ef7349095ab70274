"""`blindinfer proxy`: an attesting proxy for any Open Inference Protocol client.

    blindinfer proxy --policy P --upstream https://host:9924 --listen 127.0.0.1:8000 \\
        [--simulation] [--api-key K] [--reattest-seconds N] [--allow-host NAME[:PORT]]
        [--allow-origin URL] [--unix-socket PATH] [--access-token-file PATH]
        [--grpc-listen HOST:PORT [--upstream-grpc-port N]]

Point tritonclient, KServe's SDK or curl at http://127.0.0.1:8000: the proxy forwards to
the upstream only while its attestation verifies against the policy, over TLS pinned to
the attested key. Requests from web pages (Origin, Sec-Fetch-Site), with another Host
(DNS rebinding) or a Content-Type the route does not read are refused (proxy/guard.py).
Also runnable as `python -m blindinfer.cli.proxy ...`.

This module imports only argparse and blindinfer.cli.args at import time; uvicorn and the
proxy are loaded by `run_proxy`, so `add_proxy_arguments` is cheap for the main parser.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from blindinfer.cli.args import SIZE_HELP, https_url, size

READY_PREFIX = "blindinfer proxy: listening on "
READY_GRPC_PREFIX = "blindinfer proxy: gRPC listening on "


PROXY_DESCRIPTION = (
    "Attesting proxy: local Open Inference Protocol clients (tritonclient, KServe's SDK, "
    "curl) talk plain HTTP to --listen; the proxy forwards only while the upstream's "
    "attestation verifies against --policy, over TLS pinned to the attested key. It checks "
    "the upstream once before it starts listening (see --start-unattested). Sizes: "
    + SIZE_HELP
    + "."
)


def add_proxy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policy",
        required=True,
        help="policy TOML file the upstream must meet",
    )
    parser.add_argument(
        "--upstream",
        required=True,
        type=https_url,
        metavar="URL",
        help="the blindinfer server, https://host:port",
    )
    parser.add_argument(
        "--listen",
        type=listen_address,
        default="127.0.0.1:8000",
        metavar="HOST:PORT",
        help="local plain-HTTP address, loopback only without --allow-remote "
        "(default: 127.0.0.1:8000)",
    )
    parser.add_argument(
        "--grpc-listen",
        type=listen_address,
        metavar="HOST:PORT",
        help="also serve the Open Inference Protocol over gRPC (plaintext, for "
        "tritonclient.grpc) here, forwarded to the upstream's gRPC port under the same "
        "attestation; loopback only without --allow-remote; not with --replicas > 1",
    )
    parser.add_argument(
        "--upstream-grpc-port",
        type=int,
        metavar="N",
        help="the upstream's gRPC port (default: the grpc_port its GET /v2 announces)",
    )
    parser.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a non-loopback --listen: its side is plain HTTP without authentication, "
        "and requests through it carry the proxy's API key",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME[:PORT]",
        help="also accept requests whose Host header is this (repeatable; without a port: "
        "at the listening port). By default only the listening address is accepted (and "
        "localhost on loopback): other names are what a DNS rebinding attack sends",
    )
    parser.add_argument(
        "--allow-origin",
        action="append",
        default=[],
        metavar="SCHEME://HOST[:PORT]",
        help="let web pages from this origin use the proxy, with CORS (repeatable). By "
        "default every request from a browser page (Origin, Sec-Fetch-Site) is refused: "
        "any page could otherwise act with the proxy's API key",
    )
    parser.add_argument(
        "--unix-socket",
        metavar="PATH",
        help="listen on a Unix socket (created 0600: only this user) instead of --listen",
    )
    parser.add_argument(
        "--access-token-file",
        metavar="PATH",
        help="require the token in this file (0600; created with a random token if "
        "missing) in the X-Blindinfer-Proxy-Token header of every request",
    )
    parser.add_argument(
        "--simulation",
        action="store_true",
        help="accept a SIMULATION upstream (no TEE, insecure: for testing only)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("BLINDINFER_API_KEY"),
        help="added by the proxy on the attested channel (default: $BLINDINFER_API_KEY)",
    )
    parser.add_argument(
        "--forward-client-authorization",
        action="store_true",
        help="pass local callers' Authorization header upstream (default: dropped)",
    )
    parser.add_argument(
        "--reattest-seconds",
        type=float,
        default=300.0,
        help="attest again with a fresh nonce this often",
    )
    parser.add_argument(
        "--start-unattested",
        action="store_true",
        help="start even if the upstream cannot be attested yet, answering 503 until it is "
        "(default: exit with the reason)",
    )
    parser.add_argument(
        "--collateral-url",
        help="fetch Intel collateral from this PCCS/PCS (default: what the server sends)",
    )
    parser.add_argument(
        "--insecure-http-collateral",
        action="store_true",
        help="accept a plain http:// --collateral-url (default: https:// only)",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=size,
        metavar="SIZE",
        default="1G",
        help="largest request body forwarded",
    )
    parser.add_argument(
        "--max-response-bytes",
        type=size,
        metavar="SIZE",
        default="1G",
        help="largest response body forwarded",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="upstream timeout in seconds")
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        metavar="N",
        help="the upstream address balances up to N replicas, each with its own key: each "
        "new connection to a key not yet attested is attested on that connection first "
        "(default 1: exactly one attested key)",
    )
    parser.add_argument(
        "--max-attestation-age",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="with --replicas > 1: attest a replica again once its attestation is this old",
    )


def listen_address(text: str) -> tuple[str, int]:
    """argparse type for --listen: HOST:PORT, [V6]:PORT or :PORT (loopback)."""
    host, sep, number = text.rpartition(":")
    if not sep or not number.isdigit() or not 0 <= int(number) <= 65535:
        raise argparse.ArgumentTypeError(
            f"invalid address {text!r}: expected HOST:PORT with a port from 1 to 65535 "
            "(0: any free port), e.g. 127.0.0.1:8000"
        )
    return host.strip("[]") or "127.0.0.1", int(number)


def run_proxy(args: argparse.Namespace) -> int:
    """Serves until interrupted. Failures raise; `blindinfer.cli.errors` maps them to the
    exit status (2 for a refused --listen or bad options, 1/3/4 for an upstream that
    cannot be attested at start)."""
    from blindinfer.attestation.policy import load_policy
    from blindinfer.cli.main import check_listen
    from blindinfer.client.client import SIMULATION_BANNER, attest_unwarned
    from blindinfer.errors import SimulationWarning, UsageError
    from blindinfer.proxy.forward import (
        GRPC_REMOTE_REFUSAL,
        REMOTE_REFUSAL,
        AttestingProxy,
        ProxyConfig,
        is_loopback,
        serve_proxy,
    )
    from blindinfer.proxy.guard import TOKEN_HEADER
    from blindinfer.proxy.token import TokenFileError, load_or_create_token

    host, port = args.listen if isinstance(args.listen, tuple) else listen_address(args.listen)
    unix_socket: str | None = getattr(args, "unix_socket", None)
    if not unix_socket and not is_loopback(host) and not args.allow_remote:
        raise UsageError(REMOTE_REFUSAL.format(host=host))
    grpc_listen: tuple[str, int] | None = getattr(args, "grpc_listen", None)
    if grpc_listen is None and getattr(args, "upstream_grpc_port", None) is not None:
        raise UsageError("--upstream-grpc-port needs --grpc-listen")
    if grpc_listen is not None and not is_loopback(grpc_listen[0]) and not args.allow_remote:
        raise UsageError(GRPC_REMOTE_REFUSAL.format(host=grpc_listen[0]))
    if grpc_listen is not None:
        try:
            import blindinfer.proxy.grpc_forward  # noqa: F401 - grpcio and protobuf present?
        except ImportError as exc:
            raise UsageError(
                f"--grpc-listen needs grpcio and protobuf ({exc}): "
                "pip install 'blindinfer[proxy,grpc]'"
            ) from exc
    token_file: str | None = getattr(args, "access_token_file", None)
    try:
        token = load_or_create_token(token_file) if token_file else None
    except (TokenFileError, OSError) as exc:
        raise UsageError(f"--access-token-file: {exc}") from exc
    policy = load_policy(args.policy)
    try:
        config = ProxyConfig(
            upstream=args.upstream,
            policy=policy,
            simulation=args.simulation,
            api_key=args.api_key or None,
            forward_client_authorization=args.forward_client_authorization,
            reattest_seconds=args.reattest_seconds,
            collateral_url=args.collateral_url,
            allow_insecure_http=args.insecure_http_collateral,
            max_request_bytes=args.max_request_bytes,
            max_response_bytes=args.max_response_bytes,
            timeout=args.timeout,
            replicas=args.replicas,
            max_attestation_age=args.max_attestation_age,
            allow_hosts=tuple(getattr(args, "allow_host", ())),
            allow_origins=tuple(getattr(args, "allow_origin", ())),
            access_token=token,
            grpc_listen=grpc_listen,
            upstream_grpc_port=getattr(args, "upstream_grpc_port", None),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if not unix_socket:
        check_listen(host, port, "--listen")
    if grpc_listen is not None:
        check_listen(*grpc_listen, "--grpc-listen")
    if args.simulation:
        warnings.warn(SIMULATION_BANNER, SimulationWarning, stacklevel=1)
    if not args.start_unattested:  # a wrong --upstream or policy is an error, not a 503
        attest_unwarned(
            config.upstream,
            policy=policy,
            simulation=args.simulation,
            timeout=min(args.timeout, 30.0),
            collateral_url=args.collateral_url,
            allow_insecure_http=args.insecure_http_collateral,
        )
    shown = f"[{host}]" if ":" in host else host

    def ready(app: AttestingProxy, bound: int) -> None:
        status = app.upstream.failure
        state = (
            "attested" if status is None else f"NOT attested, refusing: {status.document['error']}"
        )
        where = f"unix:{unix_socket}" if unix_socket else f"http://{shown}:{bound}"
        print(f"{READY_PREFIX}{where} -> {config.upstream} ({state})", flush=True)
        if app.grpc is not None:
            grpc_host = f"[{app.grpc.host}]" if ":" in app.grpc.host else app.grpc.host
            print(f"{READY_GRPC_PREFIX}{grpc_host}:{app.grpc.port} (plaintext gRPC)", flush=True)
        if token_file:
            print(
                f"blindinfer proxy: every request needs the {TOKEN_HEADER} header, "
                f"with the token in {token_file}",
                flush=True,
            )

    try:
        serve_proxy(config, host, port, on_ready=ready, unix_socket=unix_socket)
    except ValueError as exc:  # an unusable --unix-socket path
        raise UsageError(f"--unix-socket: {exc}") from exc
    except OSError as exc:
        from blindinfer.proxy.grpc_forward import GrpcListenError

        if isinstance(exc, GrpcListenError):
            raise UsageError(f"--grpc-listen: {exc}") from exc
        raise
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from blindinfer.cli.args import Parser
    from blindinfer.cli.errors import debug_requested, report, simulation_banner

    parser = Parser(prog="blindinfer proxy", description=PROXY_DESCRIPTION)
    add_proxy_arguments(parser)
    parser.add_argument(
        "--debug", action="store_true", help="on failure, also print the Python traceback"
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # a usage error: argparse printed it
        return exc.code if isinstance(exc.code, int) else 2
    debug = debug_requested(args.debug)
    try:
        with simulation_banner():
            return run_proxy(args)
    except (Exception, KeyboardInterrupt) as exc:  # each failure: its line and exit status
        return report(exc, prog="blindinfer proxy", target=args.upstream, debug=debug)


if __name__ == "__main__":
    sys.exit(main())
