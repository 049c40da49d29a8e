"""Vertex AI's AIP_PREDICT_ROUTE / AIP_HEALTH_ROUTE: extra routes, never over the API's own."""

from __future__ import annotations

from typing import Any, cast

import pytest

from router.app import endpoints
from router.openapi import _Unserved
from router.routes import AppState
from shared.config import ServerConfig
from shared.errors import ConfigError


def routes(**config: Any) -> dict[tuple[str, str], Any]:
    unserved = cast(Any, _Unserved())
    built = endpoints(AppState(ServerConfig(**config), unserved, unserved, unserved))
    return {(e.method, e.path): e for e in built}


def test_the_platforms_paths_answer_as_vertex_and_health() -> None:
    served = routes(aip_predict_route="/v1/models/m:predict", aip_health_route="/v1/models/m")
    assert served["POST", "/v1/models/m:predict"].handler is served["POST", "/vertex"].handler
    assert served["GET", "/v1/models/m"].handler is served["GET", "/health"].handler
    assert len(routes()) == len(served) - 2
    # Paths that are the same routes already add nothing.
    assert len(routes(aip_predict_route="/vertex", aip_health_route="/ping")) == len(routes())


@pytest.mark.parametrize("health", ["/health", "/ping", "/"])
def test_a_health_route_the_api_has_adds_no_second_route(health: str) -> None:
    # (a second GET /ping would describe it in /openapi.json as Vertex's route, not TEI's)
    unserved = cast(Any, _Unserved())
    built = endpoints(AppState(ServerConfig(aip_health_route=health), unserved, unserved,
                               unserved))
    assert len(built) == len(routes())


@pytest.mark.parametrize(("setting", "path"), [
    ("aip_predict_route", "/embed"), ("aip_predict_route", "/"),
    ("aip_predict_route", "/docs"), ("aip_health_route", "/info"),
    ("aip_health_route", "/openapi.json"), ("aip_health_route", "/metrics"),
])
def test_a_path_of_the_api_is_refused(setting: str, path: str) -> None:
    with pytest.raises(ConfigError, match=f"{setting.upper()}={path} is a route of the API"):
        routes(**{setting: path})


@pytest.mark.parametrize("predict", ["/p", None])
def test_the_health_route_is_not_the_prediction_route(predict: str | None) -> None:
    # The health route answers without the API key: it must not be where predictions go.
    with pytest.raises(ConfigError, match="is the prediction route"):
        routes(aip_predict_route=predict, aip_health_route=predict or "/vertex")


def test_the_platforms_health_path_is_answered_over_the_openai_model_route() -> None:
    # TF Serving's paths, which Vertex's examples use: /v1/models/m would otherwise be the
    # openai route /v1/models/{model} (a 404 for another id), failing the platform's probe.
    from starlette.testclient import TestClient

    from router.app import build_app
    unserved = cast(Any, _Unserved())
    config = ServerConfig(aip_predict_route="/v1/models/m:predict",
                          aip_health_route="/v1/models/m")
    client = TestClient(build_app(AppState(config, unserved, unserved, unserved)))
    health = client.get("/health")
    probe = client.get("/v1/models/m")
    assert (probe.status_code, probe.content) == (health.status_code, health.content)


def test_a_tf_serving_verb_path_keeps_teis_error_shape() -> None:
    # POST /v1/models/m:predict is Vertex's prediction route there, not an OpenAI model's
    # path; GET of any id (":" included) is the OpenAI model route's.
    from router.errors import openai_shaped

    assert openai_shaped("/v1/models/some-org/model", "GET") and openai_shaped("/models/m", "GET")
    assert openai_shaped("/v1/models/a:b", "GET")
    assert not openai_shaped("/v1/models/m:predict", "POST")
