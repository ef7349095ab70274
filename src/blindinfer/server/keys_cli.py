"""Making a new API key for an operator: the secret for the user, the hash for the config.

The secret is printed once and never stored by the server: only the TOML snippet, which
holds its SHA-256, goes into the configuration. The `blindinfer` command wires this up.
"""

from __future__ import annotations

from blindinfer.server.auth import (
    check_key_id,
    check_tenant_name,
    generate_api_key,
    parse_role,
)


def new_key_toml(tenant: str, role: str, key_id: str) -> tuple[str, str]:
    """Returns (secret key to hand to the user, TOML snippet to paste in the config).

    The snippet is a `[[tenant.key]]` table, which TOML attaches to the `[[tenant]]` table
    above it: so it must go right after the tenant's table (its comment says so), and it
    deliberately does not repeat `[[tenant]]`, which would declare the tenant twice.
    Arguments are checked with the configuration's own rules (AuthConfigError), so a
    snippet that is printed always loads.
    """
    check_tenant_name("tenant", tenant)
    parsed_role = parse_role("role", role)
    check_key_id("key id", key_id)
    key, sha256 = generate_api_key()
    snippet = (
        f"# API key {key_id!r}, role {parsed_role.value!r}: paste right after the [[tenant]]\n"
        f'# table with name = "{tenant}" (create that table first if the tenant is new).\n'
        "[[tenant.key]]\n"
        f'id = "{key_id}"\n'
        f'role = "{parsed_role.value}"\n'
        f'sha256 = "{sha256}"\n'
    )
    return key, snippet
