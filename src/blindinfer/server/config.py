"""Server settings. Those that change what the server accepts are security-relevant and
go into the simulated measurement (see `security_relevant`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from blindinfer.runtime.device import Device
from blindinfer.server.audit import check_replica_id
from blindinfer.store.errors import StoreKeyConfigError
from blindinfer.store.key_release import DEFAULT_CDH_URL, KbsResource, check_cdh_url
from blindinfer.tee.coco_agent import DEFAULT_AA_URL, check_aa_url

DEFAULT_PORT = 9924
MiB = 1 << 20


GiB = 1 << 30


MAX_SPIN_US = 1_000_000
"""The longest `--intra-op-spin-us` (a second: far beyond any use)."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_model_bytes: int = 512 * MiB
    max_request_bytes: int = 64 * MiB
    max_response_bytes: int = 64 * MiB  # outputs of one inference, sized in the worker
    max_models: int = 32
    memory_budget_bytes: int = 4 * GiB  # measured session memory of loaded models
    max_stored_bytes: int = 16 * GiB  # sealed model storage
    worker_memory_bytes: int = 8 * GiB  # address-space limit of each inference worker
    workers: int = 2
    queue_limit: int = 64  # requests waiting for a worker before 503
    inference_timeout_ms: int = 60_000
    load_timeout_ms: int = 120_000  # building one session; the worker is replaced past it
    max_new_tokens: int = 512  # generative models: the most tokens one answer may ask for
    max_batch: int = 8  # generative models: generations one worker runs at once, sharing steps
    # per tenant unless its tenant entry sets its own (server/generation_quota.py):
    max_tokens_per_minute: int = 200_000  # prompt + completion tokens, refilled continuously
    max_concurrent_generations: int = 16
    # KV cache reserved by generations in flight, server-wide, shared equally by the
    # tenants; None = --memory-budget-bytes
    kv_cache_budget_bytes: int | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is None and name == "kv_cache_budget_bytes":
                continue
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"limit {name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """How long and how much a connection may take before the server gives up on it
    (server/connection_guard.py, server/body_guard.py). Not pinned by the measurement:
    they bound availability, not what the server accepts as a model or a request."""

    header_timeout_s: float = 10.0  # TLS handshake and request head, from accept or first byte
    keep_alive_s: float = 30.0  # idle between requests
    max_header_bytes: int = 64 * 1024  # request line and headers of one request
    max_headers: int = 100
    body_timeout_s: float = 30.0  # longest pause in a body; its grace before `min_body_rate`
    min_body_rate: int = 64 * 1024  # bytes per second, on average, once the grace is over
    max_connections: int = 1000  # open connections per listener group; oldest idle go first
    max_concurrent_bodies: int = 64  # request bodies being received at once, server-wide
    max_body_buffer_bytes: int = 2 * GiB  # bytes of bodies being received, server-wide

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (value > 0 and math.isfinite(value))
            ):
                raise ValueError(f"limit {name} must be a positive number, got {value!r}")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    simulation: bool = False
    limits: Limits = field(default_factory=Limits)
    isvprodid: int = 1
    isvsvn: int = 1
    simulate_debug_enclave: bool = False
    platform: str = "auto"  # auto | simulation | gramine-sgx | tdx | snp | coco-tdx | coco-snp
    pccs_url: str | None = None
    kds_url: str | None = None
    insecure_http_collateral: bool = False  # accept http:// for pccs_url and kds_url
    snp_product: str | None = None  # Milan | Genoa | Turin (for SNP reports older than v3)
    snp_vmpl: int | None = None
    store_dir: str | None = None  # persistence (sealed); None = a private temporary store
    # the store's key from this KBS resource through the Confidential Data Hub at cdh_url
    # (replicas sharing --store-dir; store/key_release.py); None = the platform's key
    store_key_resource: KbsResource | None = None
    cdh_url: str = DEFAULT_CDH_URL
    # coco-tdx / coco-snp: the Attestation Agent's REST API (tee/coco_agent.py), loopback only
    aa_url: str = DEFAULT_AA_URL
    # this replica's name where replicas share --store-dir: its audit log is
    # audit-<id>.log (server/audit.py); None = alone on the store, audit.log
    replica_id: str | None = None
    auth_file: str | None = None  # tenants and API key hashes; None = open mode
    intra_op_threads: int = 0  # per worker; 0 = onnxruntime decides (all cores)
    intra_op_spin_us: int = 50  # onnxruntime threads' busy-wait per pause (0: never)
    # queued tensor runs of one model and one tenant joined into one run (1: off;
    # runtime/tensor_batch.py)
    max_tensor_batch: int = 1
    metrics_model_names: bool = False  # label per-model inference counts in /metrics by name
    blindai_compat: bool = False  # also listen the way BlindAI Core 0.6.3 did
    blindai_ports: tuple[int, int, int] = (9923, 9924, 9925)
    # the OIP v2 gRPC service's port (server/grpc/, docs/grpc.md); 0 = no gRPC listener
    grpc_port: int = 0
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    # where models run: cpu | cuda (onnxruntime-gpu; runtime/device.py, docs/cli.md)
    device: Device = "cpu"

    def __post_init__(self) -> None:
        check_cdh_url(self.cdh_url)  # loopback only, whether or not a resource is given
        check_aa_url(self.aa_url)  # likewise, whatever the platform
        if self.replica_id is not None:
            check_replica_id(self.replica_id)  # it names a file in the store directory
        if self.store_key_resource is not None and self.store_dir is None:
            raise StoreKeyConfigError(
                "--store-key-resource needs --store-dir: the key opens a store that replicas "
                "share\ngive every replica the same --store-dir (shared storage)"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.grpc_port and self.grpc_port in (self.port, *self._blindai_ports_in_use()):
            raise ValueError(
                f"--grpc-port {self.grpc_port} is also the port of another API; give gRPC "
                "a port of its own"
            )
        if self.blindai_compat and self.port != 0 and self.port in self.blindai_ports:
            # Two sockets on one port would not fail: the kernel would hand every
            # connection to one of them, and the other API would be silently unreachable.
            ports = ",".join(str(n) for n in self.blindai_ports)
            raise ValueError(
                f"--port {self.port} is also one of the BlindAI ports ({ports}); "
                "give blindinfer's own API another port, e.g. --port 9926"
            )

    def _blindai_ports_in_use(self) -> tuple[int, ...]:
        return self.blindai_ports if self.blindai_compat else ()

    @property
    def platform_choice(self) -> str:
        return "simulation" if self.simulation else self.platform

    def security_relevant(self) -> dict[str, object]:
        """What a client's policy implicitly pins through the measurement."""
        return {
            "limits": asdict(self.limits),
            "isvprodid": self.isvprodid,
            "isvsvn": self.isvsvn,
            "debug": self.simulate_debug_enclave,
            # whether model names can leave through /metrics is pinned with the code
            "metrics_model_names": self.metrics_model_names,
            # a GPU sees every tensor: pinned too (absent on the CPU, whose measurement
            # stays what it was)
            **({"device": self.device} if self.device != "cpu" else {}),
        }
