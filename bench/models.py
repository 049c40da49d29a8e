"""Random-weight models of real shapes, for benchmarks where only speed matters.

`random:bge-base` is BAAI/bge-base-en-v1.5's shape (BERT, 768 hidden, 12 layers, 12 heads, 512
positions, CLS pooling, Normalize) with seeded random weights and the BERT uncased WordPiece
tokenizer of the built-in all-MiniLM-L6-v2 (the same 30,522-token vocabulary): the H100
reference numbers (float16) quoted in comments and bench/RESULTS.md were measured on this
shape. Built once per directory with transformers.

Cross-encoders for the re-rank benchmark (bench/rerank.py) are one-label
`BertForSequenceClassification` directories, which embedserve and sentence-transformers'
`CrossEncoder` both load as a re-ranker (sigmoid of the one logit): `minilm-cross-encoder` is the
built-in all-MiniLM-L6-v2 encoder (trained weights) plus a seeded head, the shape of
cross-encoder/ms-marco-MiniLM-L6-v2; `bge-reranker-base` is a random BERT of
BAAI/bge-reranker-base's size (768 hidden, 12 layers, 512 positions; the real one is XLM-R).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "bge-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "intermediate_size": 3072, "max_position_embeddings": 512},
    "bge-small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12,
                  "intermediate_size": 1536, "max_position_embeddings": 512},
    "bge-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                  "intermediate_size": 4096, "max_position_embeddings": 512},
    # bge-base's vocabulary, positions and output width with no transformer layers: the model
    # costs next to nothing, so a run measures the serving path (HTTP, JSON, tokenization,
    # batching, ZeroMQ) and its CPU per token, i.e. the ceiling any device can be fed at.
    "bge-base-no-layers": {"hidden_size": 768, "num_hidden_layers": 0, "num_attention_heads": 12,
                           "intermediate_size": 3072, "max_position_embeddings": 512},
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.txt")


def random_model(shape: str, root: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A sentence-transformers directory of `shape` under root (reused when already built)."""
    if shape not in SHAPES:
        raise SystemExit(f"unknown model shape {shape!r} (known: {', '.join(SHAPES)})")
    path = root / f"random-{shape}"
    if (path / "modules.json").is_file():
        return path
    import torch
    import transformers

    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _copy_tokenizer(tokenizer_dir, staging)
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(vocab), **SHAPES[shape])
    transformers.BertModel(config).save_pretrained(str(staging), safe_serialization=True)
    max_len = SHAPES[shape]["max_position_embeddings"]
    (staging / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_len, "do_lower_case": True}))
    (staging / "1_Pooling").mkdir()
    (staging / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": SHAPES[shape]["hidden_size"], "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False}))
    (staging / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"},
    ]))
    # The real tokenizer_config says 128 or 256; this shape takes 512 tokens.
    config_path = staging / "tokenizer_config.json"
    if config_path.is_file():
        tok_config = json.loads(config_path.read_text())
        tok_config["model_max_length"] = max_len
        config_path.write_text(json.dumps(tok_config))
    staging.rename(path)
    return path


# One-label classifier shapes: None is the built-in encoder's own (trained) weights.
CROSS_ENCODERS: dict[str, dict[str, Any] | None] = {
    "minilm-cross-encoder": None,
    "bge-reranker-base": SHAPES["bge-base"],
}


def cross_encoder(shape: str, root: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A one-label sequence-classification directory of `shape` under root (reused when built):
    seeded head weights, on the encoder of `tokenizer_dir` or on random weights of the shape."""
    if shape not in CROSS_ENCODERS:
        raise SystemExit(f"unknown cross-encoder shape {shape!r} "
                         f"(known: {', '.join(CROSS_ENCODERS)})")
    path = root / f"random-{shape}"
    if (path / "config.json").is_file():
        return path
    import torch
    import transformers

    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dims = CROSS_ENCODERS[shape]
    if dims is None:
        with_seeded_head(tokenizer_dir, staging, {0: "LABEL_0"}, seed)
        staging.rename(path)
        return path
    torch.manual_seed(seed)
    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    config = transformers.BertConfig(vocab_size=len(vocab), **dims)
    config.num_labels = 1
    model = transformers.BertForSequenceClassification(config)
    _spread_head(model)
    model.save_pretrained(str(staging), safe_serialization=True)
    _copy_tokenizer(tokenizer_dir, staging)
    config_path = staging / "tokenizer_config.json"
    if config_path.is_file():
        tok_config = json.loads(config_path.read_text())
        tok_config["model_max_length"] = dims["max_position_embeddings"]
        config_path.write_text(json.dumps(tok_config))
    staging.rename(path)
    return path


def with_seeded_head(encoder_dir: Path, dest: Path, labels: dict[int, str], seed: int) -> Path:
    """`encoder_dir`'s trained BERT encoder with a seeded classification head of `labels` (one
    label: a cross-encoder) and its tokenizer, saved in `dest`: heads checked, or timed, on real
    encoder weights."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification.from_pretrained(
        str(encoder_dir), num_labels=len(labels), id2label=labels,
        label2id={v: k for k, v in labels.items()})
    _spread_head(model)
    model.save_pretrained(str(dest), safe_serialization=True)
    _copy_tokenizer(encoder_dir, dest)
    return dest


def _spread_head(model: Any) -> None:
    import torch

    with torch.no_grad():  # a head with some spread, so the scores are not all alike
        model.classifier.weight.normal_(0, 0.5)
        model.classifier.bias.normal_(0, 0.1)


def _copy_tokenizer(source: Path, dest: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, dest / name)
