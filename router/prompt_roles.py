"""Which of the model's prompts a Cohere `input_type` or a Jina `task` names.

A prompt named exactly as the input type or task is taken first. Otherwise the query role takes
the "query" prompt; the document role the first of "document", "passage", "corpus" the model has
(the candidates sentence-transformers' encode_document names; 6.3's own finds the empty
"document" placeholder it adds on load first, so it gives an e5-style model with only "passage"
no prompt). Other roles take the prompt of their own name. Where the model has no such prompt
the request has none of its own, and the default prompt, if any, applies, as for a request
without `prompt_name`.
"""

from __future__ import annotations

from shared.errors import validation

QUERY = ("query",)
DOCUMENT = ("document", "passage", "corpus")

COHERE_INPUT_TYPES = {
    "search_query": QUERY,
    "search_document": DOCUMENT,
    "classification": ("classification",),
    "clustering": ("clustering",),
}
# Jina's embeddings API (v3 and v4 models); jina-embeddings-v3's own prompts carry these names.
JINA_TASKS = {
    "retrieval.query": QUERY,
    "retrieval.passage": DOCUMENT,
    "code.query": QUERY,
    "code.passage": DOCUMENT,
    "text-matching": ("text-matching",),
    "classification": ("classification",),
    "separation": ("separation",),
}


def first_prompt(candidates: tuple[str, ...], prompts: dict[str, str]) -> str | None:
    return next((name for name in candidates if name in prompts), None)


def cohere_prompt(input_type: str | None, prompts: dict[str, str]) -> str | None:
    """A prompt named as the input type first (a model may name its prompts so), else the
    type's role's."""
    if input_type is None:
        return None
    if input_type == "image":
        raise validation("`input_type` image is not supported: this is a text model")
    if input_type not in COHERE_INPUT_TYPES:
        raise validation(f"`input_type` must be one of {', '.join(COHERE_INPUT_TYPES)}, "
                         f"not {input_type!r}")
    return first_prompt((input_type, *COHERE_INPUT_TYPES[input_type]), prompts)


def jina_prompt(task: str | None, prompts: dict[str, str]) -> str | None:
    """A prompt named as the task first (jina-embeddings-v3's), else the task's role's."""
    if task is None:
        return None
    if task in prompts:
        return task
    if task not in JINA_TASKS:
        raise validation(f"`task` must be one of {', '.join(JINA_TASKS)} or a prompt name of "
                         f"the model, not {task!r}")
    return first_prompt(JINA_TASKS[task], prompts)
