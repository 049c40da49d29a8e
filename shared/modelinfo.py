"""What a model is: everything the router and the worker need to know, read from its files.

Parses config.json and the sentence-transformers files (modules.json (its module list:
shared/st_pipeline.py), 1_Pooling, Dense modules (shared/st_modules.py), Normalize, a LogitScore
(shared/logit_score.py), SparseEncoder's modules (shared/sparse_encoder.py,
shared/sparse_router.py, shared/sparse_autoencoder.py), sentence_bert_config.json,
config_sentence_transformers.json) in both the classic format and the one sentence-transformers 6
writes; a StaticEmbedding (shared/static_embedding.py); BGE-M3's lexical weights
(shared/lexical.py). Pure data: no torch, no tokenizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from shared.classifier import ModelKind, ScoreActivation, model_kind_of, score_activation
from shared.conversations import Conversations, read_conversations
from shared.errors import ConfigError
from shared.lexical import LexicalWeights, lexical_weights
from shared.logit_score import LogitScore
from shared.model_limits import (
    HIDDEN_SIZE_KEYS,
    config_value,
    first_position,
    max_input_length,
    read_truncate_dim,
)
from shared.sparse_autoencoder import CsrSpec, check_csr, csr_pipeline
from shared.sparse_encoder import SpladeSpec, sparse_pipeline
from shared.sparse_router import QueryRoute
from shared.st_modules import (
    POOLINGS,
    DenseSpec,
    check_transformer_kwargs,
    optional_json,
    read_json,
    transformer_settings_file,
)
from shared.st_pipeline import ModelFiles, Pipeline, locate_model_files, read_pipeline
from shared.static_embedding import NO_LENGTH_LIMIT, static_config, tokenizer_truncation
from shared.tokenizer_class import require_fast_tokenizer

log = logging.getLogger(__name__)

class ModelInfo(msgspec.Struct, frozen=True):
    """The facts of one model directory, shared by router and worker."""

    model_dir: str
    config: dict[str, Any]
    model_type: str
    architectures: list[str]
    hidden_size: int
    vocab_size: int
    max_input_length: int
    position_offset: int
    pooling: str | None
    dense: list[DenseSpec]
    has_normalize: bool
    prompts: dict[str, str]
    default_prompt_name: str | None
    lowercase: bool = False  # texts are lower-cased before tokenizing (do_lower_case)
    # A *ForSequenceClassification model is a classifier, or a re-ranker when it has one label.
    kind: ModelKind = "embedding"
    id2label: dict[str, str] = {}
    # How scores are squashed unless a request asks for raw scores (sentence-transformers'
    # CrossEncoder rule): the config's activation, else sigmoid for one label or a multi-label
    # model, softmax for more (shared/classifier.py's score_activation).
    activation: ScoreActivation = "softmax"
    # A causal LM re-ranker: the pair's score is two of its next-token logits (LogitScore).
    logit_score: LogitScore | None = None
    # Inputs written as chat conversations (a CrossEncoder whose Transformer takes messages).
    conversations: Conversations | None = None
    # A static model (StaticEmbedding): the id an input without tokens is sent as, one past the
    # vocabulary, a zero row in the worker's table, so that its mean is the empty bag's zeros
    # and no sequence of zero tokens ever reaches the engine. None for every other model.
    empty_bag_id: int | None = None
    # A static model's tokenizer.json truncation side ("right" / "left"), where it sets one.
    truncation_side: str | None = None
    # How a SPLADE model's token logits become its vector (a SpladePooling module's settings).
    splade_spec: SpladeSpec = SpladeSpec()
    # An inference-free SPLADE model's query route (a Router), which the router computes.
    query_route: QueryRoute | None = None
    # BGE-M3's lexical weights: sparse vectors beside the dense ones (shared/lexical.py).
    lexical: LexicalWeights | None = None
    # A CSR SparseEncoder's SparseAutoEncoder: its vectors are the pooled embedding's sparse code.
    csr: CsrSpec | None = None
    # config_sentence_transformers.json's truncate_dim: SentenceTransformer.encode cuts its
    # vectors to this many dimensions unless asked for another width (output_dim).
    truncate_dim: int | None = None
    # The Pooling module counts the prompt's tokens (include_prompt); false: pooling starts
    # after them (router/prompt_exclusion.py).
    include_prompt: bool = True

    @property
    def length_unlimited(self) -> bool:
        """sentence-transformers takes inputs of any length (StaticEmbedding without a
        truncating tokenizer.json): the server's batch budget is the only limit."""
        return self.max_input_length >= NO_LENGTH_LIMIT

    @property
    def input_id_rows(self) -> int:
        """Ids the worker's table has rows for (the empty bag's row included)."""
        return self.vocab_size + (self.empty_bag_id is not None)

    @property
    def splade(self) -> bool:
        return self.pooling == "splade"

    @property
    def sparse_vectors(self) -> str | None:
        """What /embed_sparse gives (/info's sparse_vectors); None: it is refused."""
        if self.lexical is not None:
            return "lexical_weights"
        if self.query_route is not None:
            return "splade_inference_free"
        if self.splade:
            return "splade"
        return "csr" if self.csr is not None else None

    @property
    def embedding_dim(self) -> int:
        if self.splade:  # one weight per vocabulary entry
            return self.vocab_size
        if self.csr is not None:
            return self.csr.hidden_dim
        return self.dense[-1].out_features if self.dense else self.hidden_size

    @property
    def output_dim(self) -> int:
        """The width of the vectors served by default (SentenceTransformer's
        get_embedding_dimension): embedding_dim, cut to truncate_dim when the model sets one."""
        if self.truncate_dim is None:
            return self.embedding_dim
        return min(self.embedding_dim, self.truncate_dim)

    @property
    def tokenizer_path(self) -> Path:
        return Path(self.model_dir) / "tokenizer.json"


