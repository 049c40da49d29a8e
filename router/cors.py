"""CORS as Starlette's middleware does it, its refused preflights answered in the API's JSON."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.types import Receive, Scope, Send

from router.errors import error_response
from shared.errors import EmbedServeError, ErrorType


class JsonCORSMiddleware(CORSMiddleware):
    """Starlette's CORSMiddleware, but a preflight it refuses (an origin, method or header not
    allowed) is answered in the error shape every other refusal has (API.md: every error is
    JSON), not its text/plain "Disallowed CORS origin": same status (400), same words, same
    CORS headers (which tell a browser what is allowed)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Starlette's test for a preflight, which it answers without calling the app. (The
        # type first: a lifespan scope has no headers.)
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        if not (headers is not None and scope["method"] == "OPTIONS"
                and "origin" in headers and "access-control-request-method" in headers):
            await super().__call__(scope, receive, send)
            return
        response = self.preflight_response(request_headers=headers)
        if response.status_code == 400:
            cors = {name: value for name, value in response.headers.items()
                    if name.startswith("access-control-") or name == "vary"}
            refusal = EmbedServeError(ErrorType.BAD_REQUEST, bytes(response.body).decode())
            response = error_response(refusal, cors, path=scope["path"], method="OPTIONS")
        await response(scope, receive, send)
