"""One tenant attacking the others' privacy and share of the server (issue 21, items 7
and 8), against real server processes with several tenants in an auth file.

- A 404 for another tenant's model (by model_id, name or SHA-256) is byte-identical, body
  and headers, to the 404 for a model that does not exist.
- A SHA-256 reference resolves among the models the caller can see: a visible shared copy
  is found although another tenant's hidden copy with the same hash is older.
- A tenant a model is shared with sees neither its owner nor the rest of its share list.
- Uploading bytes another tenant stored is validated like any upload (its refusals apply,
  and the uploader gets its own record).
- Twelve parallel uploads against a quota of 3 store exactly 3; against a store of 3
  models, likewise.
- A tenant's loaded sessions count against its memory quota: its loads evict its own
  models, never another tenant's, and a model bigger than its quota is refused.
"""

from __future__ import annotations

import secrets
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import blindinfer
from blindinfer.client.transport import pinned_context
from blindinfer.server.auth import generate_api_key
from blindinfer.server.config import Limits, ServerConfig
from blindinfer.server.process import ServerProcess, start_server
from support import onnx_models

from .conftest import policy_for

pytestmark = pytest.mark.e2e

MIB = 1 << 20
FAST = "requests_per_second = 1000\nburst = 1000\n"
JSON = {"content-type": "application/json"}
OCTETS = {"content-type": "application/octet-stream"}
MLP_FEED = {"x": np.ones((1, 64), np.float32)}


def _mlp(seed: int) -> bytes:
    return onnx_models.model_bytes(onnx_models.mlp_model(seed=seed))


