"""BGE-M3's lexical weights (its sparse_linear head) served by the worker, against
FlagEmbedding's M3Embedder computation written out over transformers' hidden states: each token's
relu(sparse_linear(h)), the largest per vocabulary id, without the cls / eos / pad / unk ids and
weights that are not > 0. A tiny random XLM-R behind the real 250k tokenizer, fp32 on CPU."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from backend_worker.engine import Engine
from backend_worker.lexical import LexicalHead, build_lexical, run_lexical
from backend_worker.main import outputs
from shared import protocol
from shared.errors import ConfigError
from shared.lexical import LexicalWeights
from shared.modelinfo import load_model_info
from tests.fixtures.families import pack_offset
from tests.fixtures.lexical import make_m3, reference

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-5
TEXTS = ["What is BGE M3?", "Definition of BM25 BM25 BM25", "<unk> tokens and <s> markup",
         "a much longer passage, which repeats words: passage, passage, words!"]


@pytest.fixture(scope="module")
def m3(tmp_path_factory) -> Path:
    return make_m3(tmp_path_factory.mktemp("m3") / "model")


def served(model_dir: Path, texts: list[str]) -> list[dict[int, float]]:
    info = load_model_info(model_dir)
    assert info.lexical is not None
    engine = Engine.load(info)
    head = build_lexical(info.lexical, info.hidden_size, info.vocab_size, engine.device)
    arrays, _ = pack_offset(model_dir, texts, info.position_offset)
    rows, dim, offsets, indices, values = run_lexical(engine, head)(arrays)
    assert (rows, dim) == (len(texts), info.vocab_size)
    answers = []
    for start, stop in itertools.pairwise(offsets):
        assert np.all(np.diff(indices[start:stop]) > 0), "indices ascending"
        answers.append(dict(zip(indices[start:stop].tolist(), values[start:stop].tolist(),
                                strict=True)))
    return answers


def test_lexical_weights_match_flag_embedding(m3: Path) -> None:
    info = load_model_info(m3)
    assert info.lexical is not None
    assert info.lexical.ignored_ids == [0, 1, 2, 3]  # <s>, <pad>, </s>, <unk>
    ours, expected = served(m3, TEXTS), reference(m3, TEXTS)
    for got, want in zip(ours, expected, strict=True):
        assert set(got) == set(want)
        assert max(abs(got[i] - want[i]) for i in want) <= TOL
    assert all(expected), "every text has weighted tokens"
    assert any(len(w) < len(set(t.split())) for w, t in zip(expected, TEXTS, strict=True)), \
        "some token weights are relu'd away"
    # One at a time gives what the batch gives.
    alone = served(m3, TEXTS[1:2])[0]
    assert max(abs(alone[i] - ours[1][i]) for i in ours[1]) <= TOL


def test_the_worker_serves_dense_and_lexical_vectors(m3: Path) -> None:
    info = load_model_info(m3)
    assert info.lexical is not None and info.pooling == "cls"
    engine = Engine.load(info)
    head = build_lexical(info.lexical, info.hidden_size, info.vocab_size, engine.device)
    kinds = protocol.OutputKind
    assert set(outputs(engine, None, head)) == {kinds.POOLED, kinds.SPARSE, kinds.ALL_TOKENS}


def test_a_safetensors_head_is_read_too(tmp_path: Path, m3: Path) -> None:
    from safetensors.torch import save_file

    other = tmp_path / "model"
    shutil.copytree(m3, other)
    head = other / "sparse_linear.pt"
    save_file(torch.load(head, weights_only=True), str(other / "sparse_linear.safetensors"))
    head.unlink()
    info = load_model_info(other)
    assert info.lexical is not None and info.lexical.path.endswith("sparse_linear.safetensors")
    assert served(other, TEXTS[:1]) == served(m3, TEXTS[:1])


def test_no_head_file_no_lexical_weights(tmp_path: Path, m3: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(m3, copy)
    (copy / "sparse_linear.pt").unlink()
    assert load_model_info(copy).lexical is None
    # A SPLADE model serves its own sparse vectors, never these.
    assert load_model_info(m3, pooling_override="splade").lexical is None


def test_only_a_dense_embedding_model_gets_lexical_weights(tmp_path: Path) -> None:
    """A classifier with the file beside it: /embed_sparse stays refused (no pooled model)."""
    from tests.fixtures.heads import make_tiny_classifier

    classifier = make_tiny_classifier(tmp_path / "c", ["a", "b"])
    torch.save({"weight": torch.zeros(1, 32), "bias": torch.zeros(1)},
               classifier / "sparse_linear.pt")
    assert load_model_info(classifier).lexical is None


def test_special_tokens_named_in_tokenizer_config_only(tmp_path: Path, m3: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(m3, copy)
    (copy / "special_tokens_map.json").unlink(missing_ok=True)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config.pop("unk_token", None)
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    info = load_model_info(copy)
    assert info.lexical is not None and info.lexical.ignored_ids == [0, 1, 2]


def test_a_head_of_another_shape_is_refused(tmp_path: Path, m3: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(m3, copy)
    torch.save({"weight": torch.zeros(2, 32), "bias": torch.zeros(2)}, copy / "sparse_linear.pt")
    info = load_model_info(copy)
    assert info.lexical is not None
    with pytest.raises(ConfigError, match=r"expected weight \[1, 32\] and bias \[1\]"):
        build_lexical(info.lexical, info.hidden_size, info.vocab_size, torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_a_non_float_head_is_refused_not_cast(tmp_path: Path, dtype: torch.dtype) -> None:
    # An integer (quantized) head cast to float would weight every token wrongly, silently.
    path = tmp_path / "sparse_linear.pt"
    torch.save({"weight": torch.ones(1, 32, dtype=dtype), "bias": torch.zeros(1)}, path)
    with pytest.raises(ConfigError, match=f"weight is {dtype}, not floating point"):
        build_lexical(LexicalWeights(str(path), []), 32, 100, torch.device("cpu"))


def _flag_embedding_ignored(model_dir: Path) -> set[int]:
    # M3Embedder's unused_tokens, over the tokenizer transformers builds from the files.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    names = tokenizer.special_tokens_map
    return {tokenizer.convert_tokens_to_ids(names[name])
            for name in ("cls_token", "eos_token", "pad_token", "unk_token") if name in names}


_DECODER = {str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for i, text in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}


@pytest.mark.parametrize(("config_edit", "special_map"), [
    # XLM-R's class gives the tokens no file names (BGE-M3 names XLMRobertaTokenizer).
    ({"tokenizer_class": "XLMRobertaTokenizer", "unk_token": None}, None),
    ({"tokenizer_class": "XLMRobertaTokenizer", "cls_token": None, "eos_token": None,
      "pad_token": None, "unk_token": None}, None),
    # A null in tokenizer_config.json names no token, whatever the class's default.
    ({"tokenizer_class": "XLMRobertaTokenizer", "unk_token": "__null__"}, None),
    # special_tokens_map.json wins over tokenizer_config.json (transformers 4's files)...
    ({}, {"eos_token": "<mask>"}),
    # ... unless tokenizer_config.json has an added_tokens_decoder: it is not read at all.
    ({"added_tokens_decoder": _DECODER}, {"eos_token": "<mask>"}),
    # An AddedToken as a dict.
    ({}, {"cls_token": {"content": "<mask>", "lstrip": True, "normalized": False,
                        "rstrip": False, "single_word": False}}),
])
def test_special_tokens_as_transformers_resolves_them(
        tmp_path: Path, m3: Path, config_edit: dict, special_map: dict | None) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(m3, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    for key, value in config_edit.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = None if value == "__null__" else value
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (copy / "special_tokens_map.json").write_text(json.dumps(special_map))
    info = load_model_info(copy)
    assert info.lexical is not None
    assert set(info.lexical.ignored_ids) == _flag_embedding_ignored(copy)


def test_class_default_special_tokens_are_transformers() -> None:
    """shared/tokenizer_class.py's table of each tokenizer class's default special tokens
    against the classes' own __init__ defaults; every class a model type defaults to is in it."""
    import inspect

    import transformers

    from shared.tokenizer_class import _DEFAULT_CLASS, CLASS_DEFAULTS

    assert set(_DEFAULT_CLASS.values()) <= set(CLASS_DEFAULTS)
    for name, defaults in CLASS_DEFAULTS.items():
        cls = getattr(transformers, name)
        found = {}
        for klass in cls.__mro__:  # (a subclass passes its **kwargs on to its base)
            if "__init__" not in vars(klass):
                continue
            parameters = inspect.signature(klass.__init__).parameters
            for key in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                        "cls_token", "mask_token"):
                default = parameters[key].default if key in parameters else None
                if key not in found and isinstance(default, str):
                    found[key] = default
        assert found == defaults, name


