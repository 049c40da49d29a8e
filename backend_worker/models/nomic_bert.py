"""NomicBERT (model_type "nomic_bert"): nomic-embed-text-v1 / v1.5, nomic-bert-2048, and
nomic-embed-text-v2-moe (mixture-of-experts MLPs in every other layer).

One architecture, two config spellings. The Hub repos run nomic-ai's own code (auto_map) with a
GPT-2-style config: n_embd, n_head, n_layer, n_inner, n_positions, layer_norm_epsilon,
activation_function, rotary_emb_*, qkv_proj_bias, mlp_fc1_bias, mlp_fc2_bias. transformers 5
implements nomic_bert natively with BERT-style keys (hidden_size, ..., hidden_act,
rope_parameters) and no biases at all. Both write their weights under the Hub names
(transformers renames them at load and back at save); transformers' in-memory names, written by
save_pretrained(save_original_format=False), load too.

What nomic-ai's code can do and this file does not (prenorm, interleaved or xPos rotary, dynamic
NTK scaling, renormalised or gated experts, ...) is refused at start with the setting's name.
"""

from __future__ import annotations

from typing import Any, Self

from backend_worker.attention import Attention
from backend_worker.head_modules import BERT_CLASSIFIER_KEYS, FamilyHeads
from backend_worker.layers import activation, rope_inv_freq
from backend_worker.loading import Rule, WeightMap
from backend_worker.models.config import refusal, refuse_values, required_keys
from backend_worker.models.registry import register
from backend_worker.models.rotary_encoder import EncoderSpec, ExpertsSpec, RotaryEncoder
from shared.errors import ConfigError

FAMILY = "NomicBERT"  # how config errors name it

WEIGHT_MAP = WeightMap(
    rules=(
        # The Hub names (nomic-ai's code; transformers' save_pretrained writes them too).
        Rule("embeddings.word_embeddings.weight", "embeddings.word.weight"),
        Rule("embeddings.token_type_embeddings.weight", "embeddings.token_type.weight"),
        Rule("emb_ln.{w}", "embeddings.norm.{w}"),
        Rule("encoder.layers.{i}.attn.Wqkv.{w}", "layers.{i}.attention.qkv.{w}"),
        Rule("encoder.layers.{i}.attn.out_proj.{w}", "layers.{i}.attention.out.{w}"),
        # Gated MLP: fc11 is the value half, fc12 the activated one (y = fc11(x) * act(fc12(x))).
        Rule("encoder.layers.{i}.mlp.{part}.{w}", "layers.{i}.mlp.gate_up.{w}",
             fuse=("fc12", "fc11")),
        Rule("encoder.layers.{i}.mlp.fc1.{w}", "layers.{i}.mlp.up.{w}"),  # plain (gelu) MLP
        Rule("encoder.layers.{i}.mlp.fc2.{w}", "layers.{i}.mlp.down.{w}"),
        # Mixture-of-experts layers (v2-moe): the router, both experts' blocks, the shared bias.
        Rule("encoder.layers.{i}.mlp.router.layer.weight", "layers.{i}.mlp.router"),
        Rule("encoder.layers.{i}.mlp.experts.mlp.w1", "layers.{i}.mlp.w1"),
        Rule("encoder.layers.{i}.mlp.experts.mlp.w2", "layers.{i}.mlp.w2"),
        Rule("encoder.layers.{i}.mlp.experts.bias", "layers.{i}.mlp.bias"),
        Rule("encoder.layers.{i}.norm1.{w}", "layers.{i}.attention_norm.{w}"),
        Rule("encoder.layers.{i}.norm2.{w}", "layers.{i}.mlp_norm.{w}"),
        # transformers' in-memory names (save_original_format=False).
        Rule("embeddings.LayerNorm.{w}", "embeddings.norm.{w}"),
        Rule("layers.{i}.self_attn.{part}.{w}", "layers.{i}.attention.qkv.{w}",
             fuse=("q_proj", "k_proj", "v_proj")),
        Rule("layers.{i}.self_attn.o_proj.{w}", "layers.{i}.attention.out.{w}"),
        Rule("layers.{i}.mlp.{part}.{w}", "layers.{i}.mlp.gate_up.{w}",
             fuse=("gate_proj", "up_proj")),
        Rule("layers.{i}.mlp.down_proj.{w}", "layers.{i}.mlp.down.{w}"),
        Rule("layers.{i}.post_attention_layernorm.{w}", "layers.{i}.attention_norm.{w}"),
        Rule("layers.{i}.post_mlp_layernorm.{w}", "layers.{i}.mlp_norm.{w}"),
    ),
    # nomic-ai's NomicBertFor* keep the encoder under "bert.", transformers' under "nomic_bert.".
    prefixes=("bert.", "nomic_bert."),
    ignore=(
        # Heads: backend_worker/heads.py loads the classifier's when it is served.
        r"pooler\..*",
        r"classifier\..*",
        r"cls\..*",
    ),
)

