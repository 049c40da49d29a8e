"""JinaBERT v2 (jina-embeddings-v2-*): BERT's post-norm encoder with symmetric ALiBi in place of
position embeddings and a gated (GLU) MLP.

config.json says model_type "bert"; the custom code its `auto_map` points at is what tells the
family apart, so both classes register a registry `Marker` rather than a model type:

- jinaai/jina-bert-implementation (jina-embeddings-v2-small-en, -base-en, -base-de/es/zh):
  x = LN(x + attn(x)); x = LN(x + wo(act(gate) * up)), with gated_layers = [gate; up];
- jinaai/jina-bert-v2-qk-post-norm (jina-embeddings-v2-base-code): LayerNorms on the whole q
  and k projections, up_gated_layer = [up; gate], and one more residual norm:
  a = LN(x + attn(x)); h = LN(x + a); x = LN(h + down(up * act(gate))).

Attention scores get -slope_h * |i - j| added (ALiBi, made symmetric for a bidirectional
encoder), so positions come from each sequence's structure and position_ids go unused; the
sequence limit is max_position_embeddings (8192 for the released models). transformers has no
implementation: tests/parity/test_jina.py compares against a float64 reference of jina's math.
"""

from __future__ import annotations

from typing import Any, ClassVar, Self

import torch
from torch import nn

from backend_worker.attention import Attention, MaskSpec, SymmetricAlibi, alibi_slopes
from backend_worker.head_modules import FamilyHeads
from backend_worker.layers import GatedMLP, PostNormLayer, SelfAttention, WordTypeEmbeddings
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.bert import DECODER_SETTINGS, bert_sizes
from backend_worker.models.config import refuse_values, required_keys
from backend_worker.models.registry import Marker, register
from shared.errors import ConfigError

# The GLU flavours of jina's code: the activation of the gate comes from feed_forward_type
# (hidden_act is not read by its GLU MLPs). "geglu" is torch's exact (erf) GELU.
_GLU_ACTIVATIONS = {"geglu": "gelu", "reglu": "relu"}

_SHARED_RULES = (
    Rule("embeddings.word_embeddings.weight", "embeddings.word.weight"),
    Rule("embeddings.token_type_embeddings.weight", "embeddings.token_type.weight"),
    Rule("embeddings.LayerNorm.{w}", "embeddings.norm.{w}"),
    Rule("encoder.layer.{i}.attention.self.{part}.{w}", "layers.{i}.attention.qkv.{w}",
         fuse=("query", "key", "value")),
    Rule("encoder.layer.{i}.attention.output.dense.{w}", "layers.{i}.attention.out.{w}"),
    Rule("encoder.layer.{i}.attention.output.LayerNorm.{w}", "layers.{i}.attention_norm.{w}"),
)
# JinaBertForMaskedLM checkpoints nest the encoder in "bert."; their heads (and the pooler of
# JinaBertModel checkpoints) are not the encoder's. No head is served for this family (TEI serves
# none either), so they are dropped.
_PREFIXES = ("bert.",)
_IGNORE = (r"pooler\..*", r"cls\..*", r"classifier\..*")

WEIGHT_MAP = WeightMap(
    rules=(
        *_SHARED_RULES,
        Rule("encoder.layer.{i}.mlp.gated_layers.weight", "layers.{i}.mlp.gate_up.weight"),
        Rule("encoder.layer.{i}.mlp.wo.{w}", "layers.{i}.mlp.down.{w}"),
        Rule("encoder.layer.{i}.mlp.layernorm.{w}", "layers.{i}.mlp_norm.{w}"),
    ),
    prefixes=_PREFIXES,
    ignore=_IGNORE,
)

CODE_WEIGHT_MAP = WeightMap(
    rules=(
        *_SHARED_RULES,
        # layer_norm_q / layer_norm_k
        Rule("encoder.layer.{i}.attention.self.layer_norm_{qk}.{w}",
             "layers.{i}.attention.{qk}_norm.{w}"),
        Rule("encoder.layer.{i}.layer_norm_1.{w}", "layers.{i}.residual_norm.{w}"),
        Rule("encoder.layer.{i}.mlp.up_gated_layer.weight", "layers.{i}.mlp.gate_up.weight"),
        Rule("encoder.layer.{i}.mlp.down_layer.{w}", "layers.{i}.mlp.down.{w}"),
        Rule("encoder.layer.{i}.layer_norm_2.{w}", "layers.{i}.mlp_norm.{w}"),
    ),
    prefixes=_PREFIXES,
    ignore=_IGNORE,
)


class JinaLayer(PostNormLayer):
    """jina-bert-implementation: x = norm(x + attention(x)); x = norm(x + glu(x))."""

    def __init__(self, hidden: int, heads: int, intermediate: int, act: str, eps: float,
                 attention: Attention, mask: MaskSpec) -> None:
        # gated_layers has no bias, wo has one.
        super().__init__(hidden, eps, SelfAttention(hidden, heads, attention, mask=mask),
                         GatedMLP(hidden, intermediate, act, bias=False, down_bias=True))


