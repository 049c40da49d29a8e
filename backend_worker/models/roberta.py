"""RoBERTa, XLM-RoBERTa and CamemBERT (model_types "roberta", "xlm-roberta", "camembert").

The encoder is BERT's, layer for layer; what differs is around it:
- positions start after the padding index (fairseq's convention): position ids are
  pad_token_id + 1 + i, which the router adds (shared/model_limits.py POSITION_OFFSET_MODEL_TYPES),
  so the position table has pad_token_id + 1 more rows than the longest input;
- one token type (type_vocab_size 1): the tokenizers of these families give type 0 to both
  segments of a pair;
- checkpoints nest the encoder in "roberta." (all three families), the classifier is
  dense -> tanh -> out_proj on <s>, and the MLM head is `lm_head` (dense, gelu, layer_norm,
  decoder tied to the word embeddings, bias).
"""

from __future__ import annotations

from typing import Any, ClassVar

from backend_worker.head_modules import Either, FamilyHeads, HeadKeys, SpladeHead
from backend_worker.loading import Rule, WeightMap
from backend_worker.models import bert
from backend_worker.models.registry import register

WEIGHT_MAP = WeightMap(
    rules=bert.WEIGHT_MAP.rules,
    # *ForSequenceClassification / *ForMaskedLM of all three families use "roberta.".
    prefixes=("roberta.",),
    ignore=(
        r"embeddings\.position_ids",  # a buffer older transformers saved
        # Heads: backend_worker/heads.py loads them when the model serves them (HEADS below).
        r"pooler\..*",
        r"classifier\..*",
        r"lm_head\..*",
        r"qa_outputs\..*",  # *ForQuestionAnswering: its encoder is served, as AutoModel loads it
    ),
)


def _lm_head(config: dict[str, Any], hidden: int, vocab: int) -> SpladeHead:
    # NOTE: RobertaLMHead applies the exact (erf) gelu whatever the config's hidden_act says.
    return SpladeHead(hidden, vocab, "gelu", float(config.get("layer_norm_eps", 1e-12)))


HEADS = FamilyHeads(
    encoder=WEIGHT_MAP,
    # RobertaClassificationHead is BERT's pooler + classifier under other names:
    # out_proj(tanh(dense(h[<s>]))).
    classifier=HeadKeys(
        rules=(Rule("classifier.dense.{w}", "pooler.{w}"),
               Rule("classifier.out_proj.{w}", "classifier.{w}")),
        owns=(r"classifier\.",),
    ),
    mlm=HeadKeys(
        rules=(Rule("lm_head.dense.{w}", "dense.{w}"),
               Rule("lm_head.layer_norm.{w}", "norm.{w}")),
        owns=(r"lm_head\.",),
    ),
    mlm_tied=(
        Either(Rule("lm_head.decoder.weight", "decoder.weight"),
               Rule("embeddings.word_embeddings.weight", "decoder.weight")),
        # Tied, transformers makes decoder.bias the very tensor lm_head.bias and saves only the
        # latter; untied, it saves both and the decoder's own bias is the one applied.
        Either(Rule("lm_head.decoder.bias", "decoder.bias"),
               Rule("lm_head.bias", "decoder.bias"), per_config=False),  # v4: see bert.py
    ),
    make_mlm=_lm_head,
)


@register(model_types=("roberta", "xlm-roberta", "camembert"))
class RobertaModel(bert.BertModel):
    """RobertaModel's last hidden state, flat: BERT's computation on offset position ids."""

    weight_map: ClassVar[WeightMap] = WEIGHT_MAP
    heads: ClassVar[FamilyHeads | None] = HEADS
    family: ClassVar[str] = "RoBERTa"
