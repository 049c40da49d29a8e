"""Cohere's Python SDK, unchanged, against /v1/embed (cohere.Client) and /v2/embed
(cohere.ClientV2, which langchain-cohere's CohereEmbeddings wraps), and Jina's bit-packed types
and `task` on /v1/embeddings: the vectors are /embed's with the prompt of the role asked for,
the packed types quantize_embeddings'."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import cohere
import numpy as np
import pytest
from cohere.errors import BadRequestError, UnprocessableEntityError

from tests.e2e.server import Server, serving
from tests.e2e.test_cohere_client import error
from tests.fixtures.tiny import make_tiny_bert

TEXTS = ["the cat sat on the mat", "paris is the capital of france", "hi"]
# "code.query" is named as Jina's task: that prompt, not the query role's, answers it.
PROMPTS = {"query": "query: ", "passage": "passage: ", "clustering": "topic: ",
           "code.query": "code: "}
LONG = "the capital of france is paris " * 40  # past the 128-token limit


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = make_tiny_bert(tmp_path_factory.mktemp("cohere-embed") / "model", prompts=PROMPTS,
                          seed=4)
    # sentence-transformers 6 saves an empty "document" prompt beside the others: without it,
    # encode_document takes "passage", the case the test wants.
    config = json.loads((root / "config_sentence_transformers.json").read_text())
    assert config["prompts"].pop("document") == ""
    (root / "config_sentence_transformers.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def srv(model_dir, tmp_path_factory) -> Iterator[Server]:
    with serving("--model-id", str(model_dir), "--max-batch-tokens", "512",
                 log_path=tmp_path_factory.mktemp("cohere-embed-log") / "log") as server:
        yield server


def tei(srv: Server, texts: list[str], **fields) -> np.ndarray:
    response = srv.client.post("/embed", json={"inputs": texts, **fields})
    assert response.status_code == 200, response.text
    return np.asarray(response.json(), dtype=np.float32)


def quantized(vectors: np.ndarray, precision: str) -> np.ndarray:
    from sentence_transformers.util.quantization import quantize_embeddings

    return quantize_embeddings(vectors, precision=precision)


def test_v2_embed_every_type_from_the_same_vectors(srv) -> None:
    client = cohere.ClientV2(api_key="unused", base_url=srv.url)
    reply = client.embed(model="embed-v4.0", texts=TEXTS, input_type="search_query",
                         embedding_types=["float", "binary", "ubinary", "base64"])
    assert isinstance(reply, cohere.EmbedByTypeResponse)
    expected = tei(srv, TEXTS, prompt_name="query")
    floats = np.asarray(reply.embeddings.float_, dtype=np.float32)
    assert np.array_equal(floats, expected)  # the same float32 numbers
    assert expected.shape[1] % 8 == 0
    assert np.array_equal(np.asarray(reply.embeddings.binary, dtype=np.int8),
                          quantized(expected, "binary"))
    assert np.array_equal(np.asarray(reply.embeddings.ubinary, dtype=np.uint8),
                          quantized(expected, "ubinary"))
    decoded = [np.frombuffer(base64.b64decode(b), dtype="<f4") for b in reply.embeddings.base64]
    assert np.array_equal(np.stack(decoded), expected)
    assert reply.embeddings.int8 is None and reply.texts == TEXTS
    assert reply.meta.api_version.version == "2"
    assert reply.meta.billed_units.input_tokens == sum(
        len(t) for t in srv.client.post("/tokenize", json={"inputs": [f"query: {t}" for t in
                                                                       TEXTS]}).json())
    # Without embedding_types: floats.
    plain = client.embed(model="any", texts=TEXTS, input_type="search_query")
    assert np.array_equal(np.asarray(plain.embeddings.float_, dtype=np.float32), expected)


def test_input_types_pick_the_models_prompts(srv, model_dir) -> None:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    client = cohere.ClientV2(api_key="unused", base_url=srv.url)

    def ours(input_type: str) -> np.ndarray:
        reply = client.embed(model="any", texts=TEXTS, input_type=input_type,
                             embedding_types=["float"])
        return np.asarray(reply.embeddings.float_, dtype=np.float32)

    assert np.abs(ours("search_query") - model.encode_query(TEXTS)).max() <= 1e-5
    # No "document" prompt: "passage", the next of encode_document's candidates (6.3's own
    # encode_document finds the empty "document" placeholder it adds on load instead).
    assert np.abs(ours("search_document") - model.encode(TEXTS, prompt_name="passage")).max(
    ) <= 1e-5
    assert np.array_equal(ours("clustering"), tei(srv, TEXTS, prompt_name="clustering"))
    # No "classification" prompt: no prompt, as a request without prompt_name.
    assert np.array_equal(ours("classification"), tei(srv, TEXTS))


def test_v1_embed_answers_floats_unless_types_are_asked_for(srv) -> None:
    client = cohere.Client(api_key="unused", base_url=srv.url)
    expected = tei(srv, TEXTS, prompt_name="passage")
    reply = client.embed(texts=TEXTS, model="embed-english-v3.0", input_type="search_document")
    assert isinstance(reply, cohere.EmbeddingsFloatsEmbedResponse)
    assert np.array_equal(np.asarray(reply.embeddings, dtype=np.float32), expected)
    assert reply.meta.api_version.version == "1" and len(reply.id) == 32
    typed = client.embed(texts=TEXTS, input_type="search_document", embedding_types=["ubinary"])
    assert isinstance(typed, cohere.EmbeddingsByTypeEmbedResponse)
    assert np.array_equal(np.asarray(typed.embeddings.ubinary, dtype=np.uint8),
                          quantized(expected, "ubinary"))
    assert typed.embeddings.float_ is None


def test_truncate_and_output_dimension(srv) -> None:
    client = cohere.ClientV2(api_key="unused", base_url=srv.url)

    def floats(**options) -> np.ndarray:
        reply = client.embed(model="any", texts=[LONG, TEXTS[0]], input_type="clustering",
                             **options)
        return np.asarray(reply.embeddings.float_, dtype=np.float32)

    both = [LONG, TEXTS[0]]
    assert np.array_equal(floats(), tei(srv, both, prompt_name="clustering"))
    assert np.array_equal(floats(truncate="END"), tei(srv, both, prompt_name="clustering"))
    start = floats(truncate="START")
    assert np.array_equal(start, tei(srv, both, prompt_name="clustering",
                                     truncation_direction="Left"))
    assert not np.array_equal(start[0], floats()[0])
    with pytest.raises(UnprocessableEntityError) as refused:
        floats(truncate="NONE")
    assert "must have less than 128 tokens" in error(refused.value)
    # Matryoshka: cut, then normalized again; 20 dimensions pack into 3 bytes, the last
    # padded with zero bits.
    reply = client.embed(model="any", texts=TEXTS, input_type="clustering", output_dimension=20,
                         embedding_types=["float", "ubinary"])
    expected = tei(srv, TEXTS, prompt_name="clustering", dimensions=20)
    assert np.array_equal(np.asarray(reply.embeddings.float_, dtype=np.float32), expected)
    packed = np.asarray(reply.embeddings.ubinary, dtype=np.uint8)
    assert packed.shape == (3, 3)
    assert np.array_equal(np.unpackbits(packed, axis=1)[:, :20], (expected > 0).astype(np.uint8))
    assert not np.unpackbits(packed, axis=1)[:, 20:].any()


def test_max_tokens_cuts_each_text_on_the_side_truncate_names(srv) -> None:
    client = cohere.ClientV2(api_key="unused", base_url=srv.url)
    texts = [LONG, TEXTS[1], TEXTS[2]]
    tokens = [srv.client.post("/tokenize", json={"inputs": text, "add_special_tokens": False})
              .json()[0] for text in texts]
    count = 5
    assert len(tokens[1]) > count >= len(tokens[2])  # "hi" is kept whole

    def floats(**options) -> tuple[np.ndarray, cohere.EmbedByTypeResponse]:
        reply = client.embed(model="any", texts=texts, input_type="clustering",
                             max_tokens=count, **options)
        assert reply.texts == texts  # the texts as sent
        return np.asarray(reply.embeddings.float_, dtype=np.float32), reply

    # END (Cohere's default): up to the end of each text's 5th token (ASCII: bytes are chars).
    heads = [text[:toks[count - 1]["stop"]] if len(toks) > count else text
             for text, toks in zip(texts, tokens, strict=True)]
    end, reply = floats()
    assert np.array_equal(end, tei(srv, heads, prompt_name="clustering"))
    assert np.array_equal(floats(truncate="END")[0], end)
    assert reply.meta.billed_units.input_tokens == sum(len(t) for t in srv.client.post(
        "/tokenize", json={"inputs": [f"topic: {h}" for h in heads]}).json())
    # START: from the first whole word of each text's last 5 tokens.
    def first_kept(toks: list[dict]) -> int:
        return next(t["start"] for t in toks[-count:] if not t["text"].startswith("##"))

    tails = [text[first_kept(toks):] if len(toks) > count else text
             for text, toks in zip(texts, tokens, strict=True)]
    assert np.array_equal(floats(truncate="START")[0],
                          tei(srv, tails, prompt_name="clustering"))
    # NONE: a text over max_tokens is refused, naming it; texts within it are embedded whole.
    with pytest.raises(UnprocessableEntityError) as refused:
        floats(truncate="NONE")
    assert error(refused.value) == ("`texts[0]` has more than `max_tokens` (5) tokens, and "
                                    "`truncate` is NONE")
    inputs = [{"content": [{"type": "text", "text": text}]} for text in texts]
    response = srv.client.post("/v2/embed", json={"inputs": inputs, "max_tokens": count,
                                                  "truncate": "NONE"})
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith("`inputs[0].content[0].text` has more than")
    whole = client.embed(model="any", texts=[TEXTS[2]], max_tokens=count,
                         truncate="NONE", input_type="classification")
    assert np.array_equal(np.asarray(whole.embeddings.float_, dtype=np.float32),
                          tei(srv, [TEXTS[2]]))
    # At or past the model's limit (128), the limit cuts, on `truncate`'s side.
    past = client.embed(model="any", texts=[LONG], max_tokens=4096,
                        truncate="START", input_type="classification")
    assert np.array_equal(np.asarray(past.embeddings.float_, dtype=np.float32),
                          tei(srv, [LONG], truncation_direction="Left"))


@pytest.mark.parametrize(("fields", "message"), [
    ({"embedding_types": ["int8"]}, "`embedding_types` int8 not supported"),
    ({"input_type": "image"}, "`input_type` image is not supported"),
    ({"input_type": "search"}, "`input_type` must be one of"),
    ({"images": ["data:image/png;base64,AAAA"]}, "`images` are not supported"),
    ({"max_tokens": 0}, "`max_tokens` must be positive"),
    ({"priority": 3}, "`priority` is not supported"),
    # (the service's refusals in Cohere's names: not /embed's `dimensions`)
    ({"output_dimension": 0}, "Input validation error: `output_dimension` should be positive"),
    ({"output_dimension": 10_000}, "`output_dimension` should be smaller than the maximum"),
    ({"inputs": [{"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
     "`inputs[0]` must hold one text part"),
])
def test_what_is_refused_says_why(srv, fields: dict, message: str) -> None:
    body = {"texts": TEXTS, **fields}
    if "inputs" in fields:
        del body["texts"]
    response = srv.client.post("/v2/embed", json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize(("version", "fields", "message"), [
    ("v1", {"output_dimension": 16}, "`output_dimension` is a field of Cohere's v2"),
    ("v1", {"max_tokens": 8}, "`max_tokens` is a field of Cohere's v2"),
    ("v1", {"priority": 0}, "`priority` is a field of Cohere's v2"),
    ("v1", {"inputs": [{"content": [{"type": "text", "text": "a"}]}]},
     "`inputs` is a field of Cohere's v2"),
    ("v1", {"embedding_types": []}, "`embedding_types` cannot be empty"),
    ("v2", {"embedding_types": []}, "`embedding_types` cannot be empty"),
])
def test_fields_cohere_does_not_take_there_are_named(srv, version: str, fields: dict,
                                                     message: str) -> None:
    body = {"texts": TEXTS, **fields}
    if "inputs" in fields:
        del body["texts"]
    response = srv.client.post(f"/{version}/embed", json=body)
    assert response.status_code == 422, response.text
    assert message in response.json()["error"]


def test_inputs_of_one_text_part_and_empty_requests(srv) -> None:
    inputs = [{"content": [{"type": "text", "text": text}]} for text in TEXTS]
    response = srv.client.post("/v2/embed", json={"inputs": inputs})
    assert response.status_code == 200, response.text
    assert np.array_equal(np.asarray(response.json()["embeddings"]["float"], dtype=np.float32),
                          tei(srv, TEXTS))
    assert response.json()["texts"] == TEXTS  # the texts embedded, as for `texts`
    # Both, or a part that says it is an image but carries a text too: refused, not guessed at.
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"},
             "text": "a"}
    for body in ({"texts": TEXTS, "inputs": inputs}, {"inputs": [{"content": [image]}]}):
        refused = srv.client.post("/v2/embed", json=body)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error_type"] == "Validation"
    for body, field in (({"texts": []}, "texts"), ({}, "texts"), ({"inputs": []}, "inputs")):
        empty = srv.client.post("/v2/embed", json=body)
        assert empty.status_code == 400, empty.text
        assert empty.json()["error_type"] == "Empty"
        assert empty.json()["error"] == f"`{field}` cannot be empty"  # the field sent
    with pytest.raises(BadRequestError):
        cohere.ClientV2(api_key="unused", base_url=srv.url).embed(
            model="any", texts=[], input_type="search_query")


@pytest.mark.parametrize(("version", "body", "field"), [
    ("v1", {"texts": ["a", ""]}, "`texts[1]`"),
    ("v2", {"texts": ["", "a"]}, "`texts[0]`"),
    ("v2", {"inputs": [{"content": [{"type": "text", "text": "a"}]},
                       {"content": [{"type": "text", "text": ""}]}]},
     "`inputs[1].content[0].text`"),
])
def test_an_empty_text_is_named_as_the_client_sent_it(srv, version: str, body: dict,
                                                       field: str) -> None:
    response = srv.client.post(f"/{version}/embed", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error_type"] == "Empty"
    assert response.json()["error"] == f"{field} cannot be empty"


@pytest.mark.parametrize(("body", "field"), [
    ({"texts": [TEXTS[0], LONG]}, "`texts[1]`"),
    ({"inputs": [{"content": [{"type": "text", "text": text}]} for text in (LONG, TEXTS[0])]},
     "`inputs[0].content[0].text`"),
])
def test_a_text_too_long_is_named_as_the_client_sent_it(srv, body: dict, field: str) -> None:
    response = srv.client.post("/v2/embed", json={**body, "truncate": "NONE"})
    assert response.status_code == 422, response.text
    assert response.json()["error"].startswith(
        f"Input validation error: {field} must have less than 128 tokens. Given: ")
    huge = "a" * (128 * 250 + 1)  # TEI's bound on characters, before the tokenizer
    texts = [TEXTS[0], huge]
    response = srv.client.post("/v2/embed", json={"texts": texts, "truncate": "NONE"})
    assert response.json()["error"] == ("Input validation error: `texts[1]` must have less "
                                        f"than {128 * 250} characters. Given: {len(huge)}")


@pytest.mark.parametrize(("sent", "field"), [
    ("", "`input`"), ([], "`input`"), (["a", ""], "`input[1]`"), ([[1, 2], []], "`input[1]`")])
def test_openai_refusals_name_openai_fields(srv, sent, field: str) -> None:
    response = srv.client.post("/v1/embeddings", json={"input": sent})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == (
        f"Input validation error: {field} cannot be empty")
    # ... and TEI's own route keeps TEI's words, which its clients may match on.
    tei_route = srv.client.post("/embed", json={"inputs": sent})
    assert tei_route.json()["error"] == "Input validation error: `inputs` cannot be empty"


@pytest.mark.parametrize(("sent", "message"), [
    ([], "Input validation error: `input` cannot be empty"),
    ([1, "a"], "`input` must be a text, a list of token ids, or a list of texts and token-id")])
def test_openai_refusals_with_a_task_name_openai_fields(srv, sent, message: str) -> None:
    # A task whose prompt applies reads the inputs before the service does: its refusals must
    # still say `input`, the field the client sent.
    response = srv.client.post("/v1/embeddings", json={"input": sent, "task": "retrieval.query"})
    assert response.status_code in (400, 422), response.text
    assert response.json()["error"]["message"].startswith(message)


@pytest.mark.parametrize("kind", ["binary", "ubinary"])
def test_jina_packed_embedding_types(srv, kind: str) -> None:
    response = srv.client.post("/v1/embeddings", json={"input": TEXTS, "embedding_type": kind})
    assert response.status_code == 200, response.text
    rows = [d["embedding"] for d in response.json()["data"]]
    assert np.array_equal(np.asarray(rows), quantized(tei(srv, TEXTS), kind))
    # The openai client (its format in extra_body) sends encoding_format "base64" unless told
    # otherwise: Jina's type still names the format, and the client keeps the packed ints.
    from openai import OpenAI

    client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    reply = client.embeddings.create(model="any", input=TEXTS, extra_body={"embedding_type": kind})
    assert np.array_equal(np.asarray([d.embedding for d in reply.data]), np.asarray(rows))
    refused = srv.client.post("/v1/embeddings", json={"input": TEXTS, "embedding_type": "int8"})
    assert refused.status_code == 422
    assert "`embedding_type` 'int8' is not supported" in refused.json()["error"]["message"]


def test_jina_task_picks_the_models_prompt(srv) -> None:
    def jina(task: str) -> np.ndarray:
        response = srv.client.post("/v1/embeddings", json={"input": TEXTS, "task": task})
        assert response.status_code == 200, response.text
        return np.asarray([d["embedding"] for d in response.json()["data"]], dtype=np.float32)

    assert np.array_equal(jina("retrieval.query"), tei(srv, TEXTS, prompt_name="query"))
    assert np.array_equal(jina("retrieval.passage"), tei(srv, TEXTS, prompt_name="passage"))
    # A prompt named as the task (jina-embeddings-v3's are) is taken as it is.
    assert np.array_equal(jina("clustering"), tei(srv, TEXTS, prompt_name="clustering"))
    assert np.array_equal(jina("separation"), tei(srv, TEXTS))  # no such prompt: none
    # Named as the task beats the role's; without one, code.passage takes the document role's.
    assert np.array_equal(jina("code.query"), tei(srv, TEXTS, prompt_name="code.query"))
    assert np.array_equal(jina("code.passage"), tei(srv, TEXTS, prompt_name="passage"))
    refused = srv.client.post("/v1/embeddings", json={"input": TEXTS, "task": "retrieval"})
    assert refused.status_code == 422
    assert "`task` must be one of" in refused.json()["error"]["message"]
    # A prompt is text: token ids with a task that has one are refused, naming the field sent;
    # a task without a prompt changes nothing, so they are served.
    ids = srv.client.post("/tokenize", json={"inputs": TEXTS[0]}).json()[0]
    tokens = [t["id"] for t in ids]
    mixed = srv.client.post("/v1/embeddings", json={"input": [tokens, TEXTS[1]],
                                                     "task": "retrieval.query"})
    assert mixed.status_code == 422
    assert mixed.json()["error"]["message"].startswith("`task` cannot be used with token-id")
    plain = srv.client.post("/v1/embeddings", json={"input": [tokens], "task": "separation"})
    assert plain.status_code == 200, plain.text


def test_jina_normalized_and_late_chunking(srv) -> None:
    def jina(**fields) -> np.ndarray:
        response = srv.client.post("/v1/embeddings", json={"input": TEXTS, **fields})
        assert response.status_code == 200, response.text
        return np.asarray([d["embedding"] for d in response.json()["data"]], dtype=np.float32)

    assert np.array_equal(jina(normalized=False), tei(srv, TEXTS, normalize=False))
    assert np.array_equal(jina(normalized=True), tei(srv, TEXTS))
    assert np.array_equal(jina(late_chunking=False), tei(srv, TEXTS))
    # Each input embedded on its own would be other vectors than late chunking's: refused.
    refused = srv.client.post("/v1/embeddings", json={"input": TEXTS, "late_chunking": True})
    assert refused.status_code == 422
    assert refused.json()["error"]["message"].startswith("`late_chunking` is not supported")


def test_max_tokens_from_the_start_keeps_the_end_of_a_very_long_text(srv) -> None:
    # Past 250 characters a token, the text is bounded before tokenizing: on START's side.
    text = "hi " * 100 + "z"
    assert len(srv.client.post("/tokenize", json={"inputs": "z",
                                                  "add_special_tokens": False}).json()[0]) == 1
    response = srv.client.post("/v2/embed", json={"texts": [text], "max_tokens": 1,
                                                  "truncate": "START"})
    assert response.status_code == 200, response.text
    assert np.array_equal(np.asarray(response.json()["embeddings"]["float"], dtype=np.float32),
                          tei(srv, ["z"]))
