"""Tenants, API keys and roles: the full authorization matrix, header parsing, the
configuration parsers (TOML, file, environment), key generation, and fuzzing of the two
parsers that see attacker- or operator-controlled text."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blindinfer.errors import BlindInferError
from blindinfer.server.auth import (
    ENV_VARIABLE,
    OPEN_PRINCIPAL,
    AccessError,
    Action,
    ApiKey,
    AuthConfig,
    AuthConfigError,
    Authenticator,
    ForbiddenError,
    Principal,
    Role,
    TenantConfig,
    UnauthorizedError,
    authorize,
    generate_api_key,
    is_allowed,
    key_sha256,
    parse_bearer,
    sharing_view,
    visible_to,
)
from blindinfer.server.keys_cli import new_key_toml

ADMIN_KEY, ADMIN_SHA = generate_api_key()
OWNER_KEY, OWNER_SHA = generate_api_key()
USER_KEY, USER_SHA = generate_api_key()
OTHER_KEY, OTHER_SHA = generate_api_key()

CONFIG_TOML = f"""
[[tenant]]
name = "hospital-a"
max_models = 10
max_stored_bytes = 2_000_000_000
requests_per_second = 20
burst = 40
max_concurrent_inferences = 4

  [[tenant.key]]
  id = "alice-laptop"
  role = "owner"
  sha256 = "{OWNER_SHA}"

  [[tenant.key]]
  id = "bob"
  role = "user"
  sha256 = "{USER_SHA.upper()}"

[[tenant]]
name = "hospital-b"

  [[tenant.key]]
  id = "carol"
  role = "owner"
  sha256 = "{OTHER_SHA}"

[[tenant]]
name = "ops"

  [[tenant.key]]
  id = "root"
  role = "admin"
  sha256 = "{ADMIN_SHA}"
