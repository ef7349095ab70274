"""`blindinfer` subcommands. Server-side modules are imported only by the commands that
run a server, so the client commands work where only the client is installed."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from blindinfer.errors import BlindInferError, SimulationWarning

DEFAULT_URL = "https://127.0.0.1:9924"


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--platform",
        choices=("auto", "simulation", "gramine-sgx", "tdx", "snp"),
        default="auto",
        help="TEE to take evidence from (default: auto-detect; never simulation unless asked)",
    )
    parser.add_argument(
        "--simulation",
        action="store_true",
        help="run without a TEE (insecure); = --platform simulation",
    )
    parser.add_argument("--pccs-url", help="Intel PCCS/PCS base URL for DCAP collateral")
    parser.add_argument("--kds-url", help="AMD KDS base URL, if the host does not supply the VCEK")
    parser.add_argument("--snp-product", choices=("Milan", "Genoa", "Turin"))
    parser.add_argument("--snp-vmpl", type=int, choices=(0, 1, 2, 3))
    parser.add_argument("--max-model-bytes", type=int, default=512 << 20)
    parser.add_argument("--max-request-bytes", type=int, default=64 << 20)
    parser.add_argument("--max-models", type=int, default=32)
    parser.add_argument(
        "--memory-budget-bytes", type=int, default=4 << 30, help="measured memory of loaded models"
    )
    parser.add_argument("--max-stored-bytes", type=int, default=16 << 30, help="sealed storage")
    parser.add_argument("--workers", type=int, default=2, help="inference worker processes")
    parser.add_argument("--worker-memory-bytes", type=int, default=8 << 30)
    parser.add_argument("--queue-limit", type=int, default=64)
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="onnxruntime threads per worker (0: all cores; cores/workers isolates tenants)",
    )
    parser.add_argument("--inference-timeout-ms", type=int, default=60_000)
    parser.add_argument("--store-dir", help="persist sealed models here (default: memory only)")
    parser.add_argument("--auth-file", help="tenants and API key hashes (default: open mode)")
    parser.add_argument(
        "--metrics-model-names",
        action="store_true",
        help="label per-model inference counts in /metrics by model name (default: no names)",
    )
    parser.add_argument("--isvprodid", type=int, default=1)
    parser.add_argument("--isvsvn", type=int, default=1)
    parser.add_argument(
        "--simulate-debug-enclave",
        action="store_true",
        help="simulation only: produce debug-enclave evidence (clients must refuse it)",
    )


def _client_options(parser: argparse.ArgumentParser, *, policy_required: bool = True) -> None:
    parser.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    parser.add_argument("--policy", required=policy_required, help="policy TOML file")
    parser.add_argument(
        "--simulation", action="store_true", help="accept a SIMULATION server (no TEE, insecure)"
    )
    parser.add_argument(
        "--api-key", default=os.environ.get("BLINDINFER_API_KEY"), help="or BLINDINFER_API_KEY"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blindinfer", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the attested inference server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=9924)
    serve.add_argument(
        "--blindai-compat",
        action="store_true",
        help="also serve BlindAI Core 0.6.3 clients (ports 9923 HTTP, 9924 and 9925 TLS)",
    )
    serve.add_argument(
        "--blindai-ports", default="9923,9924,9925", help="attestation,run,management ports"
    )
    _server_options(serve)

    measure = commands.add_parser("measure", help="print the MRENCLAVE a policy should pin")
    _server_options(measure)

    attest = commands.add_parser("attest", help="verify a server's evidence and print a report")
    attest.add_argument("url")
    attest.add_argument("--policy", help="policy TOML (without it: authenticity only)")
    attest.add_argument("--simulation", action="store_true")
    attest.add_argument("--json", action="store_true")
    attest.add_argument("--save", type=Path, metavar="BUNDLE", help="write the evidence bundle")
    attest.add_argument(
        "--collateral-url", help="fetch Intel collateral from this PCCS/PCS, not from the server"
    )

    verify = commands.add_parser(
        "verify",
        help="verify evidence offline (a bundle, or raw Intel/AMD/NVIDIA evidence)",
        description="Exit status: 0 authentic (and policy satisfied, if given); "
        "1 not authentic; 3 authentic but the policy is not satisfied.",
    )
    verify.add_argument("bundle", nargs="?", type=Path, help="bundle from `attest --save`")
    verify.add_argument("--intel-quote", type=Path, help="SGX or TDX DCAP quote (binary)")
    verify.add_argument("--collateral", type=Path, help="dcap-qvl collateral JSON")
    verify.add_argument("--snp-report", type=Path, help="SEV-SNP attestation report (binary)")
    verify.add_argument("--vcek", type=Path, help="VCEK or VLEK certificate (DER or PEM)")
    verify.add_argument("--ask-ark", type=Path, help="PEM with the ASK/ASVK and the ARK")
    verify.add_argument("--nvidia-report", type=Path, help="H100 SPDM report (hex text or binary)")
    verify.add_argument("--nvidia-certs", type=Path, help="GPU device certificate chain (PEM)")
    verify.add_argument("--nonce", help="expected nonce (hex) of the NVIDIA report")
    verify.add_argument("--at", help="verification time: Unix seconds or ISO 8601 (default: now)")
    verify.add_argument("--policy", help="policy TOML (without it: authenticity only)")
    verify.add_argument("--simulation", action="store_true", help="accept the simulation root")
    verify.add_argument("--json", action="store_true")

    receipt = commands.add_parser(
        "verify-receipt",
        help="verify a receipt's proof offline (from Receipt.save)",
        description="Exit status: 0 the receipt verifies; 1 it does not (the reason is printed).",
    )
    receipt.add_argument("proof", type=Path, help="proof JSON written by Receipt.save")
    receipt.add_argument("--policy", required=True, help="policy TOML file")
    receipt.add_argument("--simulation", action="store_true", help="accept the simulation root")
    receipt.add_argument("--inputs", type=Path, help=".npz of the inputs to check the digest of")
    receipt.add_argument("--outputs", type=Path, help=".npz of the outputs to check")

    policy = commands.add_parser("policy", help="print a policy from a server's evidence")
    policy.add_argument("--from", dest="source", required=True, metavar="URL")
    policy.add_argument("--simulation", action="store_true")

    upload = commands.add_parser("upload", help="upload an ONNX model")
    upload.add_argument("model", type=Path)
    upload.add_argument("--name")
    _client_options(upload)

    run = commands.add_parser("run", help="run a model on inputs from an .npz file")
    run.add_argument("model", help="model name, model_id or SHA-256")
    run.add_argument("inputs", type=Path, help=".npz with one array per input name")
    run.add_argument("--output", type=Path, help="write outputs to this .npz (default: print)")
    _client_options(run)

    delete = commands.add_parser("delete", help="delete a model")
    delete.add_argument("model")
    _client_options(delete)

    models = commands.add_parser("models", help="list the models")
    _client_options(models)

    commands.add_parser("demo", help="start a simulation server and run the whole flow")

    audit = commands.add_parser("audit", help="inspect the server's audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    audit_verify = audit_commands.add_parser(
        "verify",
        help="check an audit log's hash chain",
        description="Exit status: 0 intact chain; 1 broken chain, missing anchor or "
        "unreadable file.",
    )
    audit_verify.add_argument("path", type=Path, help="the audit log (JSON lines)")
    audit_verify.add_argument("--json", action="store_true")
    audit_verify.add_argument(
        "--anchor",
        metavar="HASH",
        help="a head hash recorded elsewhere that must still be in the log",
    )

    from blindinfer.cli.proxy import add_proxy_arguments  # argparse only

    proxy = commands.add_parser(
        "proxy", help="attesting proxy for any Open Inference Protocol client"
    )
    add_proxy_arguments(proxy)

    keys = commands.add_parser("new-key", help="make an API key and its config snippet")
    keys.add_argument("--tenant", required=True)
    keys.add_argument("--role", choices=("admin", "owner", "user"), required=True)
    keys.add_argument("--key-id", required=True)
    return parser


def _config(args: argparse.Namespace) -> object:
    from blindinfer.server.config import Limits, ServerConfig

    return ServerConfig(
        host=getattr(args, "host", "127.0.0.1"),
        port=getattr(args, "port", 9924),
        simulation=args.simulation,
        limits=Limits(
            max_model_bytes=args.max_model_bytes,
            max_request_bytes=args.max_request_bytes,
            max_models=args.max_models,
            memory_budget_bytes=args.memory_budget_bytes,
            max_stored_bytes=args.max_stored_bytes,
            workers=args.workers,
            worker_memory_bytes=args.worker_memory_bytes,
            queue_limit=args.queue_limit,
            inference_timeout_ms=args.inference_timeout_ms,
        ),
        isvprodid=args.isvprodid,
        isvsvn=args.isvsvn,
        simulate_debug_enclave=args.simulate_debug_enclave,
        platform=args.platform,
        pccs_url=args.pccs_url,
        kds_url=args.kds_url,
        snp_product=args.snp_product,
        snp_vmpl=args.snp_vmpl,
        store_dir=args.store_dir,
        auth_file=args.auth_file,
        intra_op_threads=args.intra_op_threads,
        metrics_model_names=args.metrics_model_names,
    )


def _serve(args: argparse.Namespace) -> int:
    from blindinfer.server.config import ServerConfig
    from blindinfer.server.process import READY_PREFIX
    from blindinfer.server.serve import serve

    config = _config(args)
    assert isinstance(config, ServerConfig)
    if args.blindai_compat:
        from blindinfer.server.blindai import parse_ports

        config = dataclasses.replace(
            config, blindai_compat=True, blindai_ports=parse_ports(args.blindai_ports)
        )
    if config.simulate_debug_enclave and config.platform_choice != "simulation":
        raise SystemExit("--simulate-debug-enclave needs --simulation")
    host = f"[{config.host}]" if ":" in config.host else config.host
    serve(config, on_ready=lambda port: print(f"{READY_PREFIX}https://{host}:{port}", flush=True))
    return 0


def _measure(args: argparse.Namespace) -> int:
    from blindinfer.server.config import ServerConfig
    from blindinfer.server.platforms import simulated_mrenclave
    from blindinfer.tee.simulation.platform import SIMULATION_MRSIGNER

    config = _config(args)
    assert isinstance(config, ServerConfig)
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
    source = PccsCollateral(args.collateral_url) if args.collateral_url else None
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
    from blindinfer.attestation.policy_toml import suggested_policy
    from blindinfer.client.client import attest

    report = attest(args.source, policy=None, simulation=args.simulation)
    print(suggested_policy(report, args.source), end="")
    return 0


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
            with np.load(args.inputs) as archive:
                inputs = {name: archive[name] for name in archive.files}
            outputs = client.run_model(args.model, inputs)
            if args.output:
                np.savez(args.output, **outputs)  # type: ignore[arg-type]
            else:
                for name, array in outputs.items():
                    print(f"{name} {array.dtype} {list(array.shape)}\n{array}")
        elif args.command == "delete":
            info = client.delete_model(args.model)
            print(json.dumps({"deleted": info.model_id, "name": info.name}))
        else:
            for info in client.list_models():
                print(f"{info.model_id}  {info.sha256[:16]}  {info.size:>12}  {info.name}")
    return 0


def _demo(args: argparse.Namespace) -> int:
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("always", SimulationWarning)
    try:
        return _COMMANDS[args.command](args)
    except BlindInferError as exc:
        print(f"blindinfer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
