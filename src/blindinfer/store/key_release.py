"""The sealed store's key from Trustee's KBS, through the Confidential Data Hub (CDH).

Why: replicas behind a load balancer share one `--store-dir`, so they must share its key,
and no replica's TEE sealing key is another's (TDX has none at all). Confidential
Containers already has a service that releases a secret only to an attested pod: the KBS
(Trustee) checks the pod's evidence against its resource policy, and the CDH inside the
pod VM fetches the resource over that attested channel. blindinfer asks the CDH for one
resource at start (`serve --store-key-resource kbs:///REPO/TYPE/TAG`) and derives the
store key from it; a replica that cannot obtain it does not start.

What the CDH's REST API does (confidential-containers/guest-components, read at commit
8246e5e0, not copied):

- ``api-server-rest/src/main.rs``: the REST server binds TCP ``127.0.0.1:8006`` by
  default (a socket address: no unix socket) and speaks ttrpc to the CDH's own socket.
- ``api-server-rest/src/router.rs``: a peer that is not loopback gets 403.
  ``GET /cdh/resource/<repository>/<type>/<tag>`` answers 200,
  ``application/octet-stream``, the resource's raw bytes; a CDH failure (unknown
  resource, KBS policy refusal, KBS unreachable) is 500 with the error's text; 404 when
  the resource feature is off ("Resource Feature Not Enabled") or for any other path.
- ``api-server-rest/src/client/cdh.rs``: the path is passed on as ``kbs://`` + path, i.e.
  ``kbs:///<repository>/<type>/<tag>``, with no KBS host.
- ``attestation-agent/docs/RESOURCE_URI.md`` and ``attestation-agent/deps/resource_uri/
  src/lib.rs``: the URI form ``kbs://[<kbs_host>:<kbs_port>]/<path>``; the CDH ignores the
  host and asks the KBS of its own configuration, so most URIs leave it out.
- confidential-containers/trustee ``kbs/src/plugins/implementations/resource/backend.rs``
  (``ResourceDesc``): each of the three segments is ``[A-Za-z0-9_-][A-Za-z0-9_.-]*``.

Choices:

- The URI is parsed strictly (`KbsResource.parse`): scheme ``kbs`` only (the REST API
  reaches the ``resource`` plugin only), exactly three segments of Trustee's charset (so
  no ``..``, no ``%``, no empty segment), no query or fragment; a host part is accepted
  as in the URI form and kept, but the CDH ignores it (the server says so at start).
- `--cdh-url` must be ``http://`` to a literal loopback address (127.0.0.0/8 or ::1). The
  CDH is inside the pod VM; a key from anywhere else could come from the host, which would
  then hold the key of every model sealed under it. No host names: ``localhost`` resolves
  through ``/etc/hosts``, which Kubernetes writes from outside the TEE. No proxy from the
  environment (``trust_env=False``), no redirects.
- The resource must be exactly 32 raw bytes (``head -c 32 /dev/urandom``, as
  guest-components' ``coco_keyprovider/README.md`` makes image keys): one format, no
  guessing between raw and base64. The answer is read up to `MAX_RESOURCE_BYTES`, with no
  content encoding, within about `timeout_s`.
- The store key is HKDF-SHA256 of the secret under a fixed label, so the raw KBS secret,
  which its owner may also use elsewhere, is never a key of the store itself.
- Errors are `StoreKeyUnavailableError` (what went wrong, then what to do) and never hold
  the secret; nothing here logs it.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from dataclasses import dataclass
from typing import Final

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from blindinfer.store.errors import StoreKeyConfigError, StoreKeyUnavailableError
from blindinfer.tee.loopback_url import bounded_get, check_loopback_url
from blindinfer.tee.loopback_url import printable as _printable
from blindinfer.tee.loopback_url import reason as _reason

_log = logging.getLogger(__name__)

DEFAULT_CDH_URL: Final = "http://127.0.0.1:8006"
"""api-server-rest's default bind address (guest-components api-server-rest/src/main.rs)."""

RESOURCE_PATH: Final = "/cdh/resource/"
KEY_SIZE: Final = 32
MAX_RESOURCE_BYTES: Final = 4096
"""Read no more of an answer than this: the key is 32 bytes, the rest is a mistake."""

DEFAULT_TIMEOUT_S: Final = 60.0
"""The CDH may attest to the KBS on the first request (the REST server gives its own
ttrpc call 50 s)."""

