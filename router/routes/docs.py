"""The API description: /openapi.json (and TEI's /api-doc/openapi.json) and Swagger UI at /docs.

Swagger UI's files come from the installed swagger-ui-py package and are served under
/docs/static/, so the page works offline and behind firewalls (no CDN). These routes are not
`Endpoint`s: they describe the API and are not part of it, so the document leaves them out.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from router import openapi
from router.routes import Endpoint

STATIC_PATH = "/docs/static"

# NOTE: relative URLs, so the page also works behind a proxy that serves us under a prefix.
SWAGGER_UI_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>embedserve API</title>
  <link rel="stylesheet" href="docs/static/swagger-ui.css">
  <link rel="icon" type="image/png" href="docs/static/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/static/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({url: "openapi.json", dom_id: "#swagger-ui"});
  </script>
</body>
</html>
"""


def swagger_ui_dir() -> Path:
    # find_spec, not import: the package's __init__ loads its web-framework adapters.
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the swagger-ui-py package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def app_routes(endpoints: Sequence[Endpoint]) -> list[BaseRoute]:
    """The routes of `endpoints`, plus the API description generated from them."""
    body = openapi.render(openapi.document(endpoints)).encode()

    async def openapi_json(request: Request) -> Response:
        return Response(body, media_type="application/json")

    async def swagger_ui(request: Request) -> Response:
        return HTMLResponse(SWAGGER_UI_PAGE)

    return [
        *(endpoint.route() for endpoint in endpoints),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/api-doc/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", swagger_ui, methods=["GET"]),
        Mount(STATIC_PATH, app=StaticFiles(directory=swagger_ui_dir())),
    ]
