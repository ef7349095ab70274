"""Tenants over the real attested channel: API keys, roles, private and shared models,
rate limits. Every role against every endpoint, with the exact status and code."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

import blindinfer
from blindinfer.client.transport import pinned_context
from blindinfer.server.auth import generate_api_key
from blindinfer.server.config import ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support import onnx_models

from .conftest import policy_for

pytestmark = pytest.mark.e2e

ROLES = {
    "admin": ("ops", "admin"),
    "owner_a": ("a", "owner"),
    "user_a": ("a", "user"),
    "owner_b": ("b", "owner"),
    "user_b": ("b", "user"),
    "user_c": ("c", "user"),
}


@pytest.fixture(scope="module")
def tenants(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, dict[str, str]]]:
    keys: dict[str, str] = {}
    blocks: dict[str, list[str]] = {"ops": [], "a": [], "b": [], "c": []}
    for label, (tenant, role) in ROLES.items():
        key, sha = generate_api_key()
        keys[label] = key
        blocks[tenant].append(
            f'[[tenant.key]]\nid = "{label}"\nrole = "{role}"\nsha256 = "{sha}"\n'
        )
    config = ""
    for tenant, entries in blocks.items():
        rate = "requests_per_second = 2\nburst = 3\n" if tenant == "c" else ""
        config += f'[[tenant]]\nname = "{tenant}"\nmax_models = 4\n{rate}' + "".join(entries)
    path = tmp_path_factory.mktemp("auth") / "auth.toml"
    path.write_text(config)
    with start_server(["--simulation", f"--auth-file={path}"]) as server:
        yield server, keys


def _client(server: ServerProcess, key: str | None) -> blindinfer.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(
            server.url,
            policy=policy_for(ServerConfig(simulation=True)),
            simulation=True,
            api_key=key,
        )


def _status(call: object) -> tuple[int, str]:
    try:
        call()  # type: ignore[operator]
    except blindinfer.ServerError as exc:
        return exc.status, exc.code
    return 200, "ok"


MODEL = onnx_models.model_bytes(onnx_models.mlp_model(seed=11))
FEED = {"x": np.ones((1, 64), np.float32)}


def test_authorization_matrix(tenants: tuple[ServerProcess, dict[str, str]]) -> None:
    server, keys = tenants
    clients = {label: _client(server, key) for label, key in keys.items()}
    anonymous = _client(server, None)
    owner_a = clients["owner_a"]
    private = owner_a.upload_model(MODEL, name="private-a")
    assert private.owner == "a"

    # no key, or a wrong key: 401 on every authenticated endpoint; attestation stays open
    assert _status(lambda: anonymous.list_models()) == (401, "unauthorized")
    assert _status(lambda: anonymous.run_model(private.model_id, FEED)) == (401, "unauthorized")
    assert _status(lambda: _client(server, generate_api_key()[0]).list_models()) == (
        401,
        "unauthorized",
    )

    expected = {  # label: (upload, run private-a, metadata, delete by other, list sees it)
        "admin": (200, 200, 200, True),
        "owner_a": (200, 200, 200, True),
        "user_a": (403, 200, 200, True),
        "owner_b": (200, 404, 404, False),
        "user_b": (403, 404, 404, False),
    }
    for label, (upload, run, metadata, sees) in expected.items():
        client = clients[label]
        got_upload = _status(lambda c=client, n=label: c.upload_model(MODEL, name=f"own-{n}"))
        assert got_upload[0] in ((upload, 201) if upload == 200 else (upload,)), (label, got_upload)
        assert _status(lambda c=client: c.run_model(private.model_id, FEED))[0] == run, label
        assert _status(lambda c=client: c.model_metadata(private.model_id))[0] == metadata, label
        assert (private.model_id in {m.model_id for m in client.list_models()}) is sees, label

    # deleting: only the owner tenant's owners, or an admin; others do not even see it
    assert _status(lambda: clients["owner_b"].delete_model(private.model_id)) == (
        404,
        "unknown_model",
    )
    assert _status(lambda: clients["user_a"].delete_model(private.model_id)) == (403, "forbidden")

    # sharing with tenant b: b may run it, still not delete it
    shared = owner_a.share_model(private.model_id, ["b"])
    assert shared.shared_with == ("b",)
    assert _status(lambda: clients["user_b"].run_model(private.model_id, FEED)) == (200, "ok")
    assert _status(lambda: clients["owner_b"].delete_model(private.model_id)) == (403, "forbidden")
    assert _status(lambda: clients["owner_b"].share_model(private.model_id, ["*"])) == (
        403,
        "forbidden",
    )

    # names are per tenant: b may have its own "private-a"
    theirs = clients["owner_b"].upload_model(
        onnx_models.model_bytes(onnx_models.mlp_model(seed=12)), name="private-a"
    )
    assert theirs.model_id != private.model_id
    assert clients["user_b"].model_metadata("private-a").name == "private-a"

    assert _status(lambda: clients["admin"].delete_model(private.model_id)) == (200, "ok")

    # the operator view is for admin keys only
    context = pinned_context(owner_a.attestation.certificate_der)
    for label, status in [("admin", 200), ("owner_a", 403), ("user_b", 403)]:
        headers = {"authorization": f"Bearer {keys[label]}"}
        with httpx.Client(base_url=server.url, verify=context, headers=headers) as raw:
            assert raw.get("/v2/admin/stats").status_code == status, label


def test_model_quota(tenants: tuple[ServerProcess, dict[str, str]]) -> None:
    server, keys = tenants
    client = _client(server, keys["owner_a"])
    existing = len([m for m in client.list_models() if m.owner == "a"])
    codes = [
        _status(
            lambda s=seed: client.upload_model(
                onnx_models.model_bytes(onnx_models.mlp_model(seed=100 + s))
            )
        )
        for seed in range(5 - existing)
    ]
    assert codes[-1] == (403, "quota_exceeded")
    assert all(code == (200, "ok") for code in codes[:-1])


def test_rate_limit_answers_429_with_retry_after(
    tenants: tuple[ServerProcess, dict[str, str]],
) -> None:
    server, keys = tenants
    client = _client(server, keys["user_c"])
    context = pinned_context(client.attestation.certificate_der)
    headers = {"authorization": f"Bearer {keys['user_c']}"}
    with httpx.Client(base_url=server.url, verify=context, headers=headers) as raw:
        replies = [raw.post("/v2/repository/index") for _ in range(12)]
    limited = [r for r in replies if r.status_code == 429]
    assert limited, [r.status_code for r in replies]
    assert limited[0].json()["code"] == "rate_limited"
    assert int(limited[0].headers["retry-after"]) >= 1


def test_api_key_is_never_sent_before_attestation(tmp_path: Path) -> None:
    """The key travels only on the pinned channel: a refused attestation sends nothing."""
    from support.mitm import Mitm, start_mitm

    with start_server(["--simulation"]) as server:
        middle = Mitm(upstream=server.url)
        running = start_mitm(middle)
        try:
            with pytest.raises(blindinfer.KeyBindingError):
                _client_via(middle.url, "bik_" + "A" * 43)
            assert middle.seen == ["/v2/attestation"]
        finally:
            running.should_exit = True


def _client_via(url: str, key: str) -> blindinfer.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(
            url, policy=policy_for(ServerConfig(simulation=True)), simulation=True, api_key=key
        )
