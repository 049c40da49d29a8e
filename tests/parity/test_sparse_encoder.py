"""SPLADE models as sentence-transformers' SparseEncoder saves them (a masked-LM Transformer, then
SpladePooling: max or sum, relu or log1p_relu, max_active_dims) served from their own files,
against SparseEncoder.encode of the same directory (fp32, CPU); and what such a pipeline may not
be. Tiny random checkpoints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from backend_worker.engine import Engine
from backend_worker.head_modules import SpladeHead
from backend_worker.heads import build_head, run_head
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from shared.sparse_encoder import SpladeSpec
from tests.fixtures.oracles import densify
from tests.fixtures.sparse import Style, make_sparse_encoder
from tests.fixtures.tiny import MIXED_TEXTS, pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-4
TEXTS = [t for t in MIXED_TEXTS if isinstance(t, str)] + ["query: cat", "the the the dog"]


def served(model_dir: Path, pooling: str | None = None, chunk: int | None = None) -> np.ndarray:
    """The texts' vectors as the worker computes them from the model's own files (`chunk`: the
    head's tokens per chunk, small to cross sequence boundaries)."""
    info = load_model_info(model_dir, pooling_override=pooling)
    engine = Engine.load(info)
    head = build_head(info, engine.device)
    assert isinstance(head, SpladeHead)
    if chunk is not None:
        head.chunk = chunk
    arrays, _ = pack(model_dir, TEXTS)
    rows, dim, *frames = run_head(engine, head)(arrays)
    assert (rows, dim) == (len(TEXTS), info.vocab_size)
    return densify(rows, dim, tuple(frames))


def reference(model_dir: Path) -> np.ndarray:
    from sentence_transformers import SparseEncoder

    encoder = SparseEncoder(str(model_dir), device="cpu")
    return encoder.encode(TEXTS, convert_to_tensor=True).to_dense().numpy()


@pytest.mark.parametrize(("strategy", "activation", "max_active_dims", "style"), [
    ("max", "relu", None, "mlm"),
    ("sum", "relu", None, "mlm"),
    ("max", "log1p_relu", 5, "mlm"),
    ("sum", "log1p_relu", 7, "fill-mask"),
    ("max", "relu", 3, "v5"),
])
def test_sparse_encoder_files_match_sparse_encoder(
        tmp_path: Path, strategy: str, activation: str, max_active_dims: int | None,
        style: Style) -> None:
    model_dir = make_sparse_encoder(tmp_path / "enc", strategy=strategy, activation=activation,
                                    max_active_dims=max_active_dims, style=style)
    info = load_model_info(model_dir)
    assert info.pooling == "splade"
    assert info.splade_spec == SpladeSpec(strategy, activation == "log1p_relu",  # type: ignore[arg-type]
                                          max_active_dims)
    ours, expected = served(model_dir), reference(model_dir)
    diff = float(np.abs(ours - expected).max())
    assert diff <= TOL, diff
    assert np.array_equal(ours > 0, expected > 0)
    if max_active_dims is not None:
        assert ((ours > 0).sum(axis=1) == max_active_dims).all()


def test_sum_and_top_k_across_head_chunks(tmp_path: Path) -> None:
    """Chunks of 5 tokens cut through the texts: each sequence's sum gathers all its chunks."""
    model_dir = make_sparse_encoder(tmp_path / "enc", strategy="sum", activation="log1p_relu",
                                    max_active_dims=6)
    ours, expected = served(model_dir, chunk=5), reference(model_dir)
    diff = float(np.abs(ours - expected).max())
    assert diff <= TOL, diff
    assert np.array_equal(ours > 0, expected > 0)


def test_missing_splade_settings_are_sparse_encoders_defaults(tmp_path: Path) -> None:
    """A SpladePooling config.json without pooling_strategy / activation_function (or with no
    config.json at all) is SpladePooling(): max and relu, as sentence-transformers loads it."""
    from sentence_transformers import SparseEncoder

    model_dir = make_sparse_encoder(tmp_path / "enc", strategy="sum", activation="log1p_relu")
    config = model_dir / "1_SpladePooling" / "config.json"
    config.write_text(json.dumps({"embedding_dimension": None}))
    assert load_model_info(model_dir).splade_spec == SpladeSpec("max", False, None)
    pooling = SparseEncoder(str(model_dir), device="cpu")[1]
    assert (pooling.pooling_strategy, pooling.activation_function) == ("max", "relu")
    config.unlink()
    assert load_model_info(model_dir).splade_spec == SpladeSpec("max", False, None)


def test_pooling_override_keeps_the_files_splade_settings(tmp_path: Path) -> None:
    model_dir = make_sparse_encoder(tmp_path / "enc", strategy="sum", max_active_dims=4)
    spec = SpladeSpec("sum", False, 4)
    assert load_model_info(model_dir, pooling_override="splade").splade_spec == spec
    # Another pooling serves the hidden states, as asked: the SPLADE settings do not apply.
    other = load_model_info(model_dir, pooling_override="mean")
    assert (other.pooling, other.splade_spec) == ("mean", SpladeSpec())


def _edit(model_dir: Path, name: str, **changes: object) -> None:
    path = model_dir / name
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(("file", "changes", "named"), [
    ("1_SpladePooling/config.json", {"pooling_strategy": "mean"}, "pooling_strategy 'mean'"),
    ("1_SpladePooling/config.json", {"activation_function": "gelu"},
     "activation_function 'gelu'"),
    ("1_SpladePooling/config.json", {"module_input_name": "sentence_embedding"},
     "module_input_name='sentence_embedding'"),
    ("config_sentence_transformers.json", {"max_active_dims": 0}, "max_active_dims 0"),
    ("config_sentence_transformers.json", {"max_active_dims": True}, "max_active_dims True"),
    ("config_sentence_transformers.json", {"max_active_dims": "64"}, "max_active_dims '64'"),
])
def test_unusable_splade_settings_are_refused(
        tmp_path: Path, file: str, changes: dict, named: str) -> None:
    model_dir = make_sparse_encoder(tmp_path / "enc")
    _edit(model_dir, file, **changes)
    with pytest.raises(ConfigError, match=named):
        load_model_info(model_dir)


POOL = {"idx": 1, "name": "1", "path": "1_SpladePooling",
        "type": "sentence_transformers.sparse_encoder.modules.splade_pooling.SpladePooling"}
MLM = {"idx": 0, "name": "0", "path": "",
       "type": "sentence_transformers.sparse_encoder.modules.mlm_transformer.MLMTransformer"}
PLAIN = {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}
MEAN = {"idx": 1, "name": "1", "path": "1_Pooling",
        "type": "sentence_transformers.models.Pooling"}
NORMALIZE = {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"}


@pytest.mark.parametrize("modules", [
    [MLM],  # token logits, never pooled
    [MLM, MEAN],  # the logits' mean: not what the worker's mean pooling computes
    [MLM, POOL, NORMALIZE],
    [PLAIN, POOL],  # SpladePooling of hidden states
    [POOL, MLM],
    [MLM, POOL, POOL],
])
def test_other_pipelines_with_splade_modules_are_refused(tmp_path: Path, modules: list) -> None:
    model_dir = make_sparse_encoder(tmp_path / "enc")
    (model_dir / "1_Pooling").mkdir()
    (model_dir / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    (model_dir / "modules.json").write_text(json.dumps(modules))
    if modules[0] is PLAIN:
        (model_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    with pytest.raises(ConfigError, match="served as SPLADE only"):
        load_model_info(model_dir)


def test_an_mlm_transformer_of_another_task_is_not_splade(tmp_path: Path) -> None:
    """MLMTransformer reads sentence_bert_config.json's transformer_task (fill-mask by default):
    with feature-extraction SparseEncoder pools the hidden states, not vocabulary logits."""
    model_dir = make_sparse_encoder(tmp_path / "enc")
    _edit(model_dir, "sentence_bert_config.json", transformer_task="feature-extraction",
          modality_config={"text": {"method": "forward",
                                    "method_output_name": "last_hidden_state"}})
    with pytest.raises(ConfigError, match="served as SPLADE only"):
        load_model_info(model_dir)
    # Without the key an MLMTransformer is fill-mask (as sentence-transformers 5 saved it).
    (model_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    assert load_model_info(model_dir).pooling == "splade"
