"""Tenants, API keys and roles: who may do what to which model.

BlindAI Core let anyone who knew a model_id delete it. Here every request carries an API
key (`Authorization: Bearer bik_...`), the key names a principal (tenant, role, key id),
and `authorize` decides each action against the model's owning tenant and its sharing.

- Keys are random 32-byte tokens shown as ``bik_<base64url, no padding>``. The server only
  ever stores SHA-256 of the key's ASCII text, so a leaked configuration grants nothing.
- Roles: ADMIN may do everything to every tenant's models; OWNER uploads, replaces,
  deletes and shares its tenant's models and runs and lists what its tenant can see; USER
  runs and lists what its tenant can see. "See" = the tenant's own models plus those
  shared with it by name or with everyone (``"*"``).
- Without any configuration the server is in *open mode*: every request is
  `OPEN_PRINCIPAL` (tenant "local", ADMIN), which is today's single-user behaviour.

Configuration (TOML; the environment form `BLINDINFER_API_KEYS` holds keys only)::

    [[tenant]]
    name = "hospital-a"
    max_models = 10
    max_stored_bytes = 2_000_000_000
    requests_per_second = 20
    burst = 40
    max_concurrent_inferences = 4
    max_loaded_bytes = 1_000_000_000   # default: an equal share of --memory-budget-bytes

      [[tenant.key]]
      id = "alice-laptop"
      role = "owner"
      sha256 = "<64 hex digits: SHA-256 of the key text>"

The module depends on nothing from starlette so that the CLI and tests use it directly.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import re
import secrets
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

from blindinfer.errors import BlindInferError

KEY_PREFIX = "bik_"
KEY_BYTES = 32
# base64url of 32 bytes without padding is 43 characters.
_KEY_RE = re.compile(r"bik_[A-Za-z0-9_-]{43}")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
# Tenant names: no ":" or "," (the environment form splits on them), never "*" (which
# means "every tenant" in sharing lists), short enough to put in messages and logs.
_TENANT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
# Anything longer than this cannot be a valid header; refuse before doing any work.
_MAX_HEADER_CHARS = 256

_KNOWN_SCHEMES = frozenset({"basic", "digest", "negotiate", "ntlm", "token", "apikey", "dpop"})

ENV_VARIABLE = "BLINDINFER_API_KEYS"
EVERY_TENANT = "*"
GiB = 1 << 30


# --------------------------------------------------------------------------- errors


class AuthConfigError(BlindInferError):
    """The tenants/keys configuration is malformed; the message names the offending place.

    Raised at start-up only: a server with a configuration it cannot fully understand must
    not start, rather than run with some keys silently ignored.
    """


class AccessError(BlindInferError):
    """Base of the refusals a request can meet before it reaches a model.

    Each subclass carries the HTTP status and machine code it maps to, and the extra
    response headers it needs, so that the server's exception table needs one entry for
    the whole family: ``(AccessError, exc.http_status, exc.code)`` plus ``exc.headers``.
    """

    http_status: ClassVar[int] = 403
    code: ClassVar[str] = "forbidden"

    @property
    def headers(self) -> dict[str, str]:
        """Response headers that HTTP requires or strongly expects with this status."""
        return {}


class TryLaterError(AccessError):
    """A refusal that passes with time: HTTP 429 with Retry-After.

    `retry_after_s` is the exact wait when it is known (a token bucket), else 1. Retry-After
    is whole seconds: rounded up (earlier would be refused again) and never 0, which invites
    a client to hammer the server in a loop.
    """

    http_status: ClassVar[int] = 429

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class UnauthorizedError(AccessError):
    """No usable API key: missing, not a Bearer token, malformed, or unknown. HTTP 401.

    The message never quotes the presented key: it might be a real secret meant for some
    other service, and messages end up in logs.
    """

    http_status: ClassVar[int] = 401
    code: ClassVar[str] = "unauthorized"

    @property
    def headers(self) -> dict[str, str]:
        # RFC 9110 section 15.5.2: a 401 must carry a challenge.
        return {"WWW-Authenticate": 'Bearer realm="blindinfer"'}


class ForbiddenError(AccessError):
    """An authenticated principal asked for something its role or tenant does not allow.

    HTTP 403 "forbidden". `visible` says whether the principal may know the model exists;
    when it is False a route should answer 404 unknown_model instead, so that probing
    names or ids reveals nothing about other tenants' models.
    """

    http_status: ClassVar[int] = 403
    code: ClassVar[str] = "forbidden"

    def __init__(self, message: str, *, visible: bool = True) -> None:
        self.visible = visible
        super().__init__(message)


# --------------------------------------------------------------------------- model


class Role(Enum):
    """What a key may do; see the module docstring for the exact rights."""

    ADMIN = "admin"
    OWNER = "owner"
    USER = "user"


class Action(Enum):
    """Everything a route can ask `authorize` about."""

    UPLOAD = "upload"  # a new model, or replacing one (then pass its model_owner)
    DELETE = "delete"
    SHARE = "share"  # change a model's shared_with
    RUN = "run"
    READ_METADATA = "read_metadata"  # model metadata, readiness
    LIST = "list"  # see a model in the index (model_owner=None: may call the index at all)
    ADMIN = "admin"  # audit log, statistics, anything about the server itself


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is making a request: the tenant it acts for, its role, and which key it used.

    `key_id` is for audit logs; it is never used for decisions.
    """

    tenant: str
    role: Role
    key_id: str