def test_token_ids_as_the_tokenizers_library_finds_them() -> None:
    """A special token's id from tokenizer.json: its added tokens first (a BPE's special tokens
    are often in no vocabulary), then the model's vocabulary, a mapping or Unigram's list."""
    from tokenizers import Tokenizer, models

    from shared.lexical import _token_id

    kinds = [Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]")),
             Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")])),
             Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0)], 0))]
    for tokenizer in kinds:
        tokenizer.add_special_tokens(["<|end|>"])
        saved = json.loads(tokenizer.to_str())
        for content in ("[UNK]", "<unk>", "a", "b", "<|end|>", "absent"):
            assert _token_id(saved, content) == tokenizer.token_to_id(content), content


def test_the_packed_batch_keeps_each_sequence_apart() -> None:
    """LexicalHead on a hand-made packed batch: the last vocabulary id, an empty sequence, a
    sequence with nothing kept (an ignored id, weights not > 0), repeated ids (the largest)."""
    head = LexicalHead(1, 10, [0])
    head.linear.requires_grad_(False)
    head.linear.load_state_dict({"weight": torch.ones(1, 1), "bias": torch.zeros(1)})
    ids = torch.tensor([9, 9, 3, 0, 2, 9, 0, 5, 9])
    weights = torch.tensor([0.5, 0.7, 0.2, 3.0, -1.0, 0.0, 2.0, 0.1, 0.3])
    cu_seqlens = torch.tensor([0, 3, 3, 6, 9])
    rows, dim, offsets, indices, values = head.result(weights[:, None], ids, cu_seqlens)
    assert (rows, dim) == (4, 10)
    assert offsets.tolist() == [0, 2, 2, 2, 4]
    assert indices.tolist() == [3, 9, 5, 9]
    np.testing.assert_allclose(values, [0.2, 0.7, 0.1, 0.3])
    # No token kept at all.
    rows, dim, offsets, indices, values = head.result(-weights[:, None].abs(), ids, cu_seqlens)
    assert offsets.tolist() == [0, 0, 0, 0, 0] and indices.size == values.size == 0
