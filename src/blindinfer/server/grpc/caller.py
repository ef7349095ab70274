"""Who calls: the API key from gRPC metadata, checked as REST checks `Authorization`.

gRPC metadata keys are lower-case; the value is REST's header value,
`authorization: Bearer bik_...` (tritonclient: `headers={"authorization": ...}`). A call
that sends the key twice is refused rather than resolved one way or the other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from blindinfer.server.auth import Principal, UnauthorizedError
from blindinfer.server.state import ServerState

AUTHORIZATION_KEY: Final = "authorization"
SURFACE: Final = "grpc"
"""The API named in audit entries of failed authentications."""


def authorization(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The one `authorization` value in `metadata` (None if absent)."""
    found: str | None = None
    for key, value in metadata or ():
        if key.lower() != AUTHORIZATION_KEY:
            continue
        if found is not None or not isinstance(value, str):
            raise UnauthorizedError("send the API key once, in one 'authorization' entry")
        found = value
    return found


def principal(state: ServerState, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
    """The caller's principal under the same keys, audit and request rate as REST."""
    return state.principal_for(authorization(metadata), SURFACE)
