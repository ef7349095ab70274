"""An auth file with one owner key per tenant, for tests that run a server with tenants."""

from __future__ import annotations

from pathlib import Path

from blindinfer.server.auth import generate_api_key


def owner_keys(folder: Path, tenants: tuple[str, ...] = ("a", "b")) -> tuple[Path, dict[str, str]]:
    """`folder/auth.toml` giving each tenant one owner key; the file and the keys by tenant."""
    keys: dict[str, str] = {}
    text = ""
    for tenant in tenants:
        key, sha = generate_api_key()
        keys[tenant] = key
        text += (
            f'[[tenant]]\nname = "{tenant}"\n'
            f'[[tenant.key]]\nid = "{tenant}-key"\nrole = "owner"\nsha256 = "{sha}"\n'
        )
    auth = folder / "auth.toml"
    auth.write_text(text)
    return auth, keys