class QKNormAttention(nn.Module):
    """Self-attention with LayerNorms over the whole q and k projections (all heads together,
    not per head as in SelfAttention's qk_norm): jina-bert-v2-qk-post-norm's attention."""

    def __init__(self, hidden: int, heads: int, eps: float, attention: Attention,
                 mask: MaskSpec) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.fused_rows = {"qkv": (hidden, hidden, hidden)}  # checked at load
        self.q_norm = nn.LayerNorm(hidden, eps=eps)
        self.k_norm = nn.LayerNorm(hidden, eps=eps)
        self.out = nn.Linear(hidden, hidden)
        self.mask = mask
        self.attention = attention  # a plain attribute: no weights, not in state_dict

    def forward(self, x: torch.Tensor, meta: Any) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        shape = (tokens, self.heads, self.head_dim)
        q, k = self.q_norm(q).view(shape), self.k_norm(k).view(shape)
        out = self.attention.attend(q, k, v.reshape(shape), meta, self.mask)
        return self.out(out.reshape(tokens, self.heads * self.head_dim))


class UpGateMLP(GatedMLP):
    """GatedMLP with the fused halves the other way round: up_gated_layer is [up; gate]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.gate_up(x).split(self.intermediate, dim=-1)
        return self.down(self.act(gate) * up)


class JinaCodeLayer(nn.Module):
    """jina-bert-v2-qk-post-norm: a = norm(x + attention(x)); h = norm(x + a);
    x = norm(h + glu(h))."""

    def __init__(self, hidden: int, heads: int, intermediate: int, act: str, eps: float,
                 attention: Attention, mask: MaskSpec) -> None:
        super().__init__()
        self.attention = QKNormAttention(hidden, heads, eps, attention, mask)
        self.attention_norm = nn.LayerNorm(hidden, eps=eps)
        self.residual_norm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = UpGateMLP(hidden, intermediate, act, bias=False, down_bias=True)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor, meta: Any) -> torch.Tensor:
        attended = self.attention_norm(x + self.attention(x, meta))
        # NOTE: the layer input is added a second time, to the attention block's already
        # residual-normed output (layer_norm_1 in jina's code). Not a typo: the model was
        # trained that way.
        x = self.residual_norm(x + attended)
        return self.mlp_norm(x + self.mlp(x))


class _JinaBert(nn.Module):
    """The encoder both variants share; `layer` is the variant's layer class."""

    weight_map: ClassVar[WeightMap]
    heads: ClassVar[FamilyHeads | None] = None
    layer: ClassVar[type[JinaLayer] | type[JinaCodeLayer]]

    def __init__(
        self, *, vocab_size: int, hidden_size: int, num_hidden_layers: int,
        num_attention_heads: int, intermediate_size: int, max_position_embeddings: int,
        type_vocab_size: int, glu_act: str, layer_norm_eps: float, attention: Attention,
    ) -> None:
        super().__init__()
        if num_attention_heads <= 0 or hidden_size % num_attention_heads:
            raise ConfigError(f"config.json: hidden_size {hidden_size} is not divisible by "
                              f"num_attention_heads {num_attention_heads}")
        # Rows of the position table an absolute model would have: here only the sequence
        # limit, since ALiBi has no table.
        self.max_positions = max_position_embeddings
        self.embeddings = WordTypeEmbeddings(vocab_size, type_vocab_size, hidden_size,
                                             layer_norm_eps)
        # One spec for every layer: the padded attention builds each batch's bias once.
        mask = MaskSpec(bias=SymmetricAlibi(tuple(alibi_slopes(num_attention_heads))))
        self.layers = nn.ModuleList(
            self.layer(hidden_size, num_attention_heads, intermediate_size, glu_act,
                       layer_norm_eps, attention, mask)
            for _ in range(num_hidden_layers)
        )

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        refuse_values(config, DECODER_SETTINGS, "JinaBERT")
        # jina's config class defaults to absolute position embeddings; the released models
        # all say alibi, the only kind implemented here.
        position_type = config.get("position_embedding_type", "absolute")
        if position_type != "alibi":
            raise ConfigError(f"config.json: JinaBERT position_embedding_type {position_type!r}"
                              " is not supported (supported: alibi)")
        # No default: jina's two implementations default differently ("original" BERT MLP vs
        # "geglu"), and every released config names it.
        ff_type = config.get("feed_forward_type")
        if not isinstance(ff_type, str) or ff_type not in _GLU_ACTIVATIONS:
            raise ConfigError(f"config.json: JinaBERT feed_forward_type {ff_type!r} is not "
                              f"supported (supported: {', '.join(_GLU_ACTIVATIONS)})")
        with required_keys("JinaBERT"):
            return cls(
                **bert_sizes(config),
                type_vocab_size=int(config.get("type_vocab_size", 2)),
                glu_act=_GLU_ACTIVATIONS[ff_type],
                attention=attention,
            )

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        meta: Any,
    ) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, meta)
        return x


JINA_BERT = Marker("jina-bert-v2", "bert", ("jinaai/jina-bert-implementation",))
JINA_BERT_CODE = Marker("jina-bert-v2-code", "bert", ("jinaai/jina-bert-v2-qk-post-norm",))


@register(markers=(JINA_BERT,))
class JinaBertModel(_JinaBert):
    """jina-embeddings-v2-small-en / -base-en: JinaBertModel's last hidden state, flat."""

    weight_map: ClassVar[WeightMap] = WEIGHT_MAP
    layer = JinaLayer


@register(markers=(JINA_BERT_CODE,))
class JinaCodeBertModel(_JinaBert):
    """jina-embeddings-v2-base-code (qk-post-norm): its last hidden state, flat."""

    weight_map: ClassVar[WeightMap] = CODE_WEIGHT_MAP
    layer = JinaCodeLayer
