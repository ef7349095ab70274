"""BlindAI Core 0.6.3 compatibility: its three ports, CBOR schemas and `Server` header,
over blindinfer's own state (registry, evidence, quotas, audit). See
docs/blindai-compat.md."""

from blindinfer.server.blindai.apps import blindai_apps, blindai_collateral, server_header
from blindinfer.server.blindai.listeners import (
    BLINDAI_HOSTNAME,
    DEFAULT_PORTS,
    BlindAiListeners,
    make_blindai_identity,
    parse_ports,
    serve_blindai,
)

__all__ = [
    "BLINDAI_HOSTNAME",
    "DEFAULT_PORTS",
    "BlindAiListeners",
    "blindai_apps",
    "blindai_collateral",
    "make_blindai_identity",
    "parse_ports",
    "serve_blindai",
    "server_header",
]