OPEN_PRINCIPAL = Principal(tenant="local", role=Role.ADMIN, key_id="open-mode")


_MAX_INT = (1 << 63) - 1  # TOML's own integer range; larger would overflow float()


def _check_int(where: str, name: str, value: object, minimum: int) -> int:
    # bool is an int in Python; `max_models = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise AuthConfigError(f"{where}: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise AuthConfigError(f"{where}: {name} must be at least {minimum}, got {value}")
    if value > _MAX_INT:
        raise AuthConfigError(f"{where}: {name} must be at most {_MAX_INT}, got {value}")
    return value


def check_tenant_name(where: str, value: object) -> str:
    """`value` if it is a valid tenant name, else AuthConfigError prefixed with `where`.

    Public so that the key tool and the routes apply the very same rule."""
    if not isinstance(value, str) or not _TENANT_RE.fullmatch(value):
        raise AuthConfigError(
            f"{where}: tenant name must be 1-63 characters of a-z, 0-9, '.', '_', '-' "
            f"starting with a letter or digit, got {value!r}"
        )
    return value


def check_key_id(where: str, value: object) -> str:
    """`value` if it is a valid key id (it goes into audit logs: no spaces, no quotes)."""
    if not isinstance(value, str) or not _KEY_ID_RE.fullmatch(value):
        raise AuthConfigError(
            f"{where}: key id must be 1-64 characters of A-Z, a-z, 0-9, '.', '_', '@', '-' "
            f"starting with a letter or digit, got {value!r}"
        )
    return value


def parse_role(where: str, value: object) -> Role:
    """The Role spelled `value` (exactly: "owner", not "Owner", so configs stay greppable)."""
    for role in Role:
        if value == role.value:
            return role
    valid = ", ".join(repr(role.value) for role in Role)
    raise AuthConfigError(f"{where}: role must be one of {valid}, got {value!r}")


