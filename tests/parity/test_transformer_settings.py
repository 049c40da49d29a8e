"""The Transformer module's settings file (sentence_bert_config.json and its older names) as
sentence-transformers reads it: what it changes in the vectors, against SentenceTransformer,
on a tiny random BERT saved as a sentence-transformers folder, fp32 on CPU."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from backend_worker.engine import Engine
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.fixtures.tiny import make_tiny_bert, pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Longer than every limit below, so that where an input is cut shows in its vector.
TEXTS = [
    "The weather is lovely today.",
    "A much longer input, with punctuation; digits 0123456789 and MiXeD case: it spans "
    "well over forty word pieces so that where it is cut changes its vector.",
]


def _settings(root: Path, **changes: Any) -> None:
    path = root / "sentence_bert_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _renamed(name: str) -> Callable[[Path], None]:
    def rename(root: Path) -> None:
        _settings(root, max_seq_length=8)
        (root / "sentence_bert_config.json").rename(root / name)
    return rename


CASES: dict[str, tuple[str, Callable[[Path], None]]] = {
    # Saves of sentence-transformers < 1 named the file after the family; it still reads them.
    "sentence_roberta_config": ("classic", _renamed("sentence_roberta_config.json")),
    "sentence_xlm-roberta_config": ("classic", _renamed("sentence_xlm-roberta_config.json")),
    # The tokenizer's model_max_length given to it wins over max_seq_length (128 here).
    "tokenizer_args": ("classic", lambda root: _settings(
        root, tokenizer_args={"model_max_length": 8, "trust_remote_code": True})),
    "processor_kwargs": ("v6", lambda root: _settings(
        root, max_seq_length=128, processor_kwargs={"model_max_length": 8})),
    # processing_kwargs' max_length goes to every tokenizer call: the common one wins.
    "processing_kwargs-text": ("v6", lambda root: _settings(
        root, processing_kwargs={"text": {"max_length": 8}})),
    "processing_kwargs-common": ("v6", lambda root: _settings(
        root, processing_kwargs={"text": {"max_length": 12}, "common": {"max_length": 8}})),
}


@pytest.mark.parametrize("case", list(CASES))
def test_vectors_match_sentence_transformers(tmp_path: Path, case: str) -> None:
    from sentence_transformers import SentenceTransformer

    st_format, change = CASES[case]
    root = make_tiny_bert(tmp_path / case, st_format=st_format)  # type: ignore[arg-type]
    change(root)
    info = load_model_info(root)
    arrays, _ = pack(root, TEXTS, max_length=info.max_input_length)
    ours = Engine.load(info).embed(arrays)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)  # (the folder ends with Normalize)
    ref = SentenceTransformer(str(root), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert float(np.abs(ours - ref).max()) <= 1e-5


# sentence-transformers 6 writes which output of the model the Transformer module reads
# (modality_config) and which feature it fills (module_output_name): another output than the
# task's own is another vector, e.g. the second-to-last layer's states, or BERT's pooler output
# as the sentence embedding itself (no Pooling module then).
OTHER_OUTPUTS: dict[str, dict[str, Any]] = {
    "second-to-last-layer": {"modality_config": {"text": {
        "method": "forward", "method_output_name": ["hidden_states", -2]}}},
    "pooler-output": {"modality_config": {"text": {
        "method": "forward", "method_output_name": "pooler_output"}},
        "module_output_name": "sentence_embedding"},
}


@pytest.mark.parametrize("case", list(OTHER_OUTPUTS))
def test_a_transformer_reading_another_output_is_refused(tmp_path: Path, case: str) -> None:
    from sentence_transformers import SentenceTransformer

    root = make_tiny_bert(tmp_path / case)
    default = SentenceTransformer(str(root), device="cpu").encode(TEXTS, convert_to_numpy=True)
    _settings(root, **OTHER_OUTPUTS[case])
    if case == "pooler-output":  # (the Transformer's output is the sentence embedding)
        modules = json.loads((root / "modules.json").read_text())
        (root / "modules.json").write_text(json.dumps([modules[0], modules[-1]]))
    theirs = SentenceTransformer(str(root), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert float(np.abs(theirs - default).max()) > 1e-2, "the setting changes the vectors"
    with pytest.raises(ConfigError, match=r"sentence_bert_config\.json: modality_config text"):
        load_model_info(root)


def test_the_outputs_sentence_transformers_writes_by_default_are_served(tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    root = make_tiny_bert(tmp_path / "default")
    # (a one-name list is the name: sentence-transformers indexes the output with each in turn)
    _settings(root, transformer_task="feature-extraction", module_output_name="token_embeddings",
              modality_config={"text": {"method": "forward",
                                        "method_output_name": ["last_hidden_state"]}})
    info = load_model_info(root)
    arrays, _ = pack(root, TEXTS, max_length=info.max_input_length)
    ours = Engine.load(info).embed(arrays)
    ours /= np.linalg.norm(ours, axis=1, keepdims=True)
    ref = SentenceTransformer(str(root), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert float(np.abs(ours - ref).max()) <= 1e-5
