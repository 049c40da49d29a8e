"""BERT (model_type "bert"): absolute positions, token types, post-norm encoder layers.

Everything runs on flat [T, hidden] tensors; only attention sees the sequence boundaries.
`WEIGHT_MAP` is the whole story of how Hugging Face BERT checkpoints name their tensors.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self, TypedDict

import torch
from torch import nn

from backend_worker.attention import BIDIRECTIONAL, Attention, MaskSpec
from backend_worker.head_modules import BERT_CLASSIFIER_KEYS, Either, FamilyHeads, HeadKeys
from backend_worker.layers import MLP, PostNormLayer, SelfAttention, activation
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.config import refuse_values, required_keys
from backend_worker.models.registry import register
from shared.errors import ConfigError

# BERT's embeddings as checkpoints name them (ELECTRA's and ALBERT's too, at their own width).
EMBEDDING_RULES = (
    Rule("embeddings.word_embeddings.weight", "embeddings.word.weight"),
    Rule("embeddings.position_embeddings.weight", "embeddings.position.weight"),
    Rule("embeddings.token_type_embeddings.weight", "embeddings.token_type.weight"),
    Rule("embeddings.LayerNorm.{w}", "embeddings.norm.{w}"),
)
# TF-era checkpoints spell LayerNorm parameters gamma/beta (transformers renames them for every
# model on load).
TF_LAYER_NORM_NAMES = ((r"LayerNorm\.gamma$", "LayerNorm.weight"),
                       (r"LayerNorm\.beta$", "LayerNorm.bias"))

WEIGHT_MAP = WeightMap(
    rules=(
        *EMBEDDING_RULES,
        Rule("encoder.layer.{i}.attention.self.{part}.{w}", "layers.{i}.attention.qkv.{w}",
             fuse=("query", "key", "value")),
        Rule("encoder.layer.{i}.attention.output.dense.{w}", "layers.{i}.attention.out.{w}"),
        Rule("encoder.layer.{i}.attention.output.LayerNorm.{w}", "layers.{i}.attention_norm.{w}"),
        Rule("encoder.layer.{i}.intermediate.dense.{w}", "layers.{i}.mlp.up.{w}"),
        Rule("encoder.layer.{i}.output.dense.{w}", "layers.{i}.mlp.down.{w}"),
        Rule("encoder.layer.{i}.output.LayerNorm.{w}", "layers.{i}.mlp_norm.{w}"),
    ),
    # BertFor* checkpoints (MaskedLM, SequenceClassification, ...) nest the encoder in "bert.".
    prefixes=("bert.",),
    normalize=TF_LAYER_NORM_NAMES,
    ignore=(
        r"embeddings\.position_ids",  # a buffer older transformers saved
        # Heads of BertFor* checkpoints: not the encoder's. backend_worker/heads.py loads them,
        # strictly, when the model serves them (pooler + classifier for a classifier, cls.* for
        # SPLADE); an embedding model drops them (sentence-transformers never uses the pooler).
        r"pooler\..*",
        r"cls\..*",
        r"classifier\..*",
        # BertForQuestionAnswering's span head: its encoder is served, as sentence-transformers
        # loads it (AutoModel drops the head).
        r"qa_outputs\..*",
    ),
)

HEADS = FamilyHeads(
    encoder=WEIGHT_MAP,
    classifier=BERT_CLASSIFIER_KEYS,
    mlm=HeadKeys(
        rules=(
            Rule("cls.predictions.transform.dense.{w}", "dense.{w}"),
            Rule("cls.predictions.transform.LayerNorm.{w}", "norm.{w}"),
        ),
        owns=(r"cls\.",),
    ),
    mlm_tied=(
        # Tied (the usual): the decoder is the word embedding matrix, saved once.
        Either(Rule("cls.predictions.decoder.weight", "decoder.weight"),
               Rule("embeddings.word_embeddings.weight", "decoder.weight")),
        # NOTE: transformers applies decoder.bias. v4 tied it to predictions.bias (one tensor,
        # both names saved in a .bin); v5 ties them only with tied embeddings and otherwise
        # leaves predictions.bias unused. So decoder.bias wins when saved; a v4 safetensors
        # file saved only predictions.bias, whatever tie_word_embeddings says.
        Either(Rule("cls.predictions.decoder.bias", "decoder.bias"),
               Rule("cls.predictions.bias", "decoder.bias"), per_config=False),
    ),
)

# Config values under which this implementation would silently compute something else (BERT's
# decoder switches; JinaBERT's config inherits them).
DECODER_SETTINGS: dict[str, Any] = {"is_decoder": True, "add_cross_attention": True}


class BertSizes(TypedDict):
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    layer_norm_eps: float


def bert_sizes(config: dict[str, Any]) -> BertSizes:
    """The sizes that configs of BERT's layout (BERT, RoBERTa, MPNet, JinaBERT) spell alike,
    with BertConfig's defaults. A missing required key is a KeyError: call it under
    `config.required_keys`."""
    return BertSizes(
        vocab_size=int(config["vocab_size"]),
        hidden_size=int(config["hidden_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=int(config["num_attention_heads"]),
        intermediate_size=int(config["intermediate_size"]),
        max_position_embeddings=int(config.get("max_position_embeddings", 512)),
        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
    )


class BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, positions: int, types: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.position = nn.Embedding(positions, hidden)
        self.token_type = nn.Embedding(types, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        x = self.word(input_ids) + self.token_type(token_type_ids) + self.position(position_ids)
        return self.norm(x)


class BertLayer(PostNormLayer):
    """Post-norm, with biased attention and an up -> act -> down MLP (DistilBERT and MPNet use
    it too, MPNet with its position bias in `mask`)."""

    def __init__(
        self, hidden: int, heads: int, intermediate: int, act: str, eps: float,
        attention: Attention, mask: MaskSpec = BIDIRECTIONAL,
    ) -> None:
        super().__init__(hidden, eps, SelfAttention(hidden, heads, attention, mask=mask),
                         MLP(hidden, intermediate, act))


@register(model_types=("bert",))
class BertModel(nn.Module):
    """BertModel's last hidden state, flat."""

    weight_map: ClassVar[WeightMap] = WEIGHT_MAP
    heads: ClassVar[FamilyHeads | None] = HEADS
    # How config errors name the family (subclasses with BERT's layout say their own name).
    family: ClassVar[str] = "BERT"

    def __init__(
        self, *, vocab_size: int, hidden_size: int, num_hidden_layers: int,
        num_attention_heads: int, intermediate_size: int, max_position_embeddings: int,
        type_vocab_size: int, hidden_act: str, layer_norm_eps: float, attention: Attention,
    ) -> None:
        super().__init__()
        self.max_positions = max_position_embeddings
        self.embeddings = BertEmbeddings(
            vocab_size, max_position_embeddings, type_vocab_size, hidden_size, layer_norm_eps
        )
        self.layers = nn.ModuleList(
            BertLayer(hidden_size, num_attention_heads, intermediate_size, hidden_act,
                      layer_norm_eps, attention)
            for _ in range(num_hidden_layers)
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        refuse_values(config, DECODER_SETTINGS, cls.family)
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ConfigError(
                f"config.json: {cls.family} position_embedding_type {position_type!r} is not "
                "supported (supported: absolute)"
            )
        hidden_act = str(config.get("hidden_act", "gelu"))
        activation(hidden_act, where="config.json: hidden_act")  # fail with the setting's name
        with required_keys(cls.family):
            return cls(
                **bert_sizes(config),
                **cls.more_sizes(config),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                hidden_act=hidden_act,
                attention=attention,
            )

    @classmethod
    def more_sizes(cls, config: dict[str, Any]) -> dict[str, Any]:
        """Constructor arguments a family of BERT's layout adds to BERT's (none here)."""
        return {}

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, position_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, meta)
        return x