STORE_KEY_LABEL: Final = b"blindinfer sealed store key v1, from a KBS resource"
MAX_URI_CHARS: Final = 512
MAX_SEGMENT_CHARS: Final = 128
_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_HOST: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
_SEGMENT_NAMES: Final = ("repository", "type", "tag")
_URI_HINT: Final = "write it as kbs:///REPOSITORY/TYPE/TAG, e.g. kbs:///blindinfer/store-key/1"
_MAX_QUOTED: Final = 80
_KEY_FILE_HINT: Final = (
    "store one made with `head -c 32 /dev/urandom > key` (kbs-client ... set-resource "
    "--resource-file key)"
)


def _quoted(text: str) -> str:
    """`text` for a message: repr, cut short (a message must stay one or two lines)."""
    return repr(text if len(text) <= _MAX_QUOTED else text[:_MAX_QUOTED] + "...")


@dataclass(frozen=True, slots=True)
class KbsResource:
    """One KBS resource, ``kbs://[host]/<repository>/<type>/<tag>``, already checked."""

    repository: str
    type: str
    tag: str
    kbs_address: str = ""
    """As written in the URI; the CDH ignores it and asks the KBS it is configured with."""

    def __post_init__(self) -> None:
        for name, value in zip(_SEGMENT_NAMES, self.segments, strict=True):
            _check_segment(name, value)
        if self.kbs_address and (
            _HOST.fullmatch(self.kbs_address) is None or not _port_in_range(self.kbs_address)
        ):
            raise StoreKeyConfigError(
                f"KBS resource host {_quoted(self.kbs_address)} is not a host[:port]\n" + _URI_HINT
            )

    @property
    def segments(self) -> tuple[str, str, str]:
        return (self.repository, self.type, self.tag)

    @property
    def path(self) -> str:
        """``<repository>/<type>/<tag>``, as the CDH's REST API takes it."""
        return "/".join(self.segments)

    def __str__(self) -> str:
        return f"kbs://{self.kbs_address}/{self.path}"

    @classmethod
    def parse(cls, text: str) -> KbsResource:
        """``kbs:///repo/type/tag`` (or ``kbs://host:port/repo/type/tag``), or
        `StoreKeyConfigError` saying what is wrong with it."""
        if not isinstance(text, str) or not text:
            raise StoreKeyConfigError("the KBS resource URI is empty\n" + _URI_HINT)
        if len(text) > MAX_URI_CHARS:
            raise StoreKeyConfigError(
                f"the KBS resource URI is {len(text)} characters, more than {MAX_URI_CHARS}\n"
                + _URI_HINT
            )
        if not text.startswith("kbs://"):
            raise StoreKeyConfigError(
                f"KBS resource URI {_quoted(text)} does not start with kbs:// (the CDH's "
                "REST API reaches the KBS resource plugin only)\n" + _URI_HINT
            )
        if "?" in text or "#" in text:
            raise StoreKeyConfigError(
                f"KBS resource URI {_quoted(text)} has a query or a fragment\n" + _URI_HINT
            )
        address, slash, path = text[len("kbs://") :].partition("/")
        if not slash:
            raise StoreKeyConfigError(f"KBS resource URI {_quoted(text)} has no path\n" + _URI_HINT)
        segments = path.split("/")
        if len(segments) != len(_SEGMENT_NAMES):
            raise StoreKeyConfigError(
                f"KBS resource URI {_quoted(text)} has {len(segments)} path segments, "
                f"expected 3 (repository, type, tag)\n" + _URI_HINT
            )
        repository, type_, tag = segments
        return cls(repository, type_, tag, address)


def _port_in_range(address: str) -> bool:
    _, colon, port = address.rpartition(":")
    return not colon or "]" in port or 0 < int(port) <= 65535