def _big(value: float, mib: int) -> bytes:
    """y = C[idx] + x, C a float32 initializer of `mib` MiB: the session really holds it
    (Gather on an input keeps onnxruntime from folding it), so it costs about `mib` MiB."""
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["C", "idx"], ["picked"]),
            helper.make_node("Add", ["picked", "x"], ["y"]),
        ],
        f"big_{value}",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["k"]),
            helper.make_tensor_value_info("idx", TensorProto.INT64, ["k"]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["k"])],
        [numpy_helper.from_array(np.full(mib * MIB // 4, value, np.float32), "C")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", onnx_models.OPSET)])
    model.ir_version = onnx_models.IR_VERSION
    return onnx_models.model_bytes(model)


BIG_FEED = {"x": np.array([0.5], np.float32), "idx": np.array([3], np.int64)}


def _auth(path: Path, tenants: dict[str, tuple[str, str]]) -> dict[str, str]:
    """Writes an auth file: tenant -> (role of its one key, extra settings); returns the
    keys by tenant."""
    keys: dict[str, str] = {}
    text = ""
    for tenant, (role, extra) in tenants.items():
        key, sha = generate_api_key()
        keys[tenant] = key
        text += (
            f'[[tenant]]\nname = "{tenant}"\n{extra}'
            f'[[tenant.key]]\nid = "{tenant}-key"\nrole = "{role}"\nsha256 = "{sha}"\n'
        )
    path.write_text(text)
    return keys


def _client(
    server: ServerProcess, key: str | None, limits: Limits | None = None
) -> blindinfer.Client:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", blindinfer.SimulationWarning)
        return blindinfer.connect(
            server.url,
            policy=policy_for(ServerConfig(simulation=True, limits=limits or Limits())),
            simulation=True,
            api_key=key,
        )


class Env:
    """A running server, its tenants' keys, and raw HTTP clients on the attested channel."""

    def __init__(
        self, server: ServerProcess, keys: dict[str, str], limits: Limits | None = None
    ) -> None:
        self.server = server
        self.keys = keys
        self.limits = limits
        any_key = next(iter(keys.values()), None)
        self.certificate = self.client(any_key).attestation.certificate_der

    def client(self, key: str | None) -> blindinfer.Client:
        """The SDK client, attesting the server started with these limits."""
        return _client(self.server, key, self.limits)

    def raw(self, tenant: str | None) -> httpx.Client:
        headers = {} if tenant is None else {"authorization": f"Bearer {self.keys[tenant]}"}
        return httpx.Client(
            base_url=self.server.url,
            verify=pinned_context(self.certificate),
            headers=headers,
            timeout=60,
        )

    def upload(self, tenant: str | None, data: bytes, name: str = "_") -> httpx.Response:
        with self.raw(tenant) as http:
            return http.put(f"/v2/repository/models/{name}/upload", content=data, headers=OCTETS)

    def admin_stats(self) -> dict[str, object]:
        with self.raw("ops") as http:
            reply = http.get("/v2/admin/stats")
        assert reply.status_code == 200, reply.text
        stats: dict[str, object] = reply.json()
        return stats


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    path = tmp_path_factory.mktemp("auth") / "auth.toml"
    keys = _auth(
        path,
        {
            "ops": ("admin", ""),
            "a": ("owner", FAST),
            "b": ("owner", FAST),
            "c": ("owner", FAST),
            # all twelve uploads may run at once: only the model quota may refuse them
            "q": ("owner", FAST + "max_models = 3\nmax_concurrent_inferences = 16\n"),
        },
    )
    with start_server(["--simulation", f"--auth-file={path}"]) as server:
        yield Env(server, keys)


def _comparable(reply: httpx.Response) -> dict[str, str]:
    """Every header but Date (the clock may tick between the two requests)."""
    return {k: v for k, v in reply.headers.items() if k.lower() != "date"}


def _probes(ref: str) -> list[tuple[str, str, dict[str, object]]]:
    infer = {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}]}
    return [
        ("GET", f"/v2/models/{ref}", {}),
        ("GET", f"/v2/models/{ref}/ready", {}),
        ("GET", f"/v2/models/{ref}/versions/1", {}),
        ("POST", f"/v2/models/{ref}/infer", {"json": infer, "headers": JSON}),
        ("POST", f"/v2/repository/models/{ref}/load", {"json": {}, "headers": JSON}),
        ("POST", f"/v2/repository/models/{ref}/share", {"json": {"tenants": ["b"]}}),
        ("DELETE", f"/v2/repository/models/{ref}", {}),
        ("POST", f"/v2/repository/models/{ref}/unload", {"headers": JSON}),
    ]


def test_another_tenants_model_answers_exactly_like_a_missing_one(env: Env) -> None:
    owner_a = _client(env.server, env.keys["a"])
    private = owner_a.upload_model(_mlp(31), name="secret-a1")
    pairs = [
        (private.model_id, "m-" + secrets.token_hex(16)),
        (private.sha256, secrets.token_hex(32)),
        ("secret-a1", "secret-zz"),  # names are per tenant: b's view of a's name
    ]
    with env.raw("b") as attacker:
        for hidden, missing in pairs:
            assert len(hidden) == len(missing)
            for (method, path, kwargs), (_, other, _) in zip(
                _probes(hidden), _probes(missing), strict=True
            ):
                got = attacker.request(method, path, **kwargs)  # type: ignore[arg-type]
                want = attacker.request(method, other, **kwargs)  # type: ignore[arg-type]
                where = (method, path)
                assert got.status_code == want.status_code == 404, (where, got.text)
                assert got.json()["code"] == "unknown_model", where
                assert "no model is visible to this API key" in got.json()["error"], where
                assert got.content.replace(hidden.encode(), missing.encode()) == want.content
                assert _comparable(got) == _comparable(want), where
    # nothing happened to the model: still a's, still private, still runs
    mine = {m.model_id: m for m in owner_a.list_models()}
    assert mine[private.model_id].shared_with == ()
    assert owner_a.run_model(private.model_id, MLP_FEED)


def test_hash_reference_resolves_to_the_copy_the_caller_can_see(env: Env) -> None:
    data = _mlp(41)
    hidden = _client(env.server, env.keys["a"]).upload_model(data, name="hash-a")
    visible = _client(env.server, env.keys["b"]).upload_model(data, name="hash-b")
    assert visible.model_id != hidden.model_id  # the older copy is a's, hidden from c
    _client(env.server, env.keys["b"]).share_model(visible.model_id, ["c"])

    with env.raw("c") as c:
        reply = c.get(f"/v2/models/{hidden.sha256}")
        assert reply.status_code == 200, reply.text
        assert reply.json()["parameters"]["model_id"] == visible.model_id
    outputs = _client(env.server, env.keys["c"]).run_model(hidden.sha256, MLP_FEED)
    assert outputs
    # each owner still finds its own copy first
    with env.raw("a") as a:
        assert a.get(f"/v2/models/{hidden.sha256}").json()["parameters"]["model_id"] == (
            hidden.model_id
        )


def test_shared_tenants_see_neither_the_owner_nor_the_share_list(env: Env) -> None:
    owner_b = _client(env.server, env.keys["b"])
    model = owner_b.upload_model(_mlp(51), name="shared-x")
    owner_b.share_model(model.model_id, ["a", "c"])

    def entry(tenant: str) -> dict[str, object]:
        with env.raw(tenant) as http:
            listed = http.post("/v2/repository/index", headers=JSON).json()
        found: dict[str, object] = next(m for m in listed if m["model_id"] == model.model_id)
        return found

    seen_by_c = entry("c")
    assert "owner" not in seen_by_c
    assert seen_by_c["shared_with"] == ["c"]
    assert "b" not in seen_by_c.values()
    assert entry("a")["shared_with"] == ["a"]
    assert entry("b")["owner"] == "b"
    assert entry("b")["shared_with"] == ["a", "c"]
    assert entry("ops")["owner"] == "b"  # the operator sees everything

    with env.raw("c") as c:
        metadata = c.get(f"/v2/models/{model.model_id}").json()
        assert "owner" not in metadata["parameters"]
        loaded = c.post(f"/v2/repository/models/{model.model_id}/load", json={}).json()
        assert "owner" not in loaded and loaded["shared_with"] == ["c"]
    info = next(
        m for m in _client(env.server, env.keys["c"]).list_models() if m.model_id == model.model_id
    )
    assert (info.owner, info.shared_with) == ("", ("c",))

    owner_b.share_model(model.model_id, ["*"])
    assert entry("c")["shared_with"] == ["*"]
    assert "owner" not in entry("c")


def _parallel(action: object, count: int) -> list[httpx.Response]:
    barrier = threading.Barrier(count)
    replies: list[httpx.Response | BaseException] = [RuntimeError("not run")] * count

    def one(index: int) -> None:
        barrier.wait()
        try:
            replies[index] = action(index)  # type: ignore[operator]
        except BaseException as exc:  # reported below, with the others
            replies[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    errors = [r for r in replies if not isinstance(r, httpx.Response)]
    assert not errors, errors
    return [r for r in replies if isinstance(r, httpx.Response)]


def test_parallel_uploads_cannot_overshoot_the_tenant_quota(env: Env) -> None:
    models = [_mlp(300 + i) for i in range(12)]
    replies = _parallel(lambda i: env.upload("q", models[i], f"q-{i}"), 12)
    codes = sorted((r.status_code, r.json().get("code", "")) for r in replies)
    assert codes.count((201, "")) == 3, codes
    assert codes.count((403, "quota_exceeded")) == 9, str(codes)
    with env.raw("q") as q:
        mine = [m for m in q.post("/v2/repository/index").json() if m.get("owner") == "q"]
    assert len(mine) == 3


def test_parallel_uploads_cannot_overshoot_the_store() -> None:
    with start_server(["--simulation", "--max-models=3"]) as server:
        env = Env(server, {}, Limits(max_models=3))
        models = [_mlp(400 + i) for i in range(12)]
        replies = _parallel(lambda i: env.upload(None, models[i], f"s-{i}"), 12)
        codes = sorted((r.status_code, r.json().get("code", "")) for r in replies)
        assert codes.count((201, "")) == 3, codes
        assert codes.count((507, "store_full")) == 9, codes
        with env.raw(None) as http:
            assert len(http.post("/v2/repository/index").json()) == 3


# -- memory: one tenant cannot push the others' models out -------------------------------------

BIG = 16  # MiB per model; measured ~16.2 MiB
QUOTA = 24 * MIB  # one big model per tenant fits its quota, two do not
BUDGET = 50 * MIB  # the quotas (2 x 24 MiB) fit; m's three models and b's would not


@pytest.fixture(scope="module")
def memory_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    path = tmp_path_factory.mktemp("auth") / "auth.toml"
    keys = _auth(
        path,
        {
            "ops": ("admin", "max_loaded_bytes = 0\n"),
            "m": ("owner", f"{FAST}max_loaded_bytes = {QUOTA}\n"),
            "b": ("owner", f"{FAST}max_loaded_bytes = {QUOTA}\n"),
            "tiny": ("owner", f"{FAST}max_loaded_bytes = 1\n"),
        },
    )
    args = ["--simulation", f"--auth-file={path}", f"--memory-budget-bytes={BUDGET}"]
    with start_server(args) as server:
        yield Env(server, keys, Limits(memory_budget_bytes=BUDGET))


def _charged(env: Env) -> dict[str, int]:
    by_tenant = env.admin_stats()["memory_used_bytes_by_tenant"]
    assert isinstance(by_tenant, dict)
    return {str(k): int(v) for k, v in by_tenant.items()}


def test_a_tenant_evicts_only_its_own_models(memory_env: Env) -> None:
    env = memory_env
    victim = env.upload("b", _big(1.0, BIG), "victim")
    assert victim.status_code == 201, victim.text
    before = _charged(env)
    assert BIG * MIB <= before["b"] <= QUOTA

    for value in (2.0, 3.0, 4.0):  # without per-tenant memory, the third evicts b's model
        reply = env.upload("m", _big(value, BIG), f"m-{value}")
        assert reply.status_code == 201, reply.text
        charged = _charged(env)
        assert charged["b"] == before["b"], charged  # b's session stayed loaded
        assert charged["m"] <= QUOTA, charged
    stats = env.admin_stats()
    assert stats["memory_used_bytes"] <= BUDGET  # type: ignore[operator]
    # m's older models were evicted, not lost: they reload (evicting m's own) and run
    m_client = env.client(env.keys["m"])
    assert m_client.run_model("m-2.0", BIG_FEED)["y"][0] == pytest.approx(2.5)
    assert _charged(env)["b"] == before["b"]
    b_client = env.client(env.keys["b"])
    assert b_client.run_model("victim", BIG_FEED)["y"][0] == pytest.approx(1.5)

    # one model bigger than the tenant's whole quota: refused as a quota, nothing stored
    too_big = env.upload("m", _big(5.0, 48), "too-big")
    assert too_big.status_code == 403, too_big.text
    assert too_big.json()["code"] == "quota_exceeded"
    assert "too-big" not in {m.name for m in m_client.list_models()}
    assert _charged(env)["b"] == before["b"]


def test_bytes_another_tenant_stored_are_validated_like_new_ones(memory_env: Env) -> None:
    """No shortcut for known bytes: the upload is checked (in a worker, measured) exactly
    as a first upload, so its answer and its cost tell nothing about other tenants."""
    env = memory_env
    theirs = _big(7.0, BIG)
    stored = env.upload("b", theirs, "b-original")
    assert stored.status_code == 201, stored.text
    before = _charged(env)

    # "tiny" may hold 1 byte of sessions: its upload of b's (loaded) bytes is measured
    # and refused, exactly like its upload of bytes nobody has
    known = env.upload("tiny", theirs, "copy")
    fresh = env.upload("tiny", _big(8.0, BIG), "copy")
    assert known.status_code == fresh.status_code == 403, (known.text, fresh.text)
    assert known.json()["code"] == fresh.json()["code"] == "quota_exceeded"
    with env.raw("tiny") as tiny:
        assert tiny.post("/v2/repository/index").json() == []
    assert _charged(env)["b"] == before["b"]  # b's live session was not touched

    # a tenant within its quota gets its own record of the same bytes
    copy = env.upload("m", theirs, "m-copy")
    assert copy.status_code == 201, copy.text
    assert copy.json()["owner"] == "m"
    assert copy.json()["model_id"] != stored.json()["model_id"]
    assert env.client(env.keys["m"]).run_model("m-copy", BIG_FEED)["y"][0] == (pytest.approx(7.5))
