"""The model zoo: one module per architecture family, registered by decorator.

Importing this package imports every family, which is what fills the registry.
"""

# Each import registers its family (the names themselves are not used here).
from backend_worker.models import (  # noqa: F401
    albert,
    bert,
    deberta_v2,
    decoder,  # qwen2, qwen3, mistral, llama
    distilbert,
    electra,
    gemma2,
    gemma3,  # gemma3_text
    gte,  # model_types new and gte
    jina,  # by auto_map marker, before plain BERT
    modernbert,
    mpnet,
    nomic_bert,
    roberta,
    static_embedding,  # sentence-transformers' StaticEmbedding (and model2vec's files)
    t5,  # the encoder of t5 and mt5
)
from backend_worker.models.registry import EncoderModel, model_class, supported

__all__ = ["EncoderModel", "model_class", "supported"]