"""


@pytest.fixture(scope="module")
def config() -> AuthConfig:
    return AuthConfig.from_toml(CONFIG_TOML)


@pytest.fixture(scope="module")
def authenticator(config: AuthConfig) -> Authenticator:
    return Authenticator(config)


# --------------------------------------------------------------------------- matrix

A, B, C = "tenant-a", "tenant-b", "tenant-c"
PRINCIPALS = {role: Principal(A, role, f"{role.value}-key") for role in Role}

# target -> (model_owner, shared_with), always seen from tenant A
TARGETS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "none": (None, ()),  # no existing model: a new upload, the index as a whole
    "own": (A, ()),
    "other": (B, (C,)),  # another tenant's, shared with someone else
    "shared": (B, (C, A)),  # another tenant's, shared with tenant A by name
    "public": (B, ("*",)),  # another tenant's, shared with every tenant
}
COLUMNS = ("none", "own", "other", "shared", "public")

# Y = allowed, n = ForbiddenError, - = ValueError (the action needs a model_owner).
MATRIX: dict[Role, dict[Action, str]] = {
    Role.ADMIN: {
        Action.UPLOAD: "YYYYY",
        Action.DELETE: "-YYYY",
        Action.SHARE: "-YYYY",
        Action.RUN: "-YYYY",
        Action.READ_METADATA: "-YYYY",
        Action.LIST: "YYYYY",
        Action.ADMIN: "YYYYY",
    },
    Role.OWNER: {
        Action.UPLOAD: "YYnnn",
        Action.DELETE: "-Ynnn",
        Action.SHARE: "-Ynnn",
        Action.RUN: "-YnYY",
        Action.READ_METADATA: "-YnYY",
        Action.LIST: "YYnYY",
        Action.ADMIN: "nnnnn",
    },
    Role.USER: {
        Action.UPLOAD: "nnnnn",
        Action.DELETE: "-nnnn",
        Action.SHARE: "-nnnn",
        Action.RUN: "-YnYY",
        Action.READ_METADATA: "-YnYY",
        Action.LIST: "YYnYY",
        Action.ADMIN: "nnnnn",
    },
}

CASES = [
    pytest.param(role, action, column, row[i], id=f"{role.value}-{action.value}-{column}")
    for role, rows in MATRIX.items()
    for action, row in rows.items()
    for i, column in enumerate(COLUMNS)
]


def test_matrix_covers_every_role_and_action() -> None:
    assert set(MATRIX) == set(Role)
    for rows in MATRIX.values():
        assert set(rows) == set(Action)
        assert all(len(row) == len(COLUMNS) for row in rows.values())


@pytest.mark.parametrize(("role", "action", "column", "expected"), CASES)
def test_authorization_matrix(role: Role, action: Action, column: str, expected: str) -> None:
    owner, shared = TARGETS[column]
    principal = PRINCIPALS[role]
    if expected == "-":
        with pytest.raises(ValueError, match="model_owner"):
            authorize(principal, action, model_owner=owner, shared_with=shared)
        return
    allowed = is_allowed(principal, action, model_owner=owner, shared_with=shared)
    assert allowed is (expected == "Y")
    if expected == "n":
        with pytest.raises(ForbiddenError) as info:
            authorize(principal, action, model_owner=owner, shared_with=shared)
        assert info.value.http_status == 403
        assert info.value.code == "forbidden"
        # The owner of a model the principal cannot see is never named.
        if column == "other":
            assert B not in str(info.value)
            assert info.value.visible is False
        else:
            assert info.value.visible is True
    else:
        authorize(principal, action, model_owner=owner, shared_with=shared)


def test_open_principal_is_local_admin() -> None:
    assert OPEN_PRINCIPAL.tenant == "local"
    assert OPEN_PRINCIPAL.role is Role.ADMIN
    authorize(OPEN_PRINCIPAL, Action.DELETE, model_owner="anyone")


def test_forbidden_messages_are_clear() -> None:
    user = PRINCIPALS[Role.USER]
    with pytest.raises(ForbiddenError, match="'user' role may not delete models"):
        authorize(user, Action.DELETE, model_owner=A)
    owner = PRINCIPALS[Role.OWNER]
    with pytest.raises(ForbiddenError, match="shared with 'tenant-a' for running only"):
        authorize(owner, Action.DELETE, model_owner=B, shared_with=("*",))
    with pytest.raises(ForbiddenError, match="not shared with 'tenant-a'"):
        authorize(owner, Action.RUN, model_owner=B)


def test_shared_with_a_prefix_of_the_tenant_name_is_not_shared() -> None:
    owner = Principal("tenant-a", Role.OWNER, "k")
    # a string, not a collection of names: "tenant-ab" contains "tenant-a" as a substring
    assert not is_allowed(owner, Action.RUN, model_owner=B, shared_with=("tenant-ab",))
    assert not visible_to(owner, B, ["tenant"])


# --------------------------------------------------------------------------- headers


def test_valid_keys_authenticate_as_their_principals(authenticator: Authenticator) -> None:
    assert authenticator.open_mode is False
    assert authenticator.authenticate(f"Bearer {OWNER_KEY}") == Principal(
        "hospital-a", Role.OWNER, "alice-laptop"
    )
    # configured in upper-case hex, still matches
    assert authenticator.authenticate(f"Bearer {USER_KEY}").role is Role.USER
    assert authenticator.authenticate(f"bearer   {ADMIN_KEY}  ") == Principal(
        "ops", Role.ADMIN, "root"
    )
    assert authenticator.authenticate(f"BEARER {OTHER_KEY}").tenant == "hospital-b"


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "requires an API key"),
        ("", "requires an API key"),
        ("   ", "requires an API key"),
        (f"Basic {base64.b64encode(b'alice:secret').decode()}", "must be Bearer, got 'Basic'"),
        ("Bearer", "Bearer scheme but no key"),
        ("Bearer    ", "Bearer scheme but no key"),
        ("Bearer bik_short", "malformed"),
        (f"Bearer {OWNER_KEY[4:]}", "malformed"),  # no prefix
        (f"Bearer {OWNER_KEY}x", "malformed"),
        (f"Bearer {OWNER_KEY} {OWNER_KEY}", "malformed"),
        (f"Token {OWNER_KEY}", "must be Bearer"),
        (f"Bearer\t{OWNER_KEY}", "must be Bearer, got another scheme"),
        (f"Bearer{OWNER_KEY}", "must be Bearer, got another scheme"),
        (f"Bearer {'x' * 300}", "too long"),
    ],
)
def test_bad_headers_are_401(
    authenticator: Authenticator, header: str | None, message: str
) -> None:
    with pytest.raises(UnauthorizedError, match=message) as info:
        authenticator.authenticate(header)
    assert info.value.http_status == 401
    assert info.value.code == "unauthorized"
    assert info.value.headers == {"WWW-Authenticate": 'Bearer realm="blindinfer"'}


def test_unknown_key_is_401_and_not_quoted(authenticator: Authenticator) -> None:
    stranger, _ = generate_api_key()
    with pytest.raises(UnauthorizedError, match="not known") as info:
        authenticator.authenticate(f"Bearer {stranger}")
    assert stranger not in str(info.value)
    assert stranger[4:] not in str(info.value)


def test_non_canonical_key_spelling_is_refused(authenticator: Authenticator) -> None:
    # The last base64url character of a 32-byte key carries 2 spare bits that must be 0.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = OWNER_KEY[-1]
    variant = OWNER_KEY[:-1] + alphabet[alphabet.index(last) ^ 1]
    with pytest.raises(UnauthorizedError, match="malformed"):
        authenticator.authenticate(f"Bearer {variant}")


def test_open_mode_ignores_the_header() -> None:
    open_auth = Authenticator(None)
    assert open_auth.open_mode is True
    assert open_auth.config is None
    for header in (None, "Basic x", f"Bearer {OWNER_KEY}", "garbage"):
        assert open_auth.authenticate(header) is OPEN_PRINCIPAL


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.text(max_size=400),
        st.text(alphabet="Bearbik_ ABCxyz019-=+/\t", max_size=80),
        st.builds(
            lambda scheme, sep, body: f"{scheme}{sep}bik_{body}",
            st.sampled_from(["Bearer", "bearer", "Basic", "", "Bearer:"]),
            st.sampled_from([" ", "  ", "\t", ""]),
            st.text(alphabet="ABCDEFabcdef0123456789-_=", min_size=40, max_size=46),
        ),
    )
)
def test_fuzz_header_parser_raises_only_unauthorized(header: str | None) -> None:
    authenticator = Authenticator(AuthConfig.from_toml(CONFIG_TOML))
    try:
        principal = authenticator.authenticate(header)
    except UnauthorizedError:
        return
    # Only the configured keys get through, to their own principal.
    assert header is not None
    assert principal.key_id in {"alice-laptop", "bob", "carol", "root"}
    key = parse_bearer(header)
    assert key in {OWNER_KEY, USER_KEY, OTHER_KEY, ADMIN_KEY}


# --------------------------------------------------------------------------- config


def test_toml_configuration_parses(config: AuthConfig) -> None:
    a = config.tenant("hospital-a")
    assert a == TenantConfig("hospital-a", 10, 2_000_000_000, 20.0, 40, 4)
    assert isinstance(a.requests_per_second, float)
    assert config.tenant("hospital-b") == TenantConfig("hospital-b")  # defaults
    assert [(k.key_id, k.tenant, k.role) for k in config.keys] == [
        ("alice-laptop", "hospital-a", Role.OWNER),
        ("bob", "hospital-a", Role.USER),
        ("carol", "hospital-b", Role.OWNER),
        ("root", "ops", Role.ADMIN),
    ]
    assert config.keys[1].sha256 == USER_SHA  # normalized to lower case
    with pytest.raises(KeyError):
        config.tenant("nobody")


def test_defaults_are_sensible() -> None:
    t = TenantConfig("t")
    assert t.max_models >= 1
    assert t.max_stored_bytes >= 1 << 20
    assert t.requests_per_second > 0
    assert t.burst >= t.requests_per_second
    assert t.max_concurrent_inferences >= 1


def _tenant(body: str = "", key: str | None = None, name: str = "t") -> str:
    key_table = (
        key
        if key is not None
        else f'[[tenant.key]]\nid = "k"\nrole = "owner"\nsha256 = "{OWNER_SHA}"\n'
    )
    return f'[[tenant]]\nname = "{name}"\n{body}\n{key_table}'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("this is = = not toml", "not valid TOML"),
        ("", "no API key"),
        ('[[tenant]]\nname = "t"\n', "no API key"),
        ("tenants = []", "unknown field.*'tenants'"),
        ("tenant = 3", "array of tables"),
        ("[tenant]\nname = 't'", "array of tables"),
        (_tenant("colour = 'blue'"), r"tenant\[0\] \(t\): unknown field.*'colour'"),
        (_tenant("max_model = 3"), "unknown field.*'max_model'"),
        ("[[tenant]]\nmax_models = 1", r"tenant\[0\]: name is missing"),
        (_tenant(name="Hospital A"), "tenant name must be"),
        (_tenant(name="*"), "tenant name must be"),
        (_tenant(name="a:b"), "tenant name must be"),
        (_tenant("max_models = -1"), "max_models must be at least 0, got -1"),
        (_tenant("max_models = 1.5"), "max_models must be an integer"),
        (_tenant("max_models = true"), "max_models must be an integer"),
        (_tenant("burst = 0"), "burst must be at least 1"),
        (_tenant("burst = 99999999999999999999"), "burst must be at most"),
        (_tenant("max_concurrent_inferences = 0"), "max_concurrent_inferences must be at least"),
        (_tenant("requests_per_second = 0"), "requests_per_second must be a finite number"),
        (_tenant("requests_per_second = inf"), "requests_per_second must be a finite number"),
        (_tenant("requests_per_second = nan"), "requests_per_second must be a finite number"),
        (_tenant("requests_per_second = '5'"), "requests_per_second must be a number"),
        (_tenant("max_stored_bytes = '1GB'"), "max_stored_bytes must be an integer"),
        (
            _tenant(key=f'[[tenant.key]]\nid = "k"\nrole = "root"\nsha256 = "{OWNER_SHA}"'),
            r"key\[0\]: role must be one of 'admin', 'owner', 'user', got 'root'",
        ),
        (
            _tenant(key=f'[[tenant.key]]\nid = "k"\nrole = "Owner"\nsha256 = "{OWNER_SHA}"'),
            "role must be one of",
        ),
        (
            _tenant(key='[[tenant.key]]\nid = "k"\nrole = "owner"\nsha256 = "xyz"'),
            "sha256 must be 64 hexadecimal digits",
        ),
        (
            _tenant(key=f'[[tenant.key]]\nid = "k"\nrole = "owner"\nsha256 = "{OWNER_SHA}0"'),
            "sha256 must be 64 hexadecimal digits",
        ),
        (
            _tenant(key=f'[[tenant.key]]\nid = "k"\nrole = "owner"\nsha256 = "{OWNER_KEY}"'),
            "sha256 must be 64 hexadecimal digits",
        ),
        (
            _tenant(key='[[tenant.key]]\nid = "k"\nrole = "owner"\nsha256 = 5'),
            "sha256 must be 64 hexadecimal digits",
        ),
        (
            _tenant(key=f'[[tenant.key]]\nrole = "owner"\nsha256 = "{OWNER_SHA}"'),
            r"key\[0\]: id is missing",
        ),
        (
            _tenant(key=f'[[tenant.key]]\nid = "k"\nsha256 = "{OWNER_SHA}"'),
            "role is missing",
        ),
        (
            _tenant(key='[[tenant.key]]\nid = "k"\nrole = "owner"'),
            "sha256 is missing",
        ),
        (
            _tenant(
                key=f'[[tenant.key]]\nid = "k"\nrole = "owner"\nsha256 = "{OWNER_SHA}"\n'
                'key = "bik_oops"'
            ),
            "unknown field.*'key'",
        ),
        (
            _tenant(key=f'[[tenant.key]]\nid = "a b"\nrole = "owner"\nsha256 = "{OWNER_SHA}"'),
            "key id must be",
        ),
        (_tenant() + _tenant(key=""), "tenant 't' is declared more than once"),
        (
            _tenant()
            + _tenant(
                name="u", key=f'[[tenant.key]]\nid = "k"\nrole = "user"\nsha256 = "{USER_SHA}"'
            ),
            "key id 'k' is used more than once",
        ),
        (
            _tenant()
            + _tenant(
                name="u",
                key=f'[[tenant.key]]\nid = "k2"\nrole = "user"\nsha256 = "{OWNER_SHA.upper()}"',
            ),
            "keys 'k' and 'k2' have the same sha256",
        ),
    ],
)
def test_configuration_errors(text: str, message: str) -> None:
    with pytest.raises(AuthConfigError, match=message):
        AuthConfig.from_toml(text)


def test_config_built_in_code_is_checked_too() -> None:
    with pytest.raises(AuthConfigError, match="undeclared tenant 'ghost'"):
        AuthConfig((TenantConfig("t"),), (ApiKey("k", "ghost", Role.USER, OWNER_SHA),))
    with pytest.raises(AuthConfigError, match="sha256"):
        ApiKey("k", "t", Role.USER, "00")
    with pytest.raises(AuthConfigError, match="role must be a Role"):
        ApiKey("k", "t", "user", OWNER_SHA)  # type: ignore[arg-type]


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    path.write_text(CONFIG_TOML, encoding="utf-8")
    assert AuthConfig.from_file(path) == AuthConfig.from_toml(CONFIG_TOML)
    with pytest.raises(AuthConfigError, match="cannot read"):
        AuthConfig.from_file(tmp_path / "missing.toml")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(AuthConfigError, match="not UTF-8"):
        AuthConfig.from_file(path)
    path.write_text("[[tenant]]\nname = 1\n", encoding="utf-8")
    with pytest.raises(AuthConfigError, match=f"{path}: tenant\\[0\\]: tenant name must be"):
        AuthConfig.from_file(path)


# --------------------------------------------------------------------------- env


def test_env_unset_means_open_mode() -> None:
    assert AuthConfig.from_env({}) is None
    assert Authenticator(AuthConfig.from_env({"OTHER": "x"})).open_mode


def test_env_parses_keys_with_default_quotas() -> None:
    value = (
        f" hospital-a:owner:{OWNER_SHA} , hospital-a:user:{USER_SHA.upper()},ops:admin:{ADMIN_SHA}"
    )
    config = AuthConfig.from_env({ENV_VARIABLE: value})
    assert config is not None
    assert config.tenants == (TenantConfig("hospital-a"), TenantConfig("ops"))
    assert [(k.key_id, k.tenant, k.role, k.sha256) for k in config.keys] == [
        (f"env-{OWNER_SHA[:16]}", "hospital-a", Role.OWNER, OWNER_SHA),
        (f"env-{USER_SHA[:16]}", "hospital-a", Role.USER, USER_SHA),
        (f"env-{ADMIN_SHA[:16]}", "ops", Role.ADMIN, ADMIN_SHA),
    ]
    authenticator = Authenticator(config)
    assert authenticator.authenticate(f"Bearer {USER_KEY}") == Principal(
        "hospital-a", Role.USER, f"env-{USER_SHA[:16]}"
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "set but empty"),
        ("  ", "set but empty"),
        (f"a:owner:{OWNER_SHA},", "entry 1: expected tenant:role:sha256hex, got 1"),
        ("a:owner", "entry 0: expected tenant:role:sha256hex, got 2"),
        (f"a:owner:{OWNER_SHA}:extra", "got 4"),
        (f"A:owner:{OWNER_SHA}", "entry 0: tenant name must be"),
        (f"a:superuser:{OWNER_SHA}", "entry 0: role must be one of"),
        ("a:owner:nothex", "entry 0: sha256 must be 64 hexadecimal digits"),
        (f"a:owner:{OWNER_SHA},b:user:{OWNER_SHA}", "have the same sha256"),
        (f"a:owner:{OWNER_SHA},a:owner:{OWNER_SHA}", "have the same sha256"),
    ],
)
def test_env_errors(value: str, message: str) -> None:
    with pytest.raises(AuthConfigError, match=message):
        AuthConfig.from_env({ENV_VARIABLE: value})


# --------------------------------------------------------------------------- keys


def test_generated_keys_are_well_formed_random_and_hashed() -> None:
    keys = {generate_api_key() for _ in range(50)}
    assert len(keys) == 50
    for key, sha in keys:
        assert key.startswith("bik_")
        assert len(key) == 47
        assert len(base64.urlsafe_b64decode(key[4:] + "=")) == 32
        assert sha == hashlib.sha256(key.encode()).hexdigest() == key_sha256(key)
        assert parse_bearer(f"Bearer {key}") == key


def test_new_key_toml_snippet_loads_and_authenticates() -> None:
    key, snippet = new_key_toml("hospital-a", "owner", "alice-laptop")
    assert key not in snippet
    assert key_sha256(key) in snippet
    config = AuthConfig.from_toml('[[tenant]]\nname = "hospital-a"\n' + snippet)
    assert Authenticator(config).authenticate(f"Bearer {key}") == Principal(
        "hospital-a", Role.OWNER, "alice-laptop"
    )
    # pasted after an existing tenant with keys, it attaches to that tenant
    config = AuthConfig.from_toml(
        CONFIG_TOML.replace('"bob"', '"bob2"') + snippet.replace("alice-laptop", "alice-2")
    )
    assert config.keys[-1].tenant == "ops"  # the last [[tenant]] above the snippet


@pytest.mark.parametrize(
    ("tenant", "role", "key_id", "message"),
    [
        ("Bad Name", "owner", "k", "tenant name must be"),
        ("t", "god", "k", "role must be one of"),
        ("t", "owner", 'k"\nrole = "admin', "key id must be"),
    ],
)
def test_new_key_toml_refuses_bad_arguments(
    tenant: str, role: str, key_id: str, message: str
) -> None:
    with pytest.raises(AuthConfigError, match=message):
        new_key_toml(tenant, role, key_id)


# --------------------------------------------------------------------------- fuzz

_NAMES = st.sampled_from(
    [
        "tenant",
        "key",
        "name",
        "id",
        "role",
        "sha256",
        "max_models",
        "burst",
        "requests_per_second",
        "max_stored_bytes",
        "max_concurrent_inferences",
        "x",
    ]
)
_VALUES = st.one_of(
    st.sampled_from(
        [
            '"t"',
            '"u"',
            '"owner"',
            '"admin"',
            '"user"',
            f'"{OWNER_SHA}"',
            f'"{USER_SHA}"',
            "1",
            "0",
            "-1",
            "1.5",
            "inf",
            "nan",
            "true",
            "[]",
            "{}",
            '"*"',
            "[1, [2]]",
            "'k'",
        ]
    ),
    st.text(max_size=12).map(lambda s: '"' + s.replace("\\", "").replace('"', "") + '"'),
)
_LINES = st.one_of(
    st.sampled_from(["[[tenant]]", "[[tenant.key]]", "[tenant]", "[x]", "[[tenant.key.x]]"]),
    st.builds(lambda k, v: f"{k} = {v}", _NAMES, _VALUES),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.lists(_LINES, max_size=14).map("\n".join), st.text(max_size=200)))
def test_fuzz_toml_loader_raises_only_auth_config_errors(text: str) -> None:
    try:
        config = AuthConfig.from_toml(text)
    except AuthConfigError:
        return
    assert config.keys
    assert {k.tenant for k in config.keys} <= {t.name for t in config.tenants}


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["tenant", "other"]), _JSONISH, max_size=2))
def test_fuzz_from_mapping_raises_only_auth_config_errors(document: dict[str, object]) -> None:
    with contextlib.suppress(AuthConfigError):
        AuthConfig.from_mapping(document)


def test_error_family() -> None:
    assert issubclass(AuthConfigError, BlindInferError)
    assert issubclass(UnauthorizedError, AccessError)
    assert issubclass(ForbiddenError, AccessError)
    assert issubclass(AccessError, BlindInferError)


# ---- what a tenant may learn of a model it does not own (issue 21, item 7)


def test_sharing_view_hides_the_owner_and_the_rest_of_the_list() -> None:
    owner = Principal("a", Role.OWNER, "k1")
    guest = Principal("c", Role.USER, "k2")
    admin = Principal("ops", Role.ADMIN, "k3")
    shared = ("b", "c", "d")
    assert sharing_view(owner, "a", shared) == ("a", ["b", "c", "d"])
    assert sharing_view(admin, "a", shared) == ("a", ["b", "c", "d"])
    assert sharing_view(guest, "a", shared) == (None, ["c"])
    assert sharing_view(guest, "a", ("*", "b")) == (None, ["*"])
    assert sharing_view(guest, "a", ()) == (None, [])


def test_max_loaded_bytes_is_optional_and_checked() -> None:
    assert TenantConfig("a").max_loaded_bytes is None
    text = '[[tenant]]\nname = "a"\nmax_loaded_bytes = 5000\n'
    key = '[[tenant.key]]\nid = "k"\nrole = "owner"\nsha256 = "' + "0" * 64 + '"\n'
    assert AuthConfig.from_toml(text + key).tenant("a").max_loaded_bytes == 5000
    for bad in ("-1", "true", '"1G"'):
        with pytest.raises(AuthConfigError, match="max_loaded_bytes"):
            AuthConfig.from_toml(text.replace("5000", bad) + key)
