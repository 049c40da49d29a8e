"""DistilBERT (model_type "distilbert"): BERT's post-norm layers under other names, no token
types, LayerNorm eps fixed at 1e-12 (transformers ignores any config key for it).

Its config spells sizes `dim` / `n_layers` / `n_heads` / `hidden_dim` and the MLP activation
`activation`. `sinusoidal_pos_embds` only says how the position table was initialised: the
table is a parameter saved in every checkpoint and transformers uses the saved values (it
computes the sinusoids only for a table the checkpoint lacks), so loading it strictly computes
the same thing; a checkpoint without it fails to load, naming the key.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import torch
from torch import nn

from backend_worker.attention import Attention
from backend_worker.head_modules import Either, FamilyHeads, HeadKeys, LogitsHead, SpladeHead
from backend_worker.layers import WordPositionEmbeddings, activation
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.bert import BertLayer
from backend_worker.models.config import required_keys
from backend_worker.models.registry import register

EPS = 1e-12  # hard-coded in transformers' DistilBERT (embeddings, layers and MLM head)

WEIGHT_MAP = WeightMap(
    rules=(
        Rule("embeddings.word_embeddings.weight", "embeddings.word.weight"),
        Rule("embeddings.position_embeddings.weight", "embeddings.position.weight"),
        Rule("embeddings.LayerNorm.{w}", "embeddings.norm.{w}"),
        Rule("transformer.layer.{i}.attention.{part}.{w}", "layers.{i}.attention.qkv.{w}",
             fuse=("q_lin", "k_lin", "v_lin")),
        Rule("transformer.layer.{i}.attention.out_lin.{w}", "layers.{i}.attention.out.{w}"),
        Rule("transformer.layer.{i}.sa_layer_norm.{w}", "layers.{i}.attention_norm.{w}"),
        Rule("transformer.layer.{i}.ffn.lin1.{w}", "layers.{i}.mlp.up.{w}"),
        Rule("transformer.layer.{i}.ffn.lin2.{w}", "layers.{i}.mlp.down.{w}"),
        Rule("transformer.layer.{i}.output_layer_norm.{w}", "layers.{i}.mlp_norm.{w}"),
    ),
    # DistilBertFor* checkpoints nest the encoder in "distilbert.".
    prefixes=("distilbert.",),
    ignore=(
        r"embeddings\.position_ids",  # a buffer older transformers saved
        # Heads: backend_worker/heads.py loads them when the model serves them (HEADS below).
        r"pre_classifier\..*",
        r"classifier\..*",
        r"vocab_(transform|layer_norm|projector)\..*",
        r"qa_outputs\..*",  # DistilBertForQuestionAnswering: its encoder is served
    ),
)


class DistilBertClassifierHead(LogitsHead):
    """DistilBertForSequenceClassification: classifier(relu(pre_classifier(h[CLS])))."""

    def __init__(self, hidden: int, labels: int) -> None:
        super().__init__()
        self.pre_classifier = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, labels)

    def forward(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        first = hidden.index_select(0, cu_seqlens[:-1]).float()
        return self.classifier(torch.relu(self.pre_classifier(first)))


def _classifier(config: dict[str, Any], hidden: int, labels: int) -> nn.Module:
    return DistilBertClassifierHead(hidden, labels)


def _mlm(config: dict[str, Any], hidden: int, vocab: int) -> SpladeHead:
    # vocab_transform -> activation (the config's, as in the layers) -> vocab_layer_norm ->
    # vocab_projector: SpladeHead's dense -> act -> norm -> decoder.
    return SpladeHead(hidden, vocab, str(config.get("activation", "gelu")), EPS)


HEADS = FamilyHeads(
    encoder=WEIGHT_MAP,
    classifier=HeadKeys(
        rules=(Rule("pre_classifier.{w}", "pre_classifier.{w}"),
               Rule("classifier.{w}", "classifier.{w}")),
        owns=(r"pre_classifier\.", r"classifier\."),
    ),
    make_classifier=_classifier,
    mlm=HeadKeys(
        rules=(Rule("vocab_transform.{w}", "dense.{w}"),
               Rule("vocab_layer_norm.{w}", "norm.{w}"),
               Rule("vocab_projector.bias", "decoder.bias")),
        owns=(r"vocab_transform\.", r"vocab_layer_norm\.", r"vocab_projector\."),
    ),
    # Tied (the default), the projector is the word embedding matrix, saved once.
    mlm_tied=(Either(Rule("vocab_projector.weight", "decoder.weight"),
                     Rule("embeddings.word_embeddings.weight", "decoder.weight")),),
    make_mlm=_mlm,
)


@register(model_types=("distilbert",))
class DistilBertModel(nn.Module):
    """DistilBertModel's last hidden state, flat. Token types are ignored: the model has none
    (its tokenizer's pair template may still number the second text 1)."""

    weight_map: ClassVar[WeightMap] = WEIGHT_MAP
    heads: ClassVar[FamilyHeads | None] = HEADS

    def __init__(
        self, *, vocab_size: int, dim: int, n_layers: int, n_heads: int, hidden_dim: int,
        max_position_embeddings: int, activation: str, attention: Attention,
    ) -> None:
        super().__init__()
        self.max_positions = max_position_embeddings
        self.embeddings = WordPositionEmbeddings(vocab_size, max_position_embeddings, dim, EPS)
        self.layers = nn.ModuleList(
            BertLayer(dim, n_heads, hidden_dim, activation, EPS, attention)
            for _ in range(n_layers)
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        act = str(config.get("activation", "gelu"))
        activation(act, where="config.json: DistilBERT activation")
        with required_keys("DistilBERT"):
            return cls(
                vocab_size=int(config["vocab_size"]),
                dim=int(config["dim"]),
                n_layers=int(config["n_layers"]),
                n_heads=int(config["n_heads"]),
                hidden_dim=int(config["hidden_dim"]),
                max_position_embeddings=int(config.get("max_position_embeddings", 512)),
                activation=act,
                attention=attention,
            )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, position_ids)
        for layer in self.layers:
            x = layer(x, meta)
        return x