def _check_sha256(where: str, value: object) -> str:
    if not isinstance(value, str) or not _HEX64_RE.fullmatch(value):
        shown = value if not isinstance(value, str) else f"{value[:80]!r} ({len(value)} chars)"
        raise AuthConfigError(
            f"{where}: sha256 must be 64 hexadecimal digits (SHA-256 of the key), got {shown}"
        )
    return value.lower()


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """One tenant and its quotas; the defaults suit a small team sharing one server.

    max_models / max_stored_bytes may be 0: a tenant that only runs models shared with it.
    max_loaded_bytes: the most measured session memory charged to the tenant's models;
    None (unset) means an equal share of the server's memory budget (`TenantQuotas`).
    Generation (`server/generation_quota.py`; None = the server's default):
    tokens_per_minute (prompt + completion tokens), max_concurrent_generations, and
    max_kv_cache_bytes (KV cache reserved by its generations in flight; default an equal
    share of `--kv-cache-budget-bytes`).
    """

    name: str
    max_models: int = 8
    max_stored_bytes: int = 1 * GiB
    requests_per_second: float = 10.0
    burst: int = 20
    max_concurrent_inferences: int = 4
    max_loaded_bytes: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_generations: int | None = None
    max_kv_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        where = f"tenant {self.name!r}"
        check_tenant_name("tenant", self.name)
        _check_int(where, "max_models", self.max_models, 0)
        _check_int(where, "max_stored_bytes", self.max_stored_bytes, 0)
        _check_int(where, "burst", self.burst, 1)
        _check_int(where, "max_concurrent_inferences", self.max_concurrent_inferences, 1)
        if self.max_loaded_bytes is not None:
            _check_int(where, "max_loaded_bytes", self.max_loaded_bytes, 0)
        for name in ("tokens_per_minute", "max_concurrent_generations", "max_kv_cache_bytes"):
            if getattr(self, name) is not None:
                _check_int(where, name, getattr(self, name), 1)
        rps = self.requests_per_second
        if isinstance(rps, bool) or not isinstance(rps, int | float):
            raise AuthConfigError(f"{where}: requests_per_second must be a number, got {rps!r}")
        if not math.isfinite(rps) or rps <= 0:
            raise AuthConfigError(
                f"{where}: requests_per_second must be a finite number above 0, got {rps!r}"
            )
        object.__setattr__(self, "requests_per_second", float(rps))


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A configured key: only its SHA-256 (lowercase hex) is known to the server."""

    key_id: str
    tenant: str
    role: Role
    sha256: str

    def __post_init__(self) -> None:
        check_key_id("key", self.key_id)
        check_tenant_name(f"key {self.key_id!r}", self.tenant)
        if not isinstance(self.role, Role):
            raise AuthConfigError(f"key {self.key_id!r}: role must be a Role")
        object.__setattr__(self, "sha256", _check_sha256(f"key {self.key_id!r}", self.sha256))

    @property
    def principal(self) -> Principal:
        return Principal(tenant=self.tenant, role=self.role, key_id=self.key_id)


_TENANT_FIELDS = frozenset(
    {
        "name",
        "max_models",
        "max_stored_bytes",
        "requests_per_second",
        "burst",
        "max_concurrent_inferences",
        "max_loaded_bytes",
        "tokens_per_minute",
        "max_concurrent_generations",
        "max_kv_cache_bytes",
        "key",
    }
)
_KEY_FIELDS = frozenset({"id", "role", "sha256"})


def _unknown_fields(where: str, table: Mapping[str, object], allowed: frozenset[str]) -> None:
    unknown = sorted(str(name) for name in table if name not in allowed)
    if unknown:
        raise AuthConfigError(
            f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )


def _table_list(where: str, value: object) -> list[Mapping[str, object]]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise AuthConfigError(f"{where} must be an array of tables ([[{where}]])")
    return value


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """Every tenant and every key, checked as a whole.

    Built from TOML, a file, the environment or code; each path ends in __post_init__,
    which refuses duplicates (a key hash listed twice would make one key mean two
    principals) and keys of undeclared tenants.
    """

    tenants: tuple[TenantConfig, ...]
    keys: tuple[ApiKey, ...]
    _by_name: dict[str, TenantConfig] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, TenantConfig] = {}
        for tenant in self.tenants:
            if tenant.name in by_name:
                raise AuthConfigError(f"tenant {tenant.name!r} is declared more than once")
            by_name[tenant.name] = tenant
        ids: set[str] = set()
        hashes: dict[str, str] = {}
        for key in self.keys:
            if key.tenant not in by_name:
                raise AuthConfigError(
                    f"key {key.key_id!r} belongs to undeclared tenant {key.tenant!r}"
                )
            if key.sha256 in hashes:
                raise AuthConfigError(
                    f"keys {hashes[key.sha256]!r} and {key.key_id!r} have the same sha256: "
                    "one key would stand for two principals"
                )
            hashes[key.sha256] = key.key_id
            if key.key_id in ids:
                raise AuthConfigError(f"key id {key.key_id!r} is used more than once")
            ids.add(key.key_id)
        if not self.keys:
            raise AuthConfigError(
                "the configuration defines no API key, so nobody could use the server; "
                "configure no authentication at all for open mode"
            )
        object.__setattr__(self, "_by_name", by_name)

    def tenant(self, name: str) -> TenantConfig:
        """The tenant's settings; KeyError for a name the configuration does not declare."""
        return self._by_name[name]

    # ---- parsers

    @classmethod
    def from_mapping(cls, document: Mapping[str, object]) -> AuthConfig:
        """From an already-parsed TOML document (e.g. a section of a larger file)."""
        if not isinstance(document, Mapping):
            raise AuthConfigError("the configuration must be a table")
        _unknown_fields("configuration", document, frozenset({"tenant"}))
        tenants: list[TenantConfig] = []
        keys: list[ApiKey] = []
        for t_index, table in enumerate(_table_list("tenant", document.get("tenant", []))):
            where = f"tenant[{t_index}]"
            if "name" not in table:
                raise AuthConfigError(f"{where}: name is missing")
            name = check_tenant_name(where, table["name"])
            where = f"tenant[{t_index}] ({name})"
            _unknown_fields(where, table, _TENANT_FIELDS)
            settings = {k: v for k, v in table.items() if k not in ("name", "key")}
            try:
                tenants.append(TenantConfig(name, **settings))  # type: ignore[arg-type]
            except AuthConfigError as exc:
                raise AuthConfigError(f"{where}: {exc}") from None
            for k_index, key in enumerate(_table_list("tenant.key", table.get("key", []))):
                key_where = f"{where} key[{k_index}]"
                _unknown_fields(key_where, key, _KEY_FIELDS)
                for required in sorted(_KEY_FIELDS):
                    if required not in key:
                        raise AuthConfigError(f"{key_where}: {required} is missing")
                keys.append(
                    ApiKey(
                        key_id=check_key_id(key_where, key["id"]),
                        tenant=name,
                        role=parse_role(key_where, key["role"]),
                        sha256=_check_sha256(key_where, key["sha256"]),
                    )
                )
        return cls(tuple(tenants), tuple(keys))

    @classmethod
    def from_toml(cls, text: str) -> AuthConfig:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise AuthConfigError(f"the configuration is not valid TOML: {exc}") from None
        except RecursionError:  # absurdly nested arrays
            raise AuthConfigError("the configuration is nested too deeply") from None
        return cls.from_mapping(document)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> AuthConfig:
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise AuthConfigError(f"cannot read {os.fspath(path)!r}: {exc.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise AuthConfigError(f"{os.fspath(path)!r} is not UTF-8 text") from None
        try:
            return cls.from_toml(text)
        except AuthConfigError as exc:
            raise AuthConfigError(f"{os.fspath(path)}: {exc}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AuthConfig | None:
        """From `BLINDINFER_API_KEYS` = "tenant:role:sha256hex,...", tenants with default
        quotas; key ids are "env-" + the first 16 hex digits of the hash (stable when the
        list is edited, unlike a position).

        Unset means no configuration (None: open mode). Set but blank is refused: it is
        more likely a deployment mistake than a wish to run without authentication.
        """
        raw = environ.get(ENV_VARIABLE)
        if raw is None:
            return None
        if not raw.strip():
            raise AuthConfigError(
                f"{ENV_VARIABLE} is set but empty; unset it for open mode, or list "
                "tenant:role:sha256hex entries separated by commas"
            )
        tenants: dict[str, TenantConfig] = {}
        keys: list[ApiKey] = []
        for index, entry in enumerate(raw.split(",")):
            where = f"{ENV_VARIABLE} entry {index}"
            parts = entry.strip().split(":")
            if len(parts) != 3:
                raise AuthConfigError(
                    f"{where}: expected tenant:role:sha256hex, got {len(parts)} "
                    f"colon-separated part(s)"
                )
            tenant = check_tenant_name(where, parts[0])
            role = parse_role(where, parts[1])
            sha256 = _check_sha256(where, parts[2])
            tenants.setdefault(tenant, TenantConfig(tenant))
            keys.append(ApiKey(f"env-{sha256[:16]}", tenant, role, sha256))
        return cls(tuple(tenants.values()), tuple(keys))


# --------------------------------------------------------------------------- keys


def key_sha256(key: str) -> str:
    """SHA-256 (lowercase hex) of a key's text, as the configuration stores it."""
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def generate_api_key() -> tuple[str, str]:
    """A new key and the SHA-256 to configure: (secret for the user, hash for the server)."""
    key = KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(KEY_BYTES)).decode(
        "ascii"
    ).rstrip("=")
    return key, key_sha256(key)


def _is_well_formed_key(key: str) -> bool:
    if not _KEY_RE.fullmatch(key):
        return False
    # 43 base64url characters carry 258 bits, 2 more than 32 bytes: refuse texts whose
    # spare bits are not zero, so that one key has exactly one spelling.
    body = key[len(KEY_PREFIX) :]
    raw = base64.urlsafe_b64decode(body + "=")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") == body


class Authenticator:
    """Turns an Authorization header into a Principal.

    Lookup is a dict keyed by SHA-256 of the presented key, not a constant-time loop of
    hmac.compare_digest. A dict lookup's timing can at most leak how the *hash* of the
    attacker's own guess relates to a stored hash. Stored hashes are not secrets (they
    sit in the configuration file, and that is safe by design): keys are 256-bit random,
    so knowing a hash, in full, does not help find its key (SHA-256 preimage resistance).
    Hence nothing secret can leak, and the lookup costs the same for 1 or 10,000 keys.
    """

    def __init__(self, config: AuthConfig | None) -> None:
        self._config = config
        self._by_hash: dict[bytes, Principal] = {}
        if config is not None:
            self._by_hash = {bytes.fromhex(k.sha256): k.principal for k in config.keys}

    @property
    def open_mode(self) -> bool:
        """True without a configuration: every request is OPEN_PRINCIPAL."""
        return self._config is None

    @property
    def config(self) -> AuthConfig | None:
        return self._config

    def authenticate(self, authorization_header: str | None) -> Principal:
        """The principal of a request, from its Authorization header value.

        In open mode the header is ignored: a client that always sends its key keeps
        working against an open server.
        """
        if self._config is None:
            return OPEN_PRINCIPAL
        key = parse_bearer(authorization_header)
        principal = self._by_hash.get(hashlib.sha256(key.encode("ascii")).digest())
        if principal is None:
            raise UnauthorizedError("the API key is not known to this server")
        return principal


def parse_bearer(authorization_header: str | None) -> str:
    """The well-formed blindinfer key in an `Authorization: Bearer <key>` header value.

    The scheme is case-insensitive (RFC 9110 section 11.1); the key is not.
    """
    if authorization_header is None or not authorization_header.strip():
        raise UnauthorizedError(
            "this server requires an API key: send 'Authorization: Bearer bik_...'"
        )
    if len(authorization_header) > _MAX_HEADER_CHARS:
        raise UnauthorizedError("the Authorization header is too long to hold an API key")
    scheme, _, credentials = authorization_header.strip().partition(" ")
    if scheme.lower() != "bearer":
        # Name the scheme only if it is a well-known one: anything else may be part of a
        # key sent without the space ("Bearerbik_..."), which must not reach the logs.
        shown = repr(scheme) if scheme.lower() in _KNOWN_SCHEMES else "another scheme"
        raise UnauthorizedError(
            f"the Authorization scheme must be Bearer, got {shown}; "
            "send 'Authorization: Bearer bik_...'"
        )
    credentials = credentials.strip(" ")
    if not credentials:
        raise UnauthorizedError("the Authorization header has the Bearer scheme but no key")
    if not _is_well_formed_key(credentials):
        raise UnauthorizedError(
            f"the API key is malformed: blindinfer keys are {KEY_PREFIX!r} followed by 43 "
            "base64url characters"
        )
    return credentials


# --------------------------------------------------------------------------- decisions

_MODEL_ACTIONS = frozenset({Action.DELETE, Action.SHARE, Action.RUN, Action.READ_METADATA})
# Actions a tenant's keys may take on models the tenant can see but does not own.
_READ_ACTIONS = frozenset({Action.RUN, Action.READ_METADATA, Action.LIST})
_ROLE_ACTIONS: dict[Role, frozenset[Action]] = {
    Role.ADMIN: frozenset(Action),
    Role.OWNER: frozenset(Action) - {Action.ADMIN},
    Role.USER: _READ_ACTIONS,
}


def visible_to(principal: Principal, model_owner: str, shared_with: Collection[str] = ()) -> bool:
    """May the principal know this model exists (see it listed, get metadata, run it)?"""
    return (
        principal.role is Role.ADMIN
        or model_owner == principal.tenant
        or principal.tenant in shared_with
        or EVERY_TENANT in shared_with
    )


def sharing_view(
    principal: Principal, model_owner: str, shared_with: Collection[str] = ()
) -> tuple[str | None, list[str]]:
    """What the principal may learn of a model's owner and sharing: (owner, shared_with).

    The owning tenant and admins see both in full. A tenant the model is shared with
    learns only that it is shared with it (its own name, or "*" when shared with
    everyone), never the owner or the other tenants on the list: a share must not
    introduce the tenants to one another.
    """
    if principal.role is Role.ADMIN or model_owner == principal.tenant:
        return model_owner, sorted(shared_with)
    if principal.tenant in shared_with:
        return None, [principal.tenant]
    if EVERY_TENANT in shared_with:
        return None, [EVERY_TENANT]
    return None, []


def authorize(
    principal: Principal,
    action: Action,
    *,
    model_owner: str | None = None,
    shared_with: Collection[str] = (),
) -> None:
    """Raises ForbiddenError unless `principal` may take `action`.

    `model_owner` is the tenant owning the model concerned. It is required for DELETE,
    SHARE, RUN and READ_METADATA (ValueError without: a route bug, not a user error). For
    UPLOAD, None means a new model (it will belong to the principal's tenant) and a tenant
    means replacing that tenant's model. For LIST, None asks whether the principal may
    call the index at all, a tenant whether this model may appear in it.

    Sharing grants running and reading only: a shared model can never be replaced,
    deleted or re-shared by the tenants it is shared with.
    """
    if action in _MODEL_ACTIONS and model_owner is None:
        raise ValueError(f"authorize({action.name}) concerns a model: pass model_owner")
    if action not in _ROLE_ACTIONS[principal.role]:
        raise ForbiddenError(
            f"the {principal.role.value!r} role may not {_verb(action)}",
            visible=model_owner is None or visible_to(principal, model_owner, shared_with),
        )
    if principal.role is Role.ADMIN or action is Action.ADMIN or model_owner is None:
        return
    if model_owner == principal.tenant:
        return
    if not visible_to(principal, model_owner, shared_with):
        # Do not name the owner: that would tell one tenant about another's models.
        raise ForbiddenError(
            f"the model belongs to another tenant and is not shared with {principal.tenant!r}",
            visible=False,
        )
    if action not in _READ_ACTIONS:
        raise ForbiddenError(
            f"the model is shared with {principal.tenant!r} for running only; only its "
            f"owning tenant may {_verb(action)}"
        )


def is_allowed(
    principal: Principal,
    action: Action,
    *,
    model_owner: str | None = None,
    shared_with: Collection[str] = (),
) -> bool:
    """`authorize` as a predicate, e.g. to filter the index."""
    try:
        authorize(principal, action, model_owner=model_owner, shared_with=shared_with)
    except ForbiddenError:
        return False
    return True


def _verb(action: Action) -> str:
    return {
        Action.UPLOAD: "upload or replace models",
        Action.DELETE: "delete models",
        Action.SHARE: "share models",
        Action.RUN: "run models",
        Action.READ_METADATA: "read model metadata",
        Action.LIST: "list models",
        Action.ADMIN: "use administrative endpoints",
    }[action]
