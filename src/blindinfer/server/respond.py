"""Small helpers every route uses: JSON responses and the shared server state."""

from __future__ import annotations

import json

from starlette.requests import Request
from starlette.responses import Response

from blindinfer.server.state import ServerState


def json_response(document: object, status: int = 200) -> Response:
    return Response(
        json.dumps(document, separators=(",", ":")), status, media_type="application/json"
    )


def server_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.blindinfer
    return state
