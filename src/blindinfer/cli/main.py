"""`blindinfer` subcommands. Server-side modules are imported only by the commands that
run a server, so the client commands work where only the client is installed."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import socket
import sys
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from blindinfer.cli import chat as chat_cli
from blindinfer.cli import convert as convert_cli
from blindinfer.cli import measure_image
from blindinfer.cli.args import (
    SIZE_HELP,
    TIME_FORMATS,
    HelpFormatter,
    Parser,
    aa_url,
    cdh_url,
    directory_or_new,
    https_url,
    human_size,
    kbs_resource,
    model_path,
    port,
    readable_file,
    size,
    time_value,
)
from blindinfer.cli.errors import (
    DEBUG_ENV,
    EXIT_INTERRUPTED,
    debug_requested,
    report,
    simulation_banner,
)
from blindinfer.errors import SimulationWarning, UsageError

DEFAULT_URL = "https://127.0.0.1:9924"

DESCRIPTION = """\
blindinfer runs ONNX models inside a Trusted Execution Environment (Intel SGX or TDX,
AMD SEV-SNP) and lets you check, before sending any data, that the server is the code
you expect on genuine hardware (remote attestation). Without a TEE it runs only in an
insecure simulation mode, for trying it out.

Start with:
  blindinfer serve --simulation          run a server (port 9924) without a TEE, to try it
  blindinfer measure --simulation        the MRENCLAVE a policy should pin
  blindinfer policy --from https://127.0.0.1:9924 --simulation > policy.toml
  blindinfer attest https://127.0.0.1:9924 --policy policy.toml --simulation
then upload, run, models and delete (each with --policy), or `blindinfer demo` for all
of it at once. `blindinfer COMMAND --help` describes each command.

