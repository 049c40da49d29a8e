"""The served API description: the document equals the stored review copy, and Swagger UI is
served from local files only."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urljoin

STORED = Path(__file__).parents[1] / "openapi" / "openapi.json"
REGENERATE = ".venv/bin/python -m router.openapi > tests/openapi/openapi.json"


def test_served_document_equals_the_stored_copy(server):
    response = server.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == json.loads(STORED.read_text()), (
        f"the API changed: review it, then regenerate the stored copy with `{REGENERATE}`")


def test_tei_path_serves_the_same_document(server):
    assert (server.client.get("/api-doc/openapi.json").content
            == server.client.get("/openapi.json").content)


def test_swagger_ui_references_only_local_files(server):
    page = server.client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    base = f"{server.url}/docs"
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert any(link.endswith(".js") for link in links)
    for link in links:
        assert not re.match(r"^([a-z]+:)?//", link), f"{link} is not local"
        url = urljoin(base, link)
        assert url.startswith(f"{server.url}/docs/static/"), url
        asset = server.client.get(url)
        assert asset.status_code == 200 and asset.content, url
    assert re.search(r'url:\s*"openapi\.json"', page.text)
    assert urljoin(base, "openapi.json") == f"{server.url}/openapi.json"