def load_model_info(
    model_dir: str | Path,
    pooling_override: str | None = None,
    dense_path: str | None = None,
) -> ModelInfo:
    """Read a model directory. Raises ConfigError with a precise message on anything unusable."""
    # NOTE: tests assert which error wins where several apply: keep the steps in this order.
    root = Path(model_dir)
    _refuse_decision_model(root)
    files = locate_model_files(root)
    base = _read_base(files)
    st_file = optional_json(root / "config_sentence_transformers.json") or {}
    sparse_pipeline(root, files.kinds, base.transformer)  # (refuses its modules anywhere else)
    csr_pipeline(root, files.kinds)  # (the same for a SparseAutoEncoder)
    pipeline = read_pipeline(files, base.config, base.transformer, st_file, pooling_override,
                             dense_path)
    head = _head(files, base, pipeline, pooling_override)
    settings = _st_settings(files, st_file, head, pipeline)
    hidden_size = _hidden_size(root, base.config, pipeline.dense)
    if pipeline.csr is not None:
        check_csr(pipeline.csr, root, hidden_size=hidden_size, kind=head.kind,
                  pooling_override=pooling_override, dense_path=dense_path)
    conversations = _conversations(files, base, head.kind)
    return _model_info(files, base, pipeline, head, settings, hidden_size, conversations)


@dataclass(frozen=True)
class _Base:
    """config.json's facts and the Transformer module's settings."""

    config: dict[str, Any]
    model_type: str
    position_offset: int
    transformer: dict[str, Any]  # sentence_bert_config.json (read by several checks)
    settings_file: Path  # the file `transformer` was read from (or would be)


@dataclass(frozen=True)
class _Head:
    """What the model's output is: its kind, labels and pooling."""

    kind: ModelKind
    id2label: dict[str, str]
    pooling: str | None


@dataclass(frozen=True)
class _StSettings:
    """config_sentence_transformers.json as the model's class reads it."""

    st_config: dict[str, Any]  # {} where the class leaves the file unread
    prompts: dict[str, str]
    default_prompt_name: str | None
    truncate_dim: int | None


def _refuse_decision_model(root: Path) -> None:
    if (root / "rl_agent_config.json").is_file():
        # (Laya keeps its encoder's config.json in a folder of its own: this comes first.)
        raise ConfigError(f"{root}: a structured decision model (rl_agent_config.json, TEI's "
                          "/v1/decide, e.g. Laya) is not supported")