# Both codes build the sequence classifier as BERT does: classifier(tanh(pooler(h[CLS]))).
HEADS = FamilyHeads(
    encoder=WEIGHT_MAP,
    classifier=BERT_CLASSIFIER_KEYS,
)

# nomic-ai's activation_function -> (activation, gated). Its code runs "glu" as
# fc11(x) * sigmoid(fc12(x)) and "geglu"/"gelu" with the exact (erf) GELU.
_HUB_MLPS = {"swiglu": ("silu", True), "geglu": ("gelu", True), "glu": ("sigmoid", True),
             "gelu": ("gelu", False)}
# nomic-ai's code rounds a gated MLP's width up to a multiple of this (NomciBertGatedMLP).
_GATED_MULTIPLE = 256
# Hub settings whose non-default value this implementation would silently compute differently.
_HUB_UNSUPPORTED: dict[str, Any] = {
    "prenorm": True, "causal": True, "parallel_block": True, "use_rms_norm": True,
    "rotary_emb_interleaved": True,
}


def _experts(config: dict[str, Any], gated: bool) -> ExpertsSpec | None:
    """nomic-embed-text-v2-moe's experts (moe_every_n_layers 2, 8 experts, top 2), if any."""
    every = int(config.get("moe_every_n_layers") or 0)
    if every <= 0:
        return None  # as nomic-ai's code: no expert layers, whatever num_experts says
    count, top_k = config["num_experts"], config["moe_top_k"]
    if not (isinstance(count, int) and isinstance(top_k, int)):
        raise ConfigError(f"config.json: num_experts ({count!r}) and moe_top_k ({top_k!r}) must "
                          f"be integers when moe_every_n_layers is {every}")
    if not 1 <= top_k <= count:
        raise ConfigError(f"config.json: moe_top_k={top_k} must be between 1 and num_experts="
                          f"{count}")
    if config.get("moe_normalize_expert_weights"):
        raise refusal(FAMILY, "moe_normalize_expert_weights="
                              f"{config['moe_normalize_expert_weights']!r} (renormalised expert "
                              "weights)")
    if gated:
        raise refusal(FAMILY, f"mixture-of-experts layers with activation_function "
                              f"{config.get('activation_function')!r} (gated experts)")
    return ExpertsSpec(every=every, count=count, top_k=top_k)


