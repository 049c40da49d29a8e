"""`POST /` and `/invocations`: the route Hugging Face Inference Endpoints and SageMaker call
for every task, answered by the route that fits the served model."""

from __future__ import annotations

from router.routes import AppState, Endpoint

SENTENCE_SIMILARITY = "sentence-similarity"


def target_path(state: AppState) -> str:
    """classifier -> /predict, re-ranker -> /rerank, SPLADE -> /embed_sparse, else /embed
    (or /similarity when TASK=sentence-similarity)."""
    model = state.model
    if model.kind == "classifier":
        return "/predict"
    if model.kind == "reranker":
        return "/rerank"
    if model.pooling == "splade":
        return "/embed_sparse"
    return "/similarity" if state.config.task == SENTENCE_SIMILARITY else "/embed"


def routes(state: AppState, served: list[Endpoint]) -> list[Endpoint]:
    path = target_path(state)
    [target] = [e for e in served if e.method == "POST" and e.path == path]
    return [
        Endpoint("POST", root, target.handler, f"{what}: answered as POST {path}",
                 target.request, target.response, target.errors, target.tag, target.inference)
        for root, what in (("/", "Hugging Face Inference Endpoints"),
                           ("/invocations", "SageMaker"))
    ]