def _read_base(files: ModelFiles) -> _Base:
    static_dir, layout, model_dir = files.static_dir, files.layout, files.model_dir
    config = static_config(static_dir) if static_dir else read_json(model_dir / "config.json")
    require_fast_tokenizer(model_dir)
    model_type = str(config.get("model_type", ""))
    position_offset = first_position(config, model_type, files.root)
    # (a Router's document route: the settings parse_router read, from the same folder)
    settings_file, transformer = transformer_settings_file(layout.transformer_dir if layout
                                                           else files.root)
    if files.modules and not static_dir:  # (sentence-transformers reads it only with modules.json)
        check_transformer_kwargs(transformer, settings_file)
    return _Base(config=config, model_type=model_type, position_offset=position_offset,
                 transformer=transformer, settings_file=settings_file)


def _head(files: ModelFiles, base: _Base, pipeline: Pipeline,
          pooling_override: str | None) -> _Head:
    model_kind, id2label = model_kind_of(base.config)
    if pipeline.logit_score is not None:
        model_kind, id2label = "reranker", {"0": "LABEL_0"}
    pooling = _pooling(files, base, pipeline.pooling, model_kind, pooling_override)
    return _Head(kind=model_kind, id2label=id2label, pooling=pooling)


def _pooling(files: ModelFiles, base: _Base, pooling: str | None, model_kind: ModelKind,
             pooling_override: str | None) -> str | None:
    """The pooling served: the modules', unless overridden, or a fallback where none is set."""
    root, config, model_type = files.root, base.config, base.model_type
    if files.static_dir:
        if pooling_override not in (None, "mean"):
            raise ConfigError(f"--pooling {pooling_override!r}: a StaticEmbedding model "
                              "averages its token rows; only mean pooling reproduces it")
        pooling = "mean"  # the bag's mean, computed by the worker's mean pooling
    elif pooling_override is not None:
        if pooling_override not in POOLINGS:
            raise ConfigError(f"--pooling {pooling_override!r}: choose one of {POOLINGS}")
        pooling = pooling_override
    elif pooling is None and model_kind != "embedding":
        # A classifier's head pools by itself and the worker offers it no pooled output; the
        # Engine's Pooler still needs a mode: CLS, as TEI serves every classifier.
        pooling = "cls"
    elif pooling is None and config.get("emb_pooler") is not None:
        # JinaBERT v2 names its pooling in config.json (emb_pooler "mean": what its own encode()
        # applies). Without a 1_Pooling file that states the model's intent better than CLS.
        pooling = str(config["emb_pooler"])
        if pooling not in POOLINGS:
            raise ConfigError(f"{root}/config.json: emb_pooler {pooling!r} is not supported "
                              f"(supported: {', '.join(POOLINGS)}); pass --pooling to override")
    elif pooling is None and "bert" in model_type.lower():
        # TEI's rule: a BERT variant without 1_Pooling is served with CLS pooling.
        log.warning("no pooling configuration (1_Pooling/config.json) found; the model is "
                    "a BERT variant, defaulting to cls pooling as TEI does (sentence-transformers "
                    "would pool the mean here: pass --pooling mean for its vectors)")
        pooling = "cls"
    return pooling


def _st_settings(files: ModelFiles, st_file: dict[str, Any], head: _Head,
                 pipeline: Pipeline) -> _StSettings:
    root, modules, model_kind = files.root, files.modules, head.kind
    st_config = st_file
    if model_kind != "embedding" and (
            not modules or st_config.get("model_type", "SentenceTransformer") != "CrossEncoder"):
        # CrossEncoder reads this file (its prompts, default_prompt_name, activation_fn) only
        # from its own save: with modules.json, and "CrossEncoder" as the file's model_type
        # (another is converted, the file left unread).
        st_config = {}
    # A prompt saved as null is "", as sentence-transformers reads it (_validate_prompts).
    prompts = {str(k): "" if v is None else str(v)
               for k, v in (st_config.get("prompts") or {}).items()}
    default_prompt_name = st_config.get("default_prompt_name")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ConfigError(
            f"{root}/config_sentence_transformers.json: default_prompt_name "
            f"{default_prompt_name!r} is not one of the prompts {sorted(prompts)}"
        )

    # (SentenceTransformer reads it only from its own save, with modules.json; prompts, which
    # TEI reads from this file either way, are read either way too.) Sparse encoders have none.
    truncate_dim = (read_truncate_dim(st_config, root)
                    if modules and model_kind == "embedding" and head.pooling != "splade"
                    and pipeline.csr is None else None)
    return _StSettings(st_config=st_config, prompts=prompts,
                       default_prompt_name=default_prompt_name, truncate_dim=truncate_dim)