def _hub_spec(config: dict[str, Any]) -> EncoderSpec:
    """nomic-ai's GPT2Config-based spelling (defaults are its NomicBertConfig's)."""
    refuse_values(config, _HUB_UNSUPPORTED, FAMILY)
    if config.get("rotary_emb_scale_base") is not None:
        raise refusal(FAMILY,
                      f"rotary_emb_scale_base={config['rotary_emb_scale_base']!r} (xPos)")
    hidden, heads = int(config["n_embd"]), int(config["n_head"])
    if hidden % heads:
        raise ConfigError(f"config.json: n_embd {hidden} is not divisible by n_head {heads}")
    if config.get("num_heads_kv") not in (None, heads):
        raise refusal(FAMILY, f"num_heads_kv={config['num_heads_kv']!r} != n_head")
    positions = int(config.get("n_positions", 1024))
    trained = int(config.get("max_trained_positions", 2048))
    factor = config.get("rotary_scaling_factor", 1.0)
    if factor and positions > trained:
        # nomic-ai's dynamic NTK rotary changes its frequencies when the *padded batch* is
        # longer than max_trained_positions, and keeps them changed for later batches: no
        # batch-invariant server computes that. Below max_trained_positions it is inactive.
        raise refusal(FAMILY, f"rotary_scaling_factor={factor!r} and n_positions={positions} > "
                              f"max_trained_positions={trained} (dynamic NTK rotary scaling); set "
                              "rotary_scaling_factor to null, or n_positions to at most "
                              f"{trained}")
    head_dim = hidden // heads
    fraction = float(config.get("rotary_emb_fraction", 0.0))
    rotary_dim = head_dim * fraction
    if not 0 < fraction <= 1 or rotary_dim != int(rotary_dim) or int(rotary_dim) % 2:
        raise refusal(FAMILY, f"rotary_emb_fraction={fraction!r} (head size {head_dim}: the "
                              "rotary part must be a positive even number of features; learned "
                              "absolute positions, fraction 0, are not implemented)")
    name = str(config.get("activation_function", "gelu_new"))
    if name not in _HUB_MLPS:
        raise ConfigError(f"config.json: NomicBERT activation_function {name!r} is not "
                          f"supported (supported: {', '.join(sorted(_HUB_MLPS))})")
    act, gated = _HUB_MLPS[name]
    inner = config.get("n_inner")
    if gated:
        width = int(inner) if inner is not None else int(8 * hidden / 3)
        intermediate = -(-width // _GATED_MULTIPLE) * _GATED_MULTIPLE
    else:
        intermediate = int(inner) if inner is not None else 4 * hidden
    vocab = int(config["vocab_size"])
    multiple = int(config.get("pad_vocab_size_multiple", 1))
    vocab = -(-vocab // multiple) * multiple  # nomic-ai's model pads the table like this
    qkv_bias = bool(config.get("qkv_proj_bias", True))
    return EncoderSpec(
        vocab_size=vocab, hidden_size=hidden, num_layers=int(config["n_layer"]),
        num_heads=heads, head_dim=head_dim, intermediate_size=intermediate,
        max_positions=positions, type_vocab_size=int(config.get("type_vocab_size", 2)),
        eps=float(config.get("layer_norm_epsilon", 1e-5)),
        inv_freq=rope_inv_freq(int(rotary_dim), float(config.get("rotary_emb_base", 1000))),
        act=act, gated=gated, qkv_bias=qkv_bias, out_bias=qkv_bias,
        up_bias=bool(config.get("mlp_fc1_bias", True)),
        down_bias=bool(config.get("mlp_fc2_bias", True)),
        experts=_experts(config, gated),
    )


def _native_spec(config: dict[str, Any]) -> EncoderSpec:
    """transformers' NomicBertConfig: no biases, gated MLP, rotary over the whole head."""
    # transformers takes a legacy rope_scaling in place of rope_parameters, its "type" as
    # rope_type.
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise refusal(FAMILY, f"rope_parameters rope_type {rope_type!r} (supported: default)")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    act = str(config.get("hidden_act", "silu"))
    activation(act, where="config.json: hidden_act")
    theta = rope.get("rope_theta", config.get("rope_theta", 1000.0))  # transformers' default
    return EncoderSpec(
        vocab_size=int(config["vocab_size"]), hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]), num_heads=heads, head_dim=head_dim,
        intermediate_size=int(config["intermediate_size"]),
        max_positions=int(config.get("max_position_embeddings", 2048)),
        type_vocab_size=int(config.get("type_vocab_size", 2)),
        eps=float(config.get("layer_norm_eps", 1e-12)),
        inv_freq=rope_inv_freq(head_dim, float(theta)), act=act, gated=True,
    )


@register(model_types=("nomic_bert",))
class NomicBertModel(RotaryEncoder):
    weight_map = WEIGHT_MAP
    heads = HEADS

    @classmethod
    def from_config(cls, config: dict[str, Any], attention: Attention) -> Self:
        # n_embd only exists in nomic-ai's spelling (its GPT2Config maps hidden_size onto it).
        parse = _hub_spec if "n_embd" in config else _native_spec
        with required_keys(FAMILY):
            return cls(parse(config), attention)
