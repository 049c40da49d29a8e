"""Request and response bodies: msgspec Structs, one per shape of the HTTP API (README, The API)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

TruncationDirection = Literal["Left", "left", "Right", "right"]

# A client input: text, or token ids; `inputs` is one of them or a list mixing both.
Input = str | list[int]


class EmbedRequest(msgspec.Struct, kw_only=True):
    inputs: str | list[str | int | list[int]]
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "Right"
    prompt_name: str | None = None
    normalize: bool = True
    dimensions: int | None = None


class EmbeddingModelType(msgspec.Struct):
    pooling: str


class ClassifierModelType(msgspec.Struct):
    id2label: dict[str, str]
    label2id: dict[str, int]


class ModelType(msgspec.Struct, omit_defaults=True):
    """Exactly one field is set: what kind of model is served."""

    embedding: EmbeddingModelType | None = None
    classifier: ClassifierModelType | None = None
    reranker: ClassifierModelType | None = None


class WorkerInfo(msgspec.Struct):
    id: str
    device: str | None
    pid: int | None
    state: str
    batches: int
    restarts: int


class Info(msgspec.Struct):
    model_id: str
    model_sha: str | None
    model_dtype: str
    served_model_name: str
    model_type: ModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None
    docker_label: str | None
    # new: facts TEI's /info leaves out
    embedding_dimension: int | None  # (null for classifiers and re-rankers: nothing to embed)
    normalize_module: bool
    dense_modules: list[str]
    prompts: dict[str, str]
    default_prompt: str | None
    # What /embed_sparse gives: "splade", "splade_inference_free" (a query and a document
    # route), "csr" (a SparseAutoEncoder's code of the pooled embedding), "lexical_weights"
    # (BGE-M3's, beside dense vectors); null: it is refused.
    sparse_vectors: str | None
    workers: list[WorkerInfo]


class SimilarityInputs(msgspec.Struct):
    source_sentence: str
    sentences: list[str]


class SimilarityParameters(msgspec.Struct, kw_only=True):
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "Right"
    prompt_name: str | None = None


class SimilarityRequest(msgspec.Struct, kw_only=True):
    inputs: SimilarityInputs
    # TEI reads a null `parameters` as the defaults.
    parameters: SimilarityParameters | None = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    inputs: str | list[str]
    add_special_tokens: bool = True
    prompt_name: str | None = None


class DecodeRequest(msgspec.Struct, kw_only=True):
    ids: list[int | list[int]]
    skip_special_tokens: bool = True


class TokenInfo(msgspec.Struct):
    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class OpenAIEmbedRequest(msgspec.Struct, kw_only=True):
    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = "float"  # null: float
    dimensions: int | None = None
    user: str | None = None
    # Jina's embeddings API spells the format these ways, and offers bit-packed signs
    # ("binary", "ubinary") beside "float" and "base64" (router/embedding_types.py).
    encoding_type: str | None = None
    embedding_type: str | None = None
    # Jina's: the prompt of the task's role (router/prompt_roles.py).
    task: str | None = None
    # Jina's: false answers the vectors unnormalized (default true, as OpenAI's are).
    normalized: bool | None = None
    # Jina's: true embeds the inputs as one text and pools each input's tokens of it; each
    # input is embedded on its own here, so true is refused rather than ignored.
    late_chunking: bool | None = None


class OpenAIEmbedding(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    # A float32 numpy row at run time, written as a JSON array (routes.json_response).
    embedding: list[float] | str
    index: int


class OpenAIUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class OpenAIEmbedResponse(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIModel(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "embedserve"


class OpenAIModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[OpenAIModel]


class EmbedAllRequest(msgspec.Struct, kw_only=True):
    inputs: str | list[str | int | list[int]]
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "Right"
    prompt_name: str | None = None


class SparseValue(msgspec.Struct):
    index: int
    value: float


class PredictRequest(msgspec.Struct, kw_only=True):
    # "a" or ["a"]: one text; ["a", "b"]: one pair; [["a"], ["b", "c"]]: a batch of both.
    inputs: str | list[str | list[str]]
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "Right"
    raw_scores: bool = False


class Prediction(msgspec.Struct):
    score: float
    label: str


# /predict's answer, as documented: one input's predictions, or a batch's list of those (TEI's
# untagged PredictResponse). msgspec allows one array type in a union, so the items are either.
PredictResponse = list[Prediction | list[Prediction]]


class RerankRequest(msgspec.Struct, kw_only=True):
    query: str
    texts: list[str]
    truncate: bool | None = None
    truncation_direction: TruncationDirection = "Right"
    raw_scores: bool = False
    return_text: bool = False


class Rank(msgspec.Struct, omit_defaults=True):
    index: int
    score: float
    text: str | None = None


class CohereRerankRequest(msgspec.Struct, kw_only=True):
    query: str
    # Strings, or (Cohere v1, Jina) objects with a string `text`: ranked on `text`, and returned
    # whole, other fields included, with `return_documents`, as Cohere returns them.
    documents: list[str | dict[str, Any]]
    top_n: int | None = None
    # null, as Cohere's SDK sends an option passed as None, is the default: false.
    return_documents: bool | None = None
    model: str | None = None
    # Cohere's: each document is cut to its first this many tokens before it is scored (their
    # default, 4096, is past most re-rankers' own limit, where --auto-truncate, on by default,
    # truncates the pair anyway; with it off, a pair still over the limit is refused).
    max_tokens_per_doc: int | None = None
    # Cohere v1's: a document too long to fit beside the query is scored in up to this many
    # consecutive pieces, and ranked on its best piece's score. Their default, as ours, is 1:
    # the document's start alone (truncated, with --auto-truncate).
    max_chunks_per_doc: int | None = None
    # Cohere v1's fields of dict documents to rank on. Only `text` is read, so asking for any
    # other is refused instead of being ranked on something the client did not ask for.
    rank_fields: list[str] | None = None


class CohereResult(msgspec.Struct, omit_defaults=True):
    index: int
    relevance_score: float
    document: dict[str, Any] | None = None  # {"text": ...}, or the object as it was sent


class CohereUsage(msgspec.Struct):
    total_tokens: int


class CohereContent(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None
    image_url: dict[str, Any] | None = None


class CohereEmbedInput(msgspec.Struct, kw_only=True):
    content: list[CohereContent]


CohereEmbeddingType = Literal["float", "int8", "uint8", "binary", "ubinary", "base64"]


class CohereEmbedRequest(msgspec.Struct, kw_only=True):
    """Cohere's embed request, v1 and v2 (router/routes/cohere_embed.py says what is done with
    each field)."""

    texts: list[str] | None = None
    inputs: list[CohereEmbedInput] | None = None  # v2: each input one text part
    images: list[str] | None = None
    model: str | None = None
    input_type: str | None = None
    embedding_types: list[CohereEmbeddingType] | None = None
    truncate: Literal["NONE", "START", "END"] | None = None
    output_dimension: int | None = None
    max_tokens: int | None = None
    priority: int | None = None


class CohereEmbeddingsByType(msgspec.Struct, omit_defaults=True):
    # float32 numpy arrays at run time, written as JSON arrays (routes.json_response).
    floats: list[list[float]] | None = msgspec.field(default=None, name="float")
    binary: list[list[int]] | None = None  # each 8 dimensions' signs as one int8 (bit - 128)
    ubinary: list[list[int]] | None = None  # each 8 dimensions' signs as one uint8
    base64: list[str] | None = None  # little-endian float32 bytes


class CohereApiVersion(msgspec.Struct):
    version: str


class CohereBilledUnits(msgspec.Struct):
    input_tokens: int


class CohereMeta(msgspec.Struct):
    api_version: CohereApiVersion
    billed_units: CohereBilledUnits


class CohereRerankResponse(msgspec.Struct):
    id: str  # the request's x-request-id (Cohere answers an id; their SDK reads it if present)
    results: list[CohereResult]
    model: str
    usage: CohereUsage  # Jina's
    meta: CohereMeta  # Cohere's: billed_units counts the tokens, not Cohere's "search units"


# Cohere's two answers, told apart by their `response_type`.
class CohereEmbedByTypeResponse(msgspec.Struct, kw_only=True, tag_field="response_type",
                                tag="embeddings_by_type"):
    id: str  # the request's x-request-id
    embeddings: CohereEmbeddingsByType
    texts: list[str]
    meta: CohereMeta


class CohereEmbedFloatsResponse(msgspec.Struct, kw_only=True, tag_field="response_type",
                                tag="embeddings_floats"):
    """Cohere v1's answer when no `embedding_types` were asked for."""

    id: str
    embeddings: list[list[float]]  # a float32 numpy array at run time
    texts: list[str]
    meta: CohereMeta