Exit status: 0 ok, 1 evidence refused, 2 usage error, 3 policy mismatch, 4 server error
or unreachable, 130 interrupted. Docs: docs/cli.md (this command), docs/policy.md."""

CLIENT_EPILOG = (
    "Exit status: 0 ok; 1 evidence refused; 2 usage error; 3 policy mismatch; "
    "4 server error or unreachable."
)


def _replica_id(text: str) -> str:
    """argparse type for `serve --replica-id`: a name its audit log file can carry."""
    from blindinfer.server.audit import check_replica_id

    try:
        return check_replica_id(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--platform",
        choices=("auto", "simulation", "gramine-sgx", "tdx", "snp", "coco-tdx", "coco-snp"),
        default="auto",
        help="TEE to take evidence from; auto detects one, and never picks simulation; "
        "coco-tdx / coco-snp: through the Confidential Containers Attestation Agent (--aa-url)",
    )
    parser.add_argument(
        "--simulation",
        action="store_true",
        help="run without a TEE (insecure: protects nothing); same as --platform simulation",
    )
    parser.add_argument(
        "--pccs-url", help="Intel PCCS/PCS base URL for DCAP collateral (needed on SGX)"
    )
    parser.add_argument(
        "--kds-url",
        help="AMD KDS base URL (https://kdsintf.amd.com): the VCEK if the host does not supply "
        "it, and AMD's CRL that SEV-SNP evidence carries (clients refuse evidence without it)",
    )
    parser.add_argument(
        "--insecure-http-collateral",
        action="store_true",
        help="accept plain http:// for --pccs-url and --kds-url (default: https:// only)",
    )
    parser.add_argument(
        "--snp-product",
        choices=("Milan", "Genoa", "Turin"),
        help="AMD product, for SEV-SNP reports older than version 3 (default: from the report)",
    )
    parser.add_argument(
        "--snp-vmpl",
        type=int,
        choices=(0, 1, 2, 3),
        help="VMPL to request SEV-SNP reports at (default: the kernel's)",
    )
    parser.add_argument(
        "--max-model-bytes",
        type=size,
        metavar="SIZE",
        default="512M",
        help=f"largest model upload; {SIZE_HELP}",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=size,
        metavar="SIZE",
        default="64M",
        help="largest inference request body",
    )
    parser.add_argument(
        "--max-response-bytes",
        type=size,
        metavar="SIZE",
        default="64M",
        help="largest inference response (JSON outputs count at their longest encoding); "
        "refused in the worker before it reaches the server",
    )
    parser.add_argument("--max-models", type=int, default=32, help="most models held at once")
    parser.add_argument(
        "--memory-budget-bytes",
        type=size,
        metavar="SIZE",
        default="4G",
        help="measured memory of loaded models; least recently used ones are evicted past it",
    )
    parser.add_argument(
        "--max-stored-bytes", type=size, metavar="SIZE", default="16G", help="sealed model storage"
    )
    parser.add_argument("--workers", type=int, default=2, help="inference worker processes")
    parser.add_argument(
        "--worker-memory-bytes",
        type=size,
        metavar="SIZE",
        default="8G",
        help="address-space limit of each inference worker",
    )
    parser.add_argument(
        "--queue-limit",
        type=int,
        default=64,
        help="requests waiting for a worker before the server answers 503",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="onnxruntime threads per worker (0: all cores; cores/workers isolates tenants)",
    )
    parser.add_argument(
        "--intra-op-spin-us",
        type=int,
        default=50,
        help="microseconds onnxruntime's threads busy-wait for the next operator before "
        "they sleep (0: never; longer only where workers have cores of their own)",
    )
    parser.add_argument(
        "--max-tensor-batch",
        type=int,
        default=1,
        help="tensor models: join up to N runs of one model and one tenant that are already "
        "queued into one onnxruntime run, along a dynamic axis 0 (1: off; rows must be "
        "independent)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where models run: cpu, or cuda (one NVIDIA GPU; needs blindinfer[gpu] and a "
        "device, else serve refuses to start; --simulation only until GPU evidence exists)",
    )
    parser.add_argument(
        "--inference-timeout-ms", type=int, default=60_000, help="time limit of one inference"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=512,
        help="generative models: the largest max_tokens one request may ask for",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="generative models: generations one worker runs at once, sharing each "
        "decoding step (more wait for room)",
    )
    parser.add_argument(
        "--max-tokens-per-minute",
        type=int,
        default=200_000,
        help="generative models: prompt + completion tokens per tenant per minute (429 past "
        "it), unless the tenant sets tokens_per_minute",
    )
    parser.add_argument(
        "--max-concurrent-generations",
        type=int,
        default=16,
        help="generative models: generations one tenant may run at once (429 past it), "
        "unless the tenant sets max_concurrent_generations",
    )
    parser.add_argument(
        "--kv-cache-budget-bytes",
        type=size,
        metavar="SIZE",
        default=None,
        help="KV cache that generations in flight may reserve, shared equally by the "
        "tenants unless they set max_kv_cache_bytes (default: --memory-budget-bytes)",
    )
    parser.add_argument(
        "--load-timeout-ms",
        type=int,
        default=120_000,
        help="time limit of loading one model into a worker (upload, or reload after eviction)",
    )
    parser.add_argument(
        "--store-dir",
        type=directory_or_new("store directory"),
        help="persist sealed models in this directory (default: memory only, lost at exit)",
    )
    parser.add_argument(
        "--store-key-resource",
        type=kbs_resource,
        metavar="kbs:///REPO/TYPE/TAG",
        help="take the --store-dir key from this KBS resource through the Confidential Data "
        "Hub, for replicas sharing one store (default: the TEE's sealing key; "
        "docs/operations.md)",
    )
    parser.add_argument(
        "--cdh-url",
        type=cdh_url,
        default="http://127.0.0.1:8006",
        help="the Confidential Data Hub's REST API (api-server-rest): http:// to a loopback "
        "address only",
    )
    parser.add_argument(
        "--aa-url",
        type=aa_url,
        default="http://127.0.0.1:8006",
        help="with --platform coco-tdx|coco-snp: the Attestation Agent's REST API "
        "(api-server-rest, needs agent.guest_components_rest_api=all): http:// to a loopback "
        "address only",
    )
    parser.add_argument(
        "--replica-id",
        type=_replica_id,
        metavar="NAME",
        default=os.environ.get("BLINDINFER_REPLICA_ID"),
        help="this replica's name where several servers share --store-dir (e.g. the pod's "
        "name, or BLINDINFER_REPLICA_ID from the downward API): its audit log is "
        "audit-NAME.log (default: alone on the store, audit.log)",
    )
    parser.add_argument(
        "--auth-file",
        type=readable_file("auth file"),
        help="TOML of tenants and API key hashes (default: open mode, everyone is admin)",
    )
    parser.add_argument(
        "--metrics-model-names",
        action="store_true",
        help="label per-model inference counts in /metrics by model name (default: no names)",
    )
    parser.add_argument(
        "--isvprodid", type=int, default=1, help="ISVPRODID the simulated enclave reports"
    )
    parser.add_argument(
        "--isvsvn", type=int, default=1, help="ISVSVN the simulated enclave reports"
    )
    parser.add_argument(
        "--simulate-debug-enclave",
        action="store_true",
        help="simulation only: produce debug-enclave evidence (clients must refuse it)",
    )
    _connection_options(parser)


def _connection_options(parser: argparse.ArgumentParser) -> None:
    """Bounds on connections, request heads and bodies (server/connection_guard.py and
    server/body_guard.py): slow or unfinished requests must not hold the server."""
    group = parser.add_argument_group("connections and request bodies")
    group.add_argument(
        "--header-timeout-s",
        type=float,
        default=10.0,
        help="TLS handshake and request head must arrive within this time (else closed)",
    )
    group.add_argument(
        "--keep-alive-s", type=float, default=30.0, help="idle time between requests"
    )
    group.add_argument(
        "--max-header-bytes",
        type=size,
        metavar="SIZE",
        default="64K",
        help="largest request line and headers (431 past it)",
    )
    group.add_argument(
        "--max-headers", type=int, default=100, help="most headers in a request (431 past it)"
    )
    group.add_argument(
        "--body-timeout-s",
        type=float,
        default=30.0,
        help="longest pause in a request body, and its grace before --min-body-rate (408)",
    )
    group.add_argument(
        "--min-body-rate",
        type=size,
        metavar="SIZE",
        default="64K",
        help="bytes per second a body must average once its grace is over",
    )
    group.add_argument(
        "--max-connections",
        type=int,
        default=1000,
        help="open connections; past it the oldest one not serving a request is closed",
    )
    group.add_argument(
        "--max-concurrent-bodies",
        type=int,
        default=64,
        help="request bodies received at once, server-wide (503 past it)",
    )
    group.add_argument(
        "--max-body-buffer-bytes",
        type=size,
        metavar="SIZE",
        default="2G",
        help="bytes of request bodies received at once, server-wide (503 past it)",
    )


def _connection_limits(args: argparse.Namespace) -> object:
    from blindinfer.server.config import ConnectionLimits

    names = [field.name for field in dataclasses.fields(ConnectionLimits)]
    try:
        return ConnectionLimits(**{name: getattr(args, name) for name in names})
    except ValueError as exc:  # "limit max_headers must be ...": name the option instead
        text = str(exc)
        for name in names:
            text = text.replace(f"limit {name} ", f"--{name.replace('_', '-')} ")
        raise UsageError(text) from exc


def _simulation_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--simulation",
        action="store_true",
        help="accept a SIMULATION server (no TEE, insecure: for testing only)",
    )


def _policy_option(parser: argparse.ArgumentParser, *, required: bool, help: str) -> None:
    parser.add_argument("--policy", required=required, type=readable_file("policy file"), help=help)


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url", type=https_url, default=DEFAULT_URL, help="server URL, https://host:port"
    )
    _policy_option(
        parser, required=True, help="policy TOML the server must satisfy (blindinfer policy)"
    )
    _simulation_option(parser)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("BLINDINFER_API_KEY"),
        help="API key of your tenant, sent only over the attested channel "
        "(default: $BLINDINFER_API_KEY; none in open mode)",
    )


def _wrap(text: str | None) -> str | None:
    """Descriptions are printed as written (the top-level one has a layout): wrap them."""
    return None if text is None else textwrap.fill(text, 88)


def _command(
    commands: Any, name: str, help: str, description: str | None = None, epilog: str | None = None
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help,
        description=_wrap(description or help[0].upper() + help[1:] + "."),
        epilog=_wrap(epilog),
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"on failure, also print the Python traceback (or {DEBUG_ENV}=1)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="blindinfer", description=DESCRIPTION)
    parser.add_argument(
        "--debug",
        action="store_true",
        help=f"on failure, also print the Python traceback (or {DEBUG_ENV}=1)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = _command(
        commands,
        "serve",
        "run the attested inference server",
        "Run the attested inference server. Without a TEE it refuses to start unless "
        "--simulation is given. Sizes: " + SIZE_HELP + ".",
        "Exit status: 0 stopped; 2 usage error (bad value, port in use, no TEE without "
        "--simulation); 130 interrupted.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument(
        "--port", type=port, default=9924, help="TCP port to listen on (0: any free port)"
    )
    serve.add_argument(
        "--blindai-compat",
        action="store_true",
        help="also serve BlindAI Core 0.6.3 clients (ports 9923 HTTP, 9924 and 9925 TLS)",
    )
    serve.add_argument(
        "--blindai-ports",
        default="9923,9924,9925",
        help="with --blindai-compat: its attestation,run,management ports",
    )
    serve.add_argument(
        "--grpc-port",
        type=port,
        default=0,
        help="also serve the OIP v2 gRPC API on this TCP port, over TLS with the attested "
        "key (default 0: no gRPC; docs/grpc.md)",
    )
    _server_options(serve)

    convert_cli.add_command(commands, _command)

    image = _command(
        commands,
        "image",
        "build the confidential-VM boot set from this source checkout",
        "Build firmware, kernel, initrd and command line for an SEV-SNP or TDX VM from the "
        "committed source, every input pinned (deploy/image/). Two builds of one commit give "
        "identical files; `measure --image DIR` then computes what the hardware will report.",
    )
    image_commands = image.add_subparsers(dest="image_command", metavar="build", required=True)
    image_build = image_commands.add_parser(
        "build", help="build the boot set into --out DIR", formatter_class=HelpFormatter
    )
    image_build.add_argument("--out", type=Path, required=True, help="directory for the boot set")
    image_build.add_argument(
        "--cache", type=Path, help="download cache (default ~/.cache/blindinfer-image)"
    )
    image_build.add_argument(
        "--firmware",
        metavar="DIR",
        type=Path,
        help="a directory with OVMF.amdsev.fd and OVMF.inteltdx.fd built before (a boot set "
        "of your own), instead of building them again (about 4 minutes)",
    )
    image_build.add_argument(
        "--debian-mirror",
        metavar="URL",
        help="Debian archive root (the directory holding pool/) to download the pinned "
        "packages from; default $BLINDINFER_DEBIAN_MIRROR, else this machine's apt sources",
    )

    measure = _command(
        commands,
        "measure",
        "print the measurement a policy should pin",
        "Print the simulated MRENCLAVE of this build with these server settings (the same "
        "options as serve). Like serve, it refuses without --simulation where there is no "
        "TEE; on a TEE, measure the enclave with its own tools (docs/deploy-*.md).\n"
        "With --image DIR --platform snp|tdx: the launch measurement of a confidential-VM "
        "boot set, computed from its files, as the [snp] or [tdx] section of a policy.",
    )
    _server_options(measure)
    measure_image.add_options(measure)

    attest = _command(
        commands,
        "attest",
        "verify a server's evidence and print a report",
        epilog=CLIENT_EPILOG,
    )
    attest.add_argument("url", type=https_url, help="server URL, https://host:port")
    _policy_option(attest, required=False, help="policy TOML (without it: authenticity only)")
    _simulation_option(attest)
    attest.add_argument("--json", action="store_true", help="print the report as JSON")
    attest.add_argument(
        "--save",
        type=Path,
        metavar="BUNDLE",
        help="write the evidence bundle here, for `blindinfer verify` (even if refused)",
    )
    attest.add_argument(
        "--collateral-url",
        help="fetch Intel collateral from this PCCS/PCS (default: the collateral the server sends)",
    )
    attest.add_argument(
        "--insecure-http-collateral",
        action="store_true",
        help="accept a plain http:// --collateral-url (default: https:// only)",
    )

    verify = _command(
        commands,
        "verify",
        "verify evidence offline (a bundle, or raw Intel/AMD/NVIDIA evidence)",
        epilog="Exit status: 0 authentic (and policy satisfied, if given); "
        "1 not authentic; 2 usage error; 3 authentic but the policy is not satisfied.",
    )
    verify.add_argument(
        "bundle",
        nargs="?",
        type=readable_file("bundle"),
        help="bundle from `attest --save`",
    )
    verify.add_argument(
        "--intel-quote", type=readable_file("quote file"), help="SGX or TDX DCAP quote (binary)"
    )
    verify.add_argument(
        "--collateral", type=readable_file("collateral file"), help="dcap-qvl collateral JSON"
    )
    verify.add_argument(
        "--snp-report",
        type=readable_file("SNP report file"),
        help="SEV-SNP attestation report (binary)",
    )
    verify.add_argument(
        "--vcek", type=readable_file("VCEK file"), help="VCEK or VLEK certificate (DER or PEM)"
    )
    verify.add_argument(
        "--ask-ark",
        type=readable_file("ASK/ARK file"),
        help="PEM with the ASK/ASVK and the ARK (default: the pinned AMD roots)",
    )
    verify.add_argument(
        "--snp-crl",
        type=readable_file("AMD CRL file"),
        help="AMD's CRL for the report's product (DER or PEM, from KDS /vcek/v1/<product>/crl); "
        "without it a policy refuses the report unless it sets [snp] allow_missing_crl",
    )
    verify.add_argument(
        "--nvidia-report",
        type=readable_file("NVIDIA report file"),
        help="H100 SPDM report (hex text or binary)",
    )
    verify.add_argument(
        "--nvidia-certs",
        type=readable_file("NVIDIA certificate file"),
        help="GPU device certificate chain (PEM)",
    )
    verify.add_argument("--nonce", help="expected nonce (hex) of the NVIDIA report")
    verify.add_argument(
        "--at",
        type=time_value,
        help=f"verification time: {TIME_FORMATS} (default: now; a bundle's capture time)",
    )
    _policy_option(verify, required=False, help="policy TOML (without it: authenticity only)")
    verify.add_argument(
        "--simulation", action="store_true", help="accept the simulation root (testing only)"
    )
    verify.add_argument("--json", action="store_true", help="print the result as JSON")

    receipt = _command(
        commands,
        "verify-receipt",
        "verify a receipt's proof offline (from Receipt.save)",
        epilog="Exit status: 0 the receipt verifies; 1 it does not (the reason is printed); "
        "2 usage error (a missing file, a bad value).",
    )
    receipt.add_argument(
        "proof", type=readable_file("proof file"), help="proof JSON written by Receipt.save"
    )
    _policy_option(receipt, required=True, help="policy TOML the attested server had to satisfy")
    receipt.add_argument(
        "--simulation", action="store_true", help="accept the simulation root (testing only)"
    )
    receipt.add_argument(
        "--inputs",
        type=readable_file("inputs file"),
        help=".npz of the inputs to check the digest of (default: not checked)",
    )
    receipt.add_argument(
        "--outputs",
        type=readable_file("outputs file"),
        help=".npz of the outputs to check (default: not checked)",
    )

    policy = _command(
        commands,
        "policy",
        "print a policy from a server's evidence",
        "Print a policy TOML filled with the values a server reports, for you to compare "
        "with what `blindinfer measure` printed before you trust it. Only values that pin "
        "code are set; anything weaker than the defaults is left commented out with a WARNING.",
        CLIENT_EPILOG,
    )
    policy.add_argument(
        "--from",
        dest="source",
        required=True,
        type=https_url,
        metavar="URL",
        help="server URL, https://host:port",
    )
    _simulation_option(policy)

    upload = _command(commands, "upload", "upload an ONNX model", epilog=CLIENT_EPILOG)
    upload.add_argument(
        "model",
        type=model_path("model file"),
        help="the .onnx file, or an onnxruntime-genai model folder (a generative model)",
    )
    upload.add_argument("--name", help="name to run it by (default: none, run it by model_id)")
    _client_options(upload)

    run = _command(
        commands,
        "run",
        "run a model on inputs from an .npz or .npy file",
        epilog=CLIENT_EPILOG,
    )
    run.add_argument("model", help="model name, model_id or SHA-256")
    run.add_argument(
        "inputs",
        type=readable_file("inputs file"),
        help=".npz with one array per input name, or .npy with the one input of a "
        "single-input model",
    )
    run.add_argument("--output", type=Path, help="write outputs to this .npz (default: print)")
    _client_options(run)

    delete = _command(commands, "delete", "delete a model", epilog=CLIENT_EPILOG)
    delete.add_argument("model", help="model name, model_id or SHA-256")
    _client_options(delete)

    models = _command(commands, "models", "list the models", epilog=CLIENT_EPILOG)
    models.add_argument(
        "--long",
        "-l",
        action="store_true",
        help="full SHA-256 hashes and sizes in bytes (default: hashes shortened to an "
        "unambiguous prefix, sizes rounded)",
    )
    models.add_argument("--json", action="store_true", help="print the list as JSON")
    _client_options(models)

    chat = _command(commands, "chat", chat_cli.HELP, chat_cli.DESCRIPTION, chat_cli.EPILOG)
    chat_cli.add_arguments(chat)
    _client_options(chat)

    demo = _command(commands, "demo", "start a simulation server and run the whole flow")
    demo.add_argument(
        "flow",
        nargs="?",
        choices=("chat",),
        help="chat: a generative model (SmolLM2-135M-Instruct, converted once and cached) "
        "streamed through the openai SDK, directly and through the proxy (default: the tensor "
        "model flow)",
    )
    demo.add_argument(
        "--model",
        type=Path,
        metavar="DIR",
        help="demo chat: an onnxruntime-genai model folder to use instead of SmolLM2",
    )

    audit = _command(commands, "audit", "inspect the server's audit log")
    audit_commands = audit.add_subparsers(
        dest="audit_command", required=True, metavar="ACTION", parser_class=Parser
    )
    audit_verify = audit_commands.add_parser(
        "verify",
        help="check an audit log's hash chain",
        description="Check an audit log's hash chain offline.",
        epilog="Exit status: 0 intact chain; 1 broken chain or missing anchor; "
        "2 the file is missing or not readable.",
        formatter_class=HelpFormatter,
    )
    audit_verify.add_argument(
        "path", type=readable_file("audit log"), help="the audit log (JSON lines)"
    )
    audit_verify.add_argument("--json", action="store_true", help="print the result as JSON")
    audit_verify.add_argument(
        "--anchor",
        metavar="HASH",
        help="a head hash recorded elsewhere that must still be in the log",
    )

    from blindinfer.cli.proxy import PROXY_DESCRIPTION, add_proxy_arguments  # argparse only

    proxy = _command(
        commands,
        "proxy",
        "attesting proxy for any Open Inference Protocol client",
        PROXY_DESCRIPTION,
        CLIENT_EPILOG,
    )
    add_proxy_arguments(proxy)

    keys = _command(commands, "new-key", "make an API key and its config snippet")
    keys.add_argument("--tenant", required=True, help="tenant the key belongs to")
    keys.add_argument(
        "--role",
        choices=("admin", "owner", "user"),
        required=True,
        help="admin: everything; owner: upload and manage its models; user: run them",
    )
    keys.add_argument("--key-id", required=True, help="a name for this key, e.g. alice-laptop")
    return parser


def _config(args: argparse.Namespace) -> object:
    from blindinfer.server.config import MAX_SPIN_US, Limits, ServerConfig

    try:
        limits = Limits(
            max_model_bytes=args.max_model_bytes,
            max_request_bytes=args.max_request_bytes,
            max_response_bytes=args.max_response_bytes,
            max_models=args.max_models,
            memory_budget_bytes=args.memory_budget_bytes,
            max_stored_bytes=args.max_stored_bytes,
            workers=args.workers,
            worker_memory_bytes=args.worker_memory_bytes,
            queue_limit=args.queue_limit,
            inference_timeout_ms=args.inference_timeout_ms,
            load_timeout_ms=args.load_timeout_ms,
            max_new_tokens=args.max_new_tokens,
            max_batch=args.max_batch,
            max_tokens_per_minute=args.max_tokens_per_minute,
            max_concurrent_generations=args.max_concurrent_generations,
            kv_cache_budget_bytes=args.kv_cache_budget_bytes,
        )
    except ValueError as exc:  # "limit workers must be ...": name the option instead
        text = str(exc)
        for field in dataclasses.fields(Limits):
            text = text.replace(f"limit {field.name} ", f"--{field.name.replace('_', '-')} ")
        raise UsageError(text) from exc
    spin_us = getattr(args, "intra_op_spin_us", 50)
    if not 0 <= spin_us <= MAX_SPIN_US:
        raise UsageError(f"--intra-op-spin-us must be from 0 to {MAX_SPIN_US}, got {spin_us}")
    tensor_batch = getattr(args, "max_tensor_batch", 1)
    if not 1 <= tensor_batch <= 1024:
        raise UsageError(f"--max-tensor-batch must be from 1 to 1024, got {tensor_batch}")
    return ServerConfig(
        host=getattr(args, "host", "127.0.0.1"),
        port=getattr(args, "port", 9924),
        simulation=args.simulation,
        limits=limits,
        isvprodid=args.isvprodid,
        isvsvn=args.isvsvn,
        simulate_debug_enclave=args.simulate_debug_enclave,
        platform=args.platform,
        pccs_url=args.pccs_url,
        kds_url=args.kds_url,
        insecure_http_collateral=args.insecure_http_collateral,
        snp_product=args.snp_product,
        snp_vmpl=args.snp_vmpl,
        store_dir=args.store_dir,
        store_key_resource=getattr(args, "store_key_resource", None),
        cdh_url=getattr(args, "cdh_url", "http://127.0.0.1:8006"),
        aa_url=getattr(args, "aa_url", "http://127.0.0.1:8006"),
        replica_id=getattr(args, "replica_id", None),
        auth_file=str(args.auth_file) if args.auth_file else None,
        intra_op_threads=args.intra_op_threads,
        intra_op_spin_us=spin_us,
        max_tensor_batch=tensor_batch,
        device=getattr(args, "device", "cpu"),
        metrics_model_names=args.metrics_model_names,
        connections=_connection_limits(args),  # type: ignore[arg-type]
    )


def check_listen(host: str, port: int, option: str = "--port") -> None:
    """Binds and releases `host:port` the way the server will, so that a port in use or a
    wrong address is a usage error before any worker or platform starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except socket.gaierror:
        raise UsageError(
            f"cannot listen on {host}: unknown host or address\n"
            "give an address of this machine with --host (127.0.0.1, 0.0.0.0, ::1)"
        ) from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(
                f"cannot listen on {host}:{port}: the port is already in use (is another "
                f"server running?)\npick another one with {option}, or stop what listens there"
            ) from None
        if exc.errno == errno.EACCES:
            raise UsageError(
                f"cannot listen on {host}:{port}: permission denied\n"
                f"ports below 1024 need privileges: pick another one with {option}"
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise UsageError(
                f"cannot listen on {host}: not an address of this machine\n"
                "give one of its addresses (127.0.0.1, 0.0.0.0, ::1)"
            ) from None
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _two_lines(text: str) -> str:
    """The server's refusal "no TEE ...; start with --simulation ..." as what went wrong,
    then what to do."""
    return text.replace("; start with --simulation", "\nstart with --simulation", 1)


def _serve(args: argparse.Namespace) -> int:
    from blindinfer.server.auth import AuthConfigError
    from blindinfer.server.config import ServerConfig
    from blindinfer.server.platforms import NoPlatformError
    from blindinfer.server.process import READY_PREFIX
    from blindinfer.server.serve import serve

    config = _config(args)
    assert isinstance(config, ServerConfig)
    if args.blindai_compat:
        from blindinfer.server.blindai import parse_ports

        try:
            ports = parse_ports(args.blindai_ports)
        except ValueError as exc:
            raise UsageError(f"--blindai-ports: {exc}") from exc
        try:
            config = dataclasses.replace(config, blindai_compat=True, blindai_ports=ports)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    if args.grpc_port:
        try:
            config = dataclasses.replace(config, grpc_port=args.grpc_port)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    if config.simulate_debug_enclave and config.platform_choice != "simulation":
        raise UsageError("--simulate-debug-enclave needs --simulation")
    check_listen(config.host, config.port)
    if config.grpc_port:
        check_listen(config.host, config.grpc_port, "--grpc-port")
    if config.blindai_compat:
        for number in config.blindai_ports:
            check_listen(config.host, number, "--blindai-ports")
    host = f"[{config.host}]" if ":" in config.host else config.host
    try:
        serve(
            config, on_ready=lambda port: print(f"{READY_PREFIX}https://{host}:{port}", flush=True)
        )
    except (NoPlatformError, AuthConfigError) as exc:
        raise UsageError(_two_lines(str(exc))) from exc
    return 0


def _measure(args: argparse.Namespace) -> int:
    if args.image is not None:
        return measure_image.measure_image(args)
    from blindinfer.server.config import ServerConfig
    from blindinfer.server.platforms import simulated_mrenclave
    from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER

    config = _config(args)
    assert isinstance(config, ServerConfig)
    choice = config.platform_choice
    if choice == "auto":
        from blindinfer.tee.detect import describe_missing, detect_platform

        detected = detect_platform()
        if detected is None:  # the same refusal as `serve` (server/platforms.py)
            raise UsageError(
                _two_lines(
                    describe_missing() + "; start with --simulation to run without "
                    "confidentiality guarantees"
                )
            )
        choice = detected
    if choice != "simulation":
        raise UsageError(
            f"measure computes the simulated MRENCLAVE only; on {choice}, measure the "
            "enclave or VM image with the platform's tools\nsee docs/deploy-gramine-sgx.md "
            "and docs/deploy-tdx-snp.md, or pass --simulation for the simulated value"
        )
    print(f"mrenclave = {simulated_mrenclave(config).hex()}")
    print(f"mrsigner  = {SIMULATION_MRSIGNER.hex()}  (simulation signer)")
    return 0


def _attest(args: argparse.Namespace) -> int:
    from blindinfer.attestation.intel.pccs import PccsCollateral
    from blindinfer.attestation.policy import load_policy
    from blindinfer.client.client import SIMULATION_BANNER, capture, verify_bundle

    policy = load_policy(args.policy) if args.policy else None
    if args.simulation:
        warnings.warn(SIMULATION_BANNER, SimulationWarning, stacklevel=1)
    source = (
        PccsCollateral(args.collateral_url, allow_insecure_http=args.insecure_http_collateral)
        if args.collateral_url
        else None
    )
    bundle = capture(args.url, collateral=source)
    if args.save:
        bundle.save(args.save)  # saved before verification, so a refusal can be audited
    report = verify_bundle(bundle, policy=policy, simulation=args.simulation)
    if args.json:
        print(json.dumps({**report.to_dict(), "policy_applied": policy is not None}, indent=2))
    else:
        print(report.summary())
        print("  policy        " + ("satisfied" if policy else "NOT CHECKED (authenticity only)"))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from blindinfer.cli.verify import run_verify

    return run_verify(args)


def _verify_receipt(args: argparse.Namespace) -> int:
    from blindinfer.cli.verify_receipt import run_verify_receipt

    return run_verify_receipt(args)


def _policy(args: argparse.Namespace) -> int:
    from blindinfer.attestation.policy_toml import suggest
    from blindinfer.client.client import attest

    report = attest(args.source, policy=None, simulation=args.simulation)
    suggestion = suggest(report, args.source)
    print(suggestion.text, end="")
    for warning in suggestion.warnings:  # stderr: still seen with `> policy.toml`
        print(f"blindinfer policy: WARNING: {warning} (left commented out)", file=sys.stderr)
    return 0


def load_inputs(path: Path) -> dict[str, Any] | Any:
    """Arrays by input name from an .npz, or the one array of an .npy (a NumPy array,
    for a single-input model). A file that is neither is a usage error."""
    import zipfile

    import numpy as np

    try:
        loaded = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        reason = "" if "pickle" in str(exc) else f" ({one_reason(exc)})"
        raise UsageError(
            f"{path} is not a NumPy .npz or .npy file{reason}\n"
            "save inputs with numpy.savez(path, input_name=array) or numpy.save(path, array)"
        ) from exc
    if isinstance(loaded, np.ndarray):
        return loaded
    with loaded as archive:
        return {name: archive[name] for name in archive.files}


def one_reason(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _run_inputs(client: Any, model: str, path: Path) -> Any:
    inputs = load_inputs(path)
    if isinstance(inputs, dict):
        return inputs
    names = [spec.name for spec in client.model_metadata(model).inputs]
    if len(names) != 1:
        raise UsageError(
            f"{path} holds one array, but model {model!r} takes {len(names)} inputs "
            f"({', '.join(names)})\nsave them in an .npz by input name: "
            f"numpy.savez('inputs.npz', {', '.join(f'{n}=...' for n in names)})"
        )
    return {names[0]: inputs}


def _short_prefix(values: Sequence[str], minimum: int) -> int:
    """The shortest prefix length (at least `minimum`) that tells all `values` apart."""
    length = minimum
    longest = max((len(v) for v in values), default=0)
    while length < longest and len({v[:length] for v in values}) < len(set(values)):
        length += 1
    return length


def print_models(infos: Sequence[Any], *, long: bool, stream: Any = None) -> None:
    """A table with a header: NAME, MODEL ID, SIZE, SHA-256, OWNER, SHARED WITH.

    Model ids are printed whole (34 characters: what run and delete take); SHA-256 hashes
    are shortened to the shortest prefix, at least 16 hex digits, that tells the listed
    models apart, and sizes rounded, unless `long` (full hashes, sizes in bytes)."""
    out = stream if stream is not None else sys.stdout
    if not infos:
        print("no models", file=out)
        return
    hash_length = 64 if long else _short_prefix([i.sha256 for i in infos], 16)
    rows = [("NAME", "MODEL ID", "SIZE", "SHA-256", "OWNER", "SHARED WITH")]
    for info in infos:
        rows.append(
            (
                info.name or "-",
                info.model_id,
                str(info.size) if long else human_size(info.size),
                info.sha256[:hash_length],
                info.owner or "-",
                ",".join(info.shared_with) or "-",
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        cells = [
            cell.rjust(width) if column == 2 else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip(), file=out)


def _with_client(args: argparse.Namespace) -> int:
    import numpy as np

    from blindinfer.cli.progress import upload_with_progress
    from blindinfer.client.client import connect

    with connect(
        args.url, policy=args.policy, simulation=args.simulation, api_key=args.api_key
    ) as client:
        if args.command == "upload":
            info = upload_with_progress(client, args.model, args.name)
            print(json.dumps({"model_id": info.model_id, "name": info.name, "sha256": info.sha256}))
        elif args.command == "run":
            outputs = client.run_model(args.model, _run_inputs(client, args.model, args.inputs))
            if args.output:
                np.savez(args.output, **outputs)  # type: ignore[arg-type]
            else:
                for name, array in outputs.items():
                    print(f"{name} {array.dtype} {list(array.shape)}\n{array}")
        elif args.command == "delete":
            info = client.delete_model(args.model)
            print(json.dumps({"deleted": info.model_id, "name": info.name}))
        elif args.json:
            documents = [
                {
                    "name": i.name,
                    "model_id": i.model_id,
                    "sha256": i.sha256,
                    "size": i.size,
                    "owner": i.owner,
                    "shared_with": list(i.shared_with),
                }
                for i in client.list_models()
            ]
            print(json.dumps(documents, indent=2))
        else:
            print_models(client.list_models(), long=args.long)
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.flow == "chat":
        from blindinfer.cli.demo_chat import run_chat_demo

        return run_chat_demo(args.model)
    if args.model is not None:
        raise UsageError("--model is for `blindinfer demo chat`")
    from blindinfer.cli.demo import run_demo

    return run_demo()


def _audit(args: argparse.Namespace) -> int:
    from blindinfer.cli.audit import run_audit

    return run_audit(args)


def _proxy(args: argparse.Namespace) -> int:
    from blindinfer.cli.proxy import run_proxy

    return run_proxy(args)


def _new_key(args: argparse.Namespace) -> int:
    from blindinfer.server.keys_cli import new_key_toml

    secret, snippet = new_key_toml(args.tenant, args.role, args.key_id)
    print(f"API key (give it to its holder, it is not stored anywhere): {secret}")
    print("Add to the --auth-file, under the tenant's [[tenant]] table:")
    print(snippet)
    return 0


_COMMANDS = {
    "serve": _serve,
    "measure": _measure,
    "image": measure_image.build_image,
    "convert": convert_cli.run,
    "chat": chat_cli.run,
    "attest": _attest,
    "policy": _policy,
    "verify": _verify,
    "verify-receipt": _verify_receipt,
    "upload": _with_client,
    "run": _with_client,
    "delete": _with_client,
    "models": _with_client,
    "demo": _demo,
    "audit": _audit,
    "new-key": _new_key,
    "proxy": _proxy,
}


def target_of(args: argparse.Namespace) -> str | None:
    """The server a command talks to, for messages about reaching it."""
    for name in ("url", "source", "upstream"):
        value = getattr(args, name, None)
        if isinstance(value, str):
            return value
    return None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    prog = f"blindinfer {args.command}"
    debug = debug_requested(bool(getattr(args, "debug", False)))
    try:
        with simulation_banner():
            return _COMMANDS[args.command](args)
    except (Exception, KeyboardInterrupt) as exc:  # every failure: its line and exit status
        return report(exc, prog=prog, target=target_of(args), debug=debug)


if __name__ == "__main__":
    sys.exit(main())
