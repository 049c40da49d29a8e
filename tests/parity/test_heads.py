"""Heads parity: classifier / re-ranker logits against transformers, SPLADE sparse vectors
against a transformers MaskedLM reference and sentence-transformers' SparseEncoder, and strict
loading of head keys. Tiny random checkpoints, fp32 on CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backend_worker.engine import Engine
from backend_worker.head_modules import ClassifierHead, SpladeHead
from backend_worker.heads import build_head, run_head
from backend_worker.main import outputs
from shared import protocol
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.heads import LABELS, make_tiny_classifier, make_tiny_mlm
from tests.fixtures.oracles import densify, mlm_reference, padded_inputs
from tests.fixtures.tiny import MIXED_TEXTS, pack, save_bert_weights, write_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = MIXED_TEXTS
LOGIT_TOL = 1e-4
SPARSE_TOL = 1e-4


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory) -> Path:
    return make_tiny_classifier(tmp_path_factory.mktemp("heads") / "classifier", LABELS)


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory) -> Path:
    return make_tiny_classifier(tmp_path_factory.mktemp("heads") / "reranker", ["score"], seed=1)


def serve(model_dir: Path, pooling: str | None = None):
    info = load_model_info(model_dir, pooling_override=pooling)
    engine = Engine.load(info)
    return info, engine, build_head(info, engine.device)


@pytest.mark.parametrize("which", ["classifier", "reranker"])
def test_logits_match_transformers(request, which: str) -> None:
    from transformers import AutoModelForSequenceClassification

    model_dir = request.getfixturevalue(f"{which}_dir")
    info, engine, head = serve(model_dir)
    assert isinstance(head, ClassifierHead)
    assert info.kind == which
    arrays, _ = pack(model_dir, TEXTS)
    assert arrays.token_type_ids.max() == 1, "pairs must exercise token type 1"
    rows, dim, logits = run_head(engine, head)(arrays)
    labels = len(LABELS) if which == "classifier" else 1
    assert (rows, dim, logits.dtype) == (len(TEXTS), labels, np.float32)

    hf = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    with torch.no_grad():
        expected = hf(**padded_inputs(arrays)).logits.numpy()
    diff = float(np.abs(logits - expected).max())
    assert diff <= LOGIT_TOL, diff
    # One at a time gives the same scores as the ragged batch.
    single, _ = pack(model_dir, TEXTS[2:3])
    assert np.abs(run_head(engine, head)(single)[2][0] - expected[2]).max() <= LOGIT_TOL


def test_output_kinds_per_model(classifier_dir: Path, tmp_path: Path) -> None:
    kinds = protocol.OutputKind
    _info, engine, head = serve(classifier_dir)
    assert set(outputs(engine, head)) == {kinds.LOGITS, kinds.ALL_TOKENS}
    assert set(outputs(engine)) == {kinds.POOLED, kinds.ALL_TOKENS}
    mlm = make_tiny_mlm(tmp_path / "mlm")
    _, engine, head = serve(mlm, "splade")
    assert set(outputs(engine, head)) == {kinds.SPARSE, kinds.ALL_TOKENS}
    # A plain embedding model builds no head; its MLM keys stay ignored.
    assert serve(mlm, "mean")[2] is None


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [None, 7])
def test_splade_matches_masked_lm_reference(tmp_path: Path, tied: bool, chunk: int | None) -> None:
    model_dir = make_tiny_mlm(tmp_path / "mlm", tied=tied, seed=2)
    keys = load_file(str(model_dir / "model.safetensors"))
    assert ("cls.predictions.decoder.weight" in keys) is not tied
    _, engine, head = serve(model_dir, "splade")
    assert isinstance(head, SpladeHead)
    if chunk is not None:
        head.chunk = chunk  # several chunks, crossing sequence boundaries
    arrays, _ = pack(model_dir, TEXTS)
    rows, dim, *frames = run_head(engine, head)(arrays)
    assert (rows, dim) == (len(TEXTS), engine.info.vocab_size)
    ours = densify(rows, dim, tuple(frames))
    expected = mlm_reference(model_dir, padded_inputs(arrays))
    diff = float(np.abs(ours - expected).max())
    assert diff <= SPARSE_TOL, diff
    assert np.array_equal(ours > 0, expected > 0) or diff <= SPARSE_TOL
    # The frames are what protocol.sparse_arrays would build from the rows.
    decoded = protocol.result_rows(
        protocol.Result(0, rows, dim, 0.0), [memoryview(f) for f in frames],
        protocol.OutputKind.SPARSE, [])
    for got, want in zip(protocol.sparse_arrays(decoded), frames, strict=True):
        assert np.array_equal(got, want)


def test_splade_matches_sparse_encoder(tmp_path: Path) -> None:
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling

    model_dir = make_tiny_mlm(tmp_path / "mlm", seed=3)
    _, engine, head = serve(model_dir, "splade")
    texts = [t for t in TEXTS if isinstance(t, str)]
    arrays, _ = pack(model_dir, texts)
    rows, dim, *frames = run_head(engine, head)(arrays)
    encoder = SparseEncoder(modules=[MLMTransformer(str(model_dir)),
                                     SpladePooling("max", activation_function="relu")],
                            device="cpu")
    expected = encoder.encode(texts, convert_to_tensor=True).to_dense().numpy()
    diff = float(np.abs(densify(rows, dim, tuple(frames)) - expected).max())
    assert diff <= SPARSE_TOL, diff


def drop_key(model_dir: Path, key: str, extra: dict[str, torch.Tensor] | None = None) -> None:
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    del state[key]
    save_file({**state, **(extra or {})}, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("key", "named"),
    [("classifier.weight", "classifier.weight"),
     ("bert.pooler.dense.weight", "pooler.dense.weight"),
     ("classifier.bias", "classifier.bias")],
)
def test_missing_classifier_key_is_named(tmp_path: Path, key: str, named: str) -> None:
    model_dir = make_tiny_classifier(tmp_path / "c", LABELS)
    drop_key(model_dir, key)
    info = load_model_info(model_dir)
    Engine.load(info)  # the encoder is complete: the head is what fails
    with pytest.raises(ConfigError, match=rf"missing \(.*{named}"):
        build_head(info, torch.device("cpu"))


def test_unexpected_head_key_is_named(tmp_path: Path) -> None:
    model_dir = make_tiny_classifier(tmp_path / "c", LABELS)
    drop_key(model_dir, "classifier.bias", {"classifier.bias": torch.zeros(5),
                                            "classifier.extra.weight": torch.zeros(2)})
    with pytest.raises(ConfigError, match=r"unexpected keys: classifier\.extra\.weight"):
        build_head(load_model_info(model_dir), torch.device("cpu"))


def test_classifier_label_count_is_checked(tmp_path: Path) -> None:
    model_dir = make_tiny_classifier(tmp_path / "c", LABELS)
    drop_key(model_dir, "classifier.bias", {"classifier.bias": torch.zeros(4)})
    with pytest.raises(ConfigError, match=r"shape mismatch for classifier\.bias"):
        build_head(load_model_info(model_dir), torch.device("cpu"))


def test_missing_mlm_key_is_named(tmp_path: Path) -> None:
    model_dir = make_tiny_mlm(tmp_path / "m")
    drop_key(model_dir, "cls.predictions.transform.dense.weight")
    with pytest.raises(ConfigError,
                       match=r"missing \(.*cls\.predictions\.transform\.dense\.weight"):
        build_head(load_model_info(model_dir, "splade"), torch.device("cpu"))


def test_untied_missing_decoder_weight_is_named_not_filled_from_the_embeddings(
        tmp_path: Path) -> None:
    # Untied, the word embeddings are not the decoder: transformers reports the key missing,
    # and so do we.
    model_dir = make_tiny_mlm(tmp_path / "m", tied=False)
    drop_key(model_dir, "cls.predictions.decoder.weight")
    with pytest.raises(ConfigError, match=r"missing \(.*cls\.predictions\.decoder\.weight"):
        build_head(load_model_info(model_dir, "splade"), torch.device("cpu"))


def test_a_config_that_does_not_say_ties_the_decoder(tmp_path: Path) -> None:
    # transformers' tie_word_embeddings is true by default: without the key and without a
    # decoder weight of its own, the decoder is the word embeddings, not a missing key.
    model_dir = make_tiny_mlm(tmp_path / "m", tied=True)
    config = json.loads((model_dir / "config.json").read_text())
    del config["tie_word_embeddings"]
    (model_dir / "config.json").write_text(json.dumps(config))
    assert isinstance(build_head(load_model_info(model_dir, "splade"), torch.device("cpu")),
                      SpladeHead)


def test_an_untied_decoder_is_found_in_a_pytorch_checkpoint(tmp_path: Path) -> None:
    # Whether the checkpoint has its own decoder weight is read from pytorch_model.bin too.
    model_dir = make_tiny_mlm(tmp_path / "m", tied=False)
    state = load_file(str(model_dir / "model.safetensors"))
    torch.save(state, model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    head = build_head(load_model_info(model_dir, "splade"), torch.device("cpu"))
    assert isinstance(head, SpladeHead)


def test_splade_needs_a_masked_lm(tmp_path: Path, classifier_dir: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    write_tokenizer(plain, 128)
    save_bert_weights(plain)
    with pytest.raises(ConfigError, match="ForMaskedLM"):
        build_head(load_model_info(plain, "splade"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="classifier"):
        build_head(load_model_info(classifier_dir, "splade"), torch.device("cpu"))


TORCH_ACT = "torch.nn.modules.activation."
IDENTITY = "torch.nn.modules.linear.Identity"


@pytest.mark.parametrize(("st_file", "config_json"), [
    (None, {}),  # the default: sigmoid for one label
    (IDENTITY, {}),  # where sentence-transformers 6 saves it
    (None, {"sentence_transformers": {"activation_fn": IDENTITY}}),  # v4-v5
    (None, {"sbert_ce_default_activation_function": IDENTITY}),  # before v4
    (TORCH_ACT + "Sigmoid", {"sentence_transformers": {"activation_fn": IDENTITY}}),
    ("custom_code.Identity", {"sentence_transformers": {"activation_fn": IDENTITY}}),
    (None, {"sentence_transformers": {"activation_fn": "custom_code.Identity"},
            "sbert_ce_default_activation_function": IDENTITY}),
])
def test_score_activation_is_the_one_cross_encoder_applies(
        tmp_path: Path, st_file: str | None, config_json: dict) -> None:
    import json

    from sentence_transformers import CrossEncoder

    root = make_tiny_classifier(tmp_path / "reranker", ["score"])
    config = json.loads((root / "config.json").read_text()) | config_json
    (root / "config.json").write_text(json.dumps(config))
    if st_file is not None:
        (root / "config_sentence_transformers.json").write_text(json.dumps(
            {"model_type": "CrossEncoder", "activation_fn": st_file}))
    for modules in (False, True):  # (without modules.json, that file is not read)
        if modules:
            (root / "modules.json").write_text(json.dumps([{
                "idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.base.modules.transformer.Transformer"}]))
        theirs = type(CrossEncoder(str(root), device="cpu").activation_fn).__name__.lower()
        assert load_model_info(root).activation == theirs, modules


@pytest.mark.parametrize("saved_as", ["CrossEncoder", None, "SentenceTransformer", "no modules"])
def test_config_sentence_transformers_is_read_as_cross_encoder_reads_it(
        tmp_path: Path, saved_as: str | None) -> None:
    """Its prompts, default_prompt_name and activation_fn count only in CrossEncoder's own save
    (modules.json, model_type "CrossEncoder"): another model_type (none: SentenceTransformer)
    is converted and the file left unread, as it is without modules.json."""
    import json

    from sentence_transformers import CrossEncoder

    root = make_tiny_classifier(tmp_path / "reranker", ["score"])
    CrossEncoder(str(root), device="cpu", prompts={"rank": "rank this: "},
                 default_prompt_name="rank", activation_fn=torch.nn.Identity()).save(str(root))
    st_path = root / "config_sentence_transformers.json"
    st = json.loads(st_path.read_text())
    st.pop("model_type")
    if saved_as == "no modules":
        (root / "modules.json").unlink()
        st["model_type"] = "CrossEncoder"
    elif saved_as is not None:
        st["model_type"] = saved_as
    st_path.write_text(json.dumps(st))
    theirs = CrossEncoder(str(root), device="cpu")
    ours = load_model_info(root)
    assert ours.default_prompt_name == theirs.default_prompt_name
    assert ours.prompts == {k: v for k, v in theirs.prompts.items() if v}
    assert ours.activation == type(theirs.activation_fn).__name__.lower()
    assert (ours.default_prompt_name is None) is (saved_as != "CrossEncoder")


SIGMOID = TORCH_ACT + "Sigmoid"


@pytest.mark.parametrize(("saved", "problem_type", "expected"), [
    (None, None, "softmax"),  # TEI's /predict: softmax over the labels
    ("save", None, "softmax"),  # CrossEncoder.save() writes its multi-label default, Identity
    (SIGMOID, None, "sigmoid"),  # a choice of its own
    (None, "multi_label_classification", "sigmoid"),  # transformers' pipeline: sigmoid per label
    ("save", "multi_label_classification", "sigmoid"),
    (None, "single_label_classification", "softmax"),
])
def test_a_classifiers_activation_is_a_probability_unless_it_says_otherwise(
        tmp_path: Path, saved: str | None, problem_type: str | None, expected: str) -> None:
    """Several labels: CrossEncoder's default there is Identity, and it saves it; that default
    is no choice of the model's, and /predict gives TEI's softmax (CrossEncoder's
    apply_softmax) as for a model saved without it. transformers' text-classification pipeline
    gives a multi-label model (problem_type) a sigmoid per label."""
    import json

    from sentence_transformers import CrossEncoder

    root = make_tiny_classifier(tmp_path / "c", LABELS)
    if problem_type is not None:
        config = json.loads((root / "config.json").read_text())
        (root / "config.json").write_text(json.dumps(config | {"problem_type": problem_type}))
    if saved is not None:
        act = None if saved == "save" else getattr(torch.nn, saved.rsplit(".", 1)[1])()
        CrossEncoder(str(root), device="cpu", activation_fn=act).save(str(root))
    assert load_model_info(root).activation == expected


def test_a_tanh_activation_is_served_as_cross_encoder_applies_it(tmp_path: Path) -> None:
    import json

    from sentence_transformers import CrossEncoder

    from router.scores import activate

    root = make_tiny_classifier(tmp_path / "reranker", ["score"], seed=1)
    config = json.loads((root / "config.json").read_text())
    config["sentence_transformers"] = {"activation_fn": TORCH_ACT + "Tanh"}
    (root / "config.json").write_text(json.dumps(config))
    info, engine, head = serve(root)
    assert info.activation == "tanh"
    pairs = [t for t in TEXTS if isinstance(t, tuple)]
    arrays, _ = pack(root, pairs)
    logits = run_head(engine, head)(arrays)[2]
    expected = CrossEncoder(str(root), device="cpu").predict(pairs)
    assert np.abs(activate(logits, info.activation, False)[:, 0] - expected).max() <= LOGIT_TOL
    assert np.array_equal(activate(logits, info.activation, True), logits)


def test_id2label_keys_are_read_as_transformers_reads_them(tmp_path: Path) -> None:
    import json

    from transformers import AutoConfig

    root = make_tiny_classifier(tmp_path / "c", LABELS)
    config = json.loads((root / "config.json").read_text())
    config["id2label"] = {f"0{i}": label for i, label in enumerate(LABELS)}
    (root / "config.json").write_text(json.dumps(config))
    theirs = AutoConfig.from_pretrained(str(root)).id2label
    assert load_model_info(root).id2label == {str(i): v for i, v in theirs.items()}


@pytest.mark.parametrize(("keys", "missing"), [((0, 2, 3, 4, 5), 1), ((1, 2, 3, 4, 5), 0)])
def test_id2label_that_does_not_name_every_output_is_refused(tmp_path: Path, keys: tuple,
                                                              missing: int) -> None:
    """transformers sizes the head by len(id2label) and its pipeline looks each output row i up
    as id2label[i] (a KeyError where a row has no name): a gap would answer LABEL_i for a row
    and never the label named past the end."""
    import json

    root = make_tiny_classifier(tmp_path / "c", LABELS)
    config = json.loads((root / "config.json").read_text())
    config["id2label"] = {str(k): label for k, label in zip(keys, LABELS, strict=True)}
    (root / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=rf"id2label names no label for output {missing} "):
        load_model_info(root)


def test_pairs_without_token_types_in_model_input_names_score_as_cross_encoder(
        tmp_path: Path) -> None:
    """A tokenizer_config.json whose model_input_names leave out token_type_ids: transformers'
    tokenizer returns none, so CrossEncoder's model sees type 0 in the pair's second text too;
    the router's tokenization sends the same."""
    import json

    from sentence_transformers import CrossEncoder

    from router import tokenization

    root = make_tiny_classifier(tmp_path / "reranker", ["score"], seed=1)
    config = json.loads((root / "tokenizer_config.json").read_text())
    config["model_input_names"] = ["input_ids", "attention_mask"]
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    pairs = [item for item in TEXTS if isinstance(item, tuple)]
    before = tokenization._tokenizer, tokenization._typed
    try:
        tokenization._load(str(root / "tokenizer.json"), False, "bert")
        encoded = tokenization._encode(pairs, None, "right").value
    finally:
        tokenization._tokenizer, tokenization._typed = before
    cu = np.cumsum([0, *(len(e.ids) for e in encoded)]).astype(np.int32)
    arrays = protocol.BatchArrays(
        np.concatenate([e.ids for e in encoded]),
        np.concatenate([np.arange(len(e.ids), dtype=np.int32) for e in encoded]),
        np.concatenate([e.type_ids for e in encoded]), cu)
    _info, engine, head = serve(root)
    logits = run_head(engine, head)(arrays)[2][:, 0]
    theirs = CrossEncoder(str(root), device="cpu", activation_fn=torch.nn.Identity())
    assert "token_type_ids" not in theirs.tokenizer(*pairs[0])
    expected = theirs.predict(pairs, batch_size=len(pairs))
    diff = float(np.abs(logits - expected).max())
    assert diff <= LOGIT_TOL, diff
