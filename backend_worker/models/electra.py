"""ELECTRA (model_type "electra"): BERT's encoder behind embeddings of their own width.

- The embeddings (word + position + token type, then LayerNorm) are `embedding_size` wide and
  projected to the hidden size by `embeddings_project` where the two differ (ElectraConfig's
  default embedding_size is 128).
- Checkpoints nest the encoder in "electra."; ElectraForPreTraining's discriminator head,
  ElectraForMaskedLM's generator head and the token-classification, question-answering and
  multiple-choice heads are dropped, as sentence-transformers drops them when it loads the
  encoder (no SPLADE from the generator: TEI does not serve ELECTRA at all).
- The classifier (ElectraForSequenceClassification, cross-encoder/ms-marco-electra-base) is
  out_proj(gelu(dense(h[CLS]))): BERT's pooler and classifier with the exact gelu for tanh.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from backend_worker.attention import Attention
from backend_worker.head_modules import ClassifierHead, FamilyHeads, HeadKeys
from backend_worker.layers import FactorizedEmbeddings
from backend_worker.loading import Rule, WeightMap
from backend_worker.models import bert
from backend_worker.models.registry import register

WEIGHT_MAP = WeightMap(
    rules=(*bert.WEIGHT_MAP.rules,
           Rule("embeddings_project.{w}", "embeddings.project.{w}")),
    prefixes=("electra.",),
    normalize=bert.TF_LAYER_NORM_NAMES,
    ignore=(
        r"embeddings\.position_ids",  # a buffer older transformers saved
        # backend_worker/heads.py loads it when the model serves it; a token classifier's and
        # a multiple-choice model's classifier (with its sequence_summary) are dropped.
        r"classifier\..*",
        r"discriminator_predictions\..*",
        r"generator_predictions\..*",
        r"generator_lm_head\..*",
        r"qa_outputs\..*",
        r"sequence_summary\..*",
    ),
)


def _classifier(config: dict[str, Any], hidden: int, labels: int) -> nn.Module:
    # ElectraClassificationHead's activation is get_activation("gelu") whatever hidden_act says.
    return ClassifierHead(hidden, labels, "gelu")


HEADS = FamilyHeads(
    encoder=WEIGHT_MAP,
    classifier=HeadKeys(
        rules=(Rule("classifier.dense.{w}", "pooler.{w}"),
               Rule("classifier.out_proj.{w}", "classifier.{w}")),
        owns=(r"classifier\.",),
    ),
    make_classifier=_classifier,
)


@register(model_types=("electra",))
class ElectraModel(bert.BertModel):
    """ElectraModel's last hidden state, flat."""

    weight_map: ClassVar[WeightMap] = WEIGHT_MAP
    heads: ClassVar[FamilyHeads | None] = HEADS
    family: ClassVar[str] = "ELECTRA"

    def __init__(self, *, embedding_size: int, vocab_size: int, hidden_size: int,
                 max_position_embeddings: int, type_vocab_size: int, layer_norm_eps: float,
                 attention: Attention, **layers: Any) -> None:
        super().__init__(vocab_size=vocab_size, hidden_size=hidden_size,
                         max_position_embeddings=max_position_embeddings,
                         type_vocab_size=type_vocab_size, layer_norm_eps=layer_norm_eps,
                         attention=attention, **layers)
        # In place of BERT's (built on the meta device: nothing was allocated for it).
        self.embeddings = FactorizedEmbeddings(  # type: ignore[assignment]
            vocab_size, max_position_embeddings, type_vocab_size, embedding_size, hidden_size,
            layer_norm_eps, always_project=False)

    @classmethod
    def more_sizes(cls, config: dict[str, Any]) -> dict[str, Any]:
        return {"embedding_size": int(config.get("embedding_size", 128))}
