"""What a model is: everything the router and the worker need to know, read from its files.

Parses config.json and the sentence-transformers files (modules.json, 1_Pooling, Dense modules
(shared/st_modules.py), Normalize, a LogitScore (shared/logit_score.py), SparseEncoder's modules
(shared/sparse_encoder.py, shared/sparse_router.py, shared/sparse_autoencoder.py),
sentence_bert_config.json, config_sentence_transformers.json) in both the classic format and the
one sentence-transformers 6 writes; a StaticEmbedding (shared/static_embedding.py); BGE-M3's
lexical weights (shared/lexical.py). Pure data: no torch, no tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec

from shared.classifier import ModelKind, ScoreActivation, model_kind_of, score_activation
from shared.conversations import Conversations, read_conversations
from shared.errors import ConfigError
from shared.lexical import LexicalWeights, lexical_weights
from shared.logit_score import LogitScore, parse_logit_score
from shared.model_limits import (
    HIDDEN_SIZE_KEYS,
    config_value,
    first_position,
    max_input_length,
    read_truncate_dim,
)
from shared.sparse_autoencoder import (
    SPARSE_AUTO_ENCODER,
    CsrSpec,
    check_csr,
    csr_pipeline,
    parse_sparse_autoencoder,
)
from shared.sparse_encoder import (
    MLM_TRANSFORMER,
    SPLADE_POOLING,
    SpladeSpec,
    parse_splade_pooling,
    sparse_pipeline,
)
from shared.sparse_router import ROUTER, QueryRoute, parse_router
from shared.st_modules import (
    POOLINGS,
    DenseSpec,
    builtin_module,
    check_transformer_kwargs,
    on_sentence_embedding,
    optional_json,
    parse_dense,
    parse_pooling_config,
    read_json,
    transformer_file,
    transformer_settings,
)
from shared.static_embedding import (
    NO_LENGTH_LIMIT,
    static_config,
    static_module_dir,
    tokenizer_truncation,
)
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


# The order the worker computes a sentence-transformers pipeline in (Dense may repeat).
_PIPELINE_ORDER = {"Transformer": 0, "StaticEmbedding": 0, "Pooling": 1, "Dense": 2,
                   "Normalize": 3, "LogitScore": 4}


def load_model_info(
    model_dir: str | Path,
    pooling_override: str | None = None,
    dense_path: str | None = None,
) -> ModelInfo:
    """Read a model directory. Raises ConfigError with a precise message on anything unusable."""
    root = Path(model_dir)
    if (root / "rl_agent_config.json").is_file():
        # (Laya keeps its encoder's config.json in a folder of its own: this comes first.)
        raise ConfigError(f"{root}: a structured decision model (rl_agent_config.json, TEI's "
                          "/v1/decide, e.g. Laya) is not supported")
    modules = optional_json(root / "modules.json") or []
    kinds = [builtin_module(root / "modules.json", str(module["type"])) for module in modules]
    # A StaticEmbedding's folder holds its tokenizer.json and table: the worker's weights and
    # the router's tokenizer are read there (model_dir), the other modules from the root.
    static_dir = static_module_dir(root, modules, kinds)
    # An inference-free SPLADE model's document route: its Transformer's folder is the model's.
    if ROUTER in kinds and len(kinds) != 1:  # (before its files are looked for)
        raise ConfigError(f"{root}/modules.json: a Router must be the only module ({kinds})")
    layout = parse_router(root) if ROUTER in kinds else None
    for module, kind in zip(modules, kinds, strict=True):
        if kind in ("Transformer", MLM_TRANSFORMER) and (
                (root / module.get("path", "")).resolve() != root.resolve()):
            # Older repositories keep the transformer in a folder of its own (0_BERT/,
            # 0_Transformer/): its config.json and weights are the model's, not the root's.
            raise ConfigError(
                f"{root}/modules.json: the Transformer module is in {module['path']!r}, not at "
                "the model's root; that layout is not supported (move its files to the root "
                "and its path to \"\")")
    model_dir = static_dir or (layout.transformer_dir if layout else root)
    for folder in dict.fromkeys((root, model_dir)):
        if (folder / "adapter_config.json").is_file():
            # transformers (with peft installed) loads the adapter's base model and applies
            # it: served without it, the vectors would be the base model's, silently.
            raise ConfigError(f"{folder}: a PEFT adapter (adapter_config.json) is not applied "
                              "here; merge it into its base model (peft's merge_and_unload, "
                              "then save_pretrained) and serve the merged model")
    config = static_config(static_dir) if static_dir else read_json(model_dir / "config.json")
    require_fast_tokenizer(model_dir)
    model_type = str(config.get("model_type", ""))
    position_offset = first_position(config, model_type, root)

    pooling: str | None = None
    include_prompt = True
    dense: list[DenseSpec] = []
    has_normalize = False
    logit_score: LogitScore | None = None
    splade_spec = SpladeSpec()
    # The Transformer module's settings (read by several of the checks below).
    transformer = layout.transformer if layout else transformer_settings(root)
    if modules and not static_dir:  # (sentence-transformers reads it only with modules.json)
        check_transformer_kwargs(transformer, transformer_file(layout.transformer_dir
                                                               if layout else root))
    st_file = optional_json(root / "config_sentence_transformers.json") or {}
    sparse_pipeline(root, kinds, transformer)  # (refuses its modules anywhere else)
    csr_pipeline(root, kinds)  # (the same for a SparseAutoEncoder)
    csr: CsrSpec | None = None
    previous = ""  # the module before, in the list's order (sentence-transformers ignores idx)
    for index, (module, kind) in enumerate(zip(modules, kinds, strict=True)):
        path = root / module.get("path", "")
        if static_dir and index > 0 and kind not in ("Dense", "Normalize"):
            # StaticEmbedding's output is already the sentence embedding (the bag's mean).
            raise ConfigError(f"{root}/modules.json: {kind} after a StaticEmbedding is not "
                              "supported (only Dense and Normalize may follow it)")
        if kind in _PIPELINE_ORDER and previous in _PIPELINE_ORDER and (
                _PIPELINE_ORDER[kind] < _PIPELINE_ORDER[previous]
                or (kind == previous and kind != "Dense")):
            # The worker computes Transformer, Pooling, Dense..., Normalize in that order; any
            # other order (a Dense on the token embeddings, a Dense after Normalize) would be
            # served without an error and give other vectors than sentence-transformers.
            raise ConfigError(f"{root}/modules.json: {kind} after {previous} is not supported "
                              "(only Transformer, Pooling, Dense..., Normalize in that order)")
        previous = kind
        if kind in ("Transformer", MLM_TRANSFORMER, "StaticEmbedding", ROUTER):
            continue  # (checked above; static_module_dir placed it first; parse_router read it)
        if kind == "Pooling":
            pooling_cfg = read_json(path / "config.json")
            include_prompt = pooling_cfg.get("include_prompt", True) is not False
            if pooling_override is None:  # an override replaces the mode, even one we refuse
                pooling = parse_pooling_config(pooling_cfg, path)
        elif kind == SPLADE_POOLING:
            splade_spec = parse_splade_pooling(path, st_file)
            if pooling_override is None:
                pooling = "splade"
        elif kind == "Dense":
            dense.append(parse_dense(path))
        elif kind == "LogitScore":
            if len(modules) != 2:
                raise ConfigError(f"{root}/modules.json: LogitScore is supported only right "
                                  "after the Transformer, as the last module")
            logit_score = parse_logit_score(root, path, config, transformer)
        elif kind == "Normalize":
            # Its config.json (sentence-transformers 6 writes one) may aim it elsewhere.
            on_sentence_embedding(optional_json(path / "config.json") or {}, path, kind)
            has_normalize = True
        elif kind == SPARSE_AUTO_ENCODER:  # (csr_pipeline placed it: last, after Pooling)
            if not include_prompt:  # (the head pools by itself: no prompt exclusion there)
                raise ConfigError(f"{path}: a SparseAutoEncoder after a Pooling with "
                                  "include_prompt=false is not supported")
            csr = parse_sparse_autoencoder(path, st_file, l2_first=has_normalize)
        else:
            raise ConfigError(
                f"{root}/modules.json: module type {module['type']!r} is not supported "
                "(supported: Transformer, Pooling, Dense, Normalize; LogitScore; "
                "StaticEmbedding; MLMTransformer, SpladePooling; SparseAutoEncoder)"
            )
    if layout is not None:
        if pooling_override not in (None, "splade"):
            raise ConfigError(f"--pooling {pooling_override!r}: an inference-free SPLADE model "
                              "(a Router of a query and a document route) is served as SPLADE")
        pooling, splade_spec = "splade", parse_splade_pooling(layout.pooling_dir, st_file)
    if dense_path is not None:
        dense = [parse_dense(root / dense_path)]
    model_kind, id2label = model_kind_of(config)
    if logit_score is not None:
        model_kind, id2label = "reranker", {"0": "LABEL_0"}
    if static_dir:
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

    # The Transformer module's do_lower_case: sentence-transformers lower-cases every text (a
    # cased tokenizer, or one it lower-cases anyway) before tokenizing. Without modules.json it
    # builds that module itself, and does not read this file.
    lowercase = bool(modules) and not static_dir and bool(transformer.get("do_lower_case"))

    st_config = st_file
    if model_kind != "embedding" and (
            not modules or st_config.get("model_type", "SentenceTransformer") != "CrossEncoder"):
        # CrossEncoder reads this file (its prompts, default_prompt_name, activation_fn) only
        # from its own save: with modules.json, and "CrossEncoder" as the file's model_type
        # (another is converted, the file left unread).
        st_config = {}
    prompts = {str(k): str(v) for k, v in (st_config.get("prompts") or {}).items()}
    default_prompt_name = st_config.get("default_prompt_name")
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ConfigError(
            f"{root}/config_sentence_transformers.json: default_prompt_name "
            f"{default_prompt_name!r} is not one of the prompts {sorted(prompts)}"
        )

    # (SentenceTransformer reads it only from its own save, with modules.json; prompts, which
    # TEI reads from this file either way, are read either way too.) Sparse encoders have none.
    truncate_dim = (read_truncate_dim(st_config, root)
                    if modules and model_kind == "embedding" and pooling != "splade"
                    and csr is None else None)

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
    if csr is not None:
        check_csr(csr, root, hidden_size=hidden_size, kind=model_kind,
                  pooling_override=pooling_override, dense_path=dense_path)

    # Where the Transformer module declares messages (sentence_bert_config.json).
    conversations = (read_conversations(root, transformer, model_type,
                                        config.get("tokenizer_class")) if modules else None)
    if conversations is not None and model_kind == "embedding":
        raise ConfigError(f"{root}/sentence_bert_config.json: an embedding model whose "
                          "Transformer module takes messages (chat conversations) is not "
                          "supported")
    # A static model's length limit and cut side are its tokenizer file's own truncation.
    file_limit, file_side = tokenizer_truncation(model_dir) if static_dir else (0, None)
    return ModelInfo(
        kind=model_kind,
        id2label=id2label,
        activation=score_activation(config, len(id2label), st_config if modules else {}),
        model_dir=str(model_dir),
        config=config,
        model_type=model_type,
        architectures=list(config.get("architectures") or []),
        hidden_size=hidden_size,
        vocab_size=int(config.get("vocab_size", 0)),
        max_input_length=(file_limit if static_dir else
                          # (without modules.json, sentence-transformers reads no
                          # sentence_bert_config.json: the tokenizer's limit holds)
                          max_input_length(model_dir, config, position_offset,
                                            transformer if modules else {})),
        position_offset=position_offset,
        pooling=pooling,
        dense=dense,
        has_normalize=has_normalize,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        lowercase=lowercase,
        logit_score=logit_score,
        conversations=conversations,
        empty_bag_id=int(config["vocab_size"]) if static_dir else None,
        truncation_side=file_side,
        splade_spec=splade_spec if pooling == "splade" else SpladeSpec(),
        query_route=layout.route if layout else None,
        lexical=(lexical_weights(model_dir, model_type, config.get("tokenizer_class"))
                 if model_kind == "embedding" and pooling != "splade" and csr is None
                 and not static_dir else None),
        csr=csr,
        truncate_dim=truncate_dim,
        include_prompt=include_prompt,
    )