def _check_segment(name: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise StoreKeyConfigError(f"the KBS resource {name} is empty\n" + _URI_HINT)
    if len(value) > MAX_SEGMENT_CHARS or _SEGMENT.fullmatch(value) is None:
        raise StoreKeyConfigError(
            f"KBS resource {name} {_quoted(value)} is not a KBS resource name: up to "
            f"{MAX_SEGMENT_CHARS} of A-Z a-z 0-9 _ - . (not first)\n" + _URI_HINT
        )


_CDH_HINT = "give the CDH's REST API on this pod's loopback, e.g. --cdh-url " + DEFAULT_CDH_URL


def check_cdh_url(text: str) -> str:
    """``http://<loopback address>[:port]``, normalised, or `StoreKeyConfigError`.

    Loopback only: see the module's docstring (the host must never answer a key request);
    the check itself is shared with the Attestation Agent's URL (tee/loopback_url.py).
    """
    return check_loopback_url(
        text,
        service="Confidential Data Hub",
        why="a key from outside the pod VM could be the host's own",
        hint=_CDH_HINT,
        error=StoreKeyConfigError,
    )


def derive_store_key(secret: bytes) -> bytes:
    """The sealed store's 32-byte key from the KBS secret (HKDF-SHA256, fixed label)."""
    if len(secret) != KEY_SIZE:
        raise ValueError(f"the KBS secret must be {KEY_SIZE} bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_SIZE, salt=None, info=STORE_KEY_LABEL)
    return hkdf.derive(secret)


def fetch_store_key(
    resource: KbsResource,
    cdh_url: str = DEFAULT_CDH_URL,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> bytes:
    """The store key derived from `resource`, obtained from the CDH at `cdh_url`, or
    `StoreKeyUnavailableError` (`StoreKeyConfigError` for a non-loopback `cdh_url`)."""
    base = check_cdh_url(cdh_url)
    if resource.kbs_address:
        _log.warning(
            "--store-key-resource names the KBS host %s, which the Confidential Data Hub "
            "ignores: it asks the KBS of its own configuration",
            resource.kbs_address,
        )
    secret = _fetch_resource(resource, base, timeout_s)
    _check_secret(resource, secret)
    _log.info("sealed store key: KBS resource %s, through the CDH at %s", resource, base)
    return derive_store_key(secret)


def _fetch_resource(resource: KbsResource, base: str, timeout_s: float) -> bytes:
    url = base + RESOURCE_PATH + resource.path
    where = f"the Confidential Data Hub at {base}"
    try:
        answer = bounded_get(
            url,
            limit=MAX_RESOURCE_BYTES,
            timeout_s=timeout_s,
            headers={"Accept": "application/octet-stream"},
        )
        status, encoding, body = answer.status, answer.content_encoding, answer.body
    except httpx.TimeoutException:
        raise StoreKeyUnavailableError(
            "cdh_timeout",
            f"{where} did not answer within {timeout_s:g} s for the store key {resource}\n"
            "check that the CDH and the KBS it is configured with are up, then restart",
        ) from None
    except httpx.ConnectError as exc:
        raise StoreKeyUnavailableError(
            "cdh_unreachable",
            f"cannot reach {where} for the store key {resource}: {_reason(exc)}\n"
            "is api-server-rest running in this pod (default 127.0.0.1:8006)? else set "
            "--cdh-url",
        ) from None
    except httpx.HTTPError as exc:
        raise StoreKeyUnavailableError(
            "cdh_broken",
            f"the connection to {where} broke while fetching the store key {resource}: "
            f"{_reason(exc)}\nis api-server-rest what listens at --cdh-url?",
        ) from None
    if status == 200:
        if encoding != "identity":
            raise StoreKeyUnavailableError(
                "cdh_unexpected_status",
                f"{where} sent the store key {resource} with content encoding "
                f"{_quoted(encoding)}\nis api-server-rest what listens at --cdh-url?",
            )
        if len(body) > MAX_RESOURCE_BYTES:
            raise StoreKeyUnavailableError(
                "secret_too_large",
                f"the KBS resource {resource} is more than {MAX_RESOURCE_BYTES} bytes; the "
                f"store key must be exactly {KEY_SIZE} raw bytes\n" + _KEY_FILE_HINT,
            )
        return bytes(body)
    said = _printable(bytes(body[:MAX_RESOURCE_BYTES]))
    if status == 404:
        raise StoreKeyUnavailableError(
            "cdh_endpoint_not_found",
            f"{where} has no resource endpoint (HTTP 404: {said})\n"
            "start api-server-rest with --features resource (or all), and check --cdh-url",
        )
    if status == 500:
        raise StoreKeyUnavailableError(
            "key_not_released",
            f"the CDH could not obtain {resource} from the KBS (HTTP 500: {said})\n"
            "check that the KBS holds this resource and that its resource policy releases "
            "it to this pod's evidence",
        )
    raise StoreKeyUnavailableError(
        "cdh_unexpected_status",
        f"{where} answered HTTP {status} for the store key {resource} ({said})\n"
        "is api-server-rest what listens at --cdh-url?",
    )


def _check_secret(resource: KbsResource, secret: bytes) -> None:
    if len(secret) == KEY_SIZE:
        return
    text = (
        f"the KBS resource {resource} is {len(secret)} bytes; the store key must be exactly "
        f"{KEY_SIZE} raw bytes"
    )
    if _is_base64_of_key(secret):
        text += " (it looks like base64 text: store the decoded bytes)"
    raise StoreKeyUnavailableError("secret_wrong_size", text + "\n" + _KEY_FILE_HINT)


def _is_base64_of_key(secret: bytes) -> bool:
    try:
        return len(base64.b64decode(secret.strip(), validate=True)) == KEY_SIZE
    except (binascii.Error, ValueError):
        return False