def _hidden_size(root: Path, config: dict[str, Any], dense: list[DenseSpec]) -> int:
    """config.json's hidden size, checked against the Dense modules' chain of widths."""
    hidden_size = config_value(config, HIDDEN_SIZE_KEYS)
    if hidden_size <= 0:
        raise ConfigError(f"{root}/config.json: no hidden_size")
    expected_in = hidden_size
    for spec in dense:
        if spec.in_features != expected_in:
            raise ConfigError(
                f"{spec.path}: Dense expects {spec.in_features} features, gets {expected_in}"
            )
        expected_in = spec.out_features
    return hidden_size


def _conversations(files: ModelFiles, base: _Base, model_kind: ModelKind) -> Conversations | None:
    # Where the Transformer module declares messages (its settings file).
    root = files.root
    conversations = (read_conversations(root, base.transformer, base.model_type,
                                        base.config.get("tokenizer_class"))
                     if files.modules else None)
    if conversations is not None and model_kind == "embedding":
        raise ConfigError(f"{base.settings_file}: an embedding model whose "
                          "Transformer module takes messages (chat conversations) is not "
                          "supported")
    return conversations


def _model_info(files: ModelFiles, base: _Base, pipeline: Pipeline, head: _Head,
                settings: _StSettings, hidden_size: int,
                conversations: Conversations | None) -> ModelInfo:
    modules, static_dir, model_dir = files.modules, files.static_dir, files.model_dir
    config, model_type, transformer = base.config, base.model_type, base.transformer
    model_kind, pooling, csr = head.kind, head.pooling, pipeline.csr
    # The Transformer module's do_lower_case: sentence-transformers lower-cases every text (a
    # cased tokenizer, or one it lower-cases anyway) before tokenizing. Without modules.json it
    # builds that module itself, and does not read this file.
    lowercase = bool(modules) and not static_dir and bool(transformer.get("do_lower_case"))
    # A static model's length limit and cut side are its tokenizer file's own truncation.
    file_limit, file_side = tokenizer_truncation(model_dir) if static_dir else (0, None)
    return ModelInfo(
        kind=model_kind,
        id2label=head.id2label,
        activation=score_activation(config, len(head.id2label),
                                    settings.st_config if modules else {}),
        model_dir=str(model_dir),
        config=config,
        model_type=model_type,
        architectures=list(config.get("architectures") or []),
        hidden_size=hidden_size,
        vocab_size=int(config.get("vocab_size", 0)),
        max_input_length=(file_limit if static_dir else
                          # (without modules.json, sentence-transformers reads no
                          # sentence_bert_config.json: the tokenizer's limit holds)
                          max_input_length(model_dir, config, base.position_offset,
                                            transformer if modules else {})),
        position_offset=base.position_offset,
        pooling=pooling,
        dense=pipeline.dense,
        has_normalize=pipeline.has_normalize,
        prompts=settings.prompts,
        default_prompt_name=settings.default_prompt_name,
        lowercase=lowercase,
        logit_score=pipeline.logit_score,
        conversations=conversations,
        empty_bag_id=int(config["vocab_size"]) if static_dir else None,
        truncation_side=file_side,
        splade_spec=pipeline.splade_spec if pooling == "splade" else SpladeSpec(),
        query_route=files.layout.route if files.layout else None,
        lexical=(lexical_weights(model_dir, model_type, config.get("tokenizer_class"))
                 if model_kind == "embedding" and pooling != "splade" and csr is None
                 and not static_dir else None),
        csr=csr,
        truncate_dim=settings.truncate_dim,
        include_prompt=pipeline.include_prompt,
    )
