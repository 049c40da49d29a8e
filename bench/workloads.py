"""Seeded synthetic workloads: texts made of a model's own vocabulary, with exact token counts.

Texts are built by sampling token ids, decoding them, and re-tokenizing the result the way the
server does (special tokens added, no padding, truncated at the model's max input length), so the
token counts used for tokens/s are the ones the server computes on, not an estimate.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from shared.modelinfo import load_model_info

# Vocabulary entries never sampled: BERT's "[unused12]", T5/Gemma-style "<unused3>", byte-fallback
# pieces "<0x0A>" and anything in brackets that looks like a control token.
_SKIP_PATTERN = re.compile(r"^(\[.*\]|<.*>)$")
# NOTE: WordPiece continuation pieces ("##ing") glue onto the previous word when decoded, so the
# re-tokenized text drifts from the sampled length; sampling word starts only keeps the drift
# small and the correction loop in `_make_text` short.
_CONTINUATION_PREFIX = "##"
_MAX_ATTEMPTS = 16


@dataclass(frozen=True)
class Texts:
    """Texts plus the number of tokens the server will compute on for each."""

    texts: list[str]
    tokens: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)


class TextFactory:
    """Makes texts of a requested token count from one model's tokenizer."""

    def __init__(self, model_dir: str | Path) -> None:
        info = load_model_info(model_dir)
        self.max_length = info.max_input_length
        self._tokenizer = Tokenizer.from_file(str(info.tokenizer_path))
        # Same settings as router/tokenization.py: many Hub tokenizer.json files carry fixed
        # padding/truncation that would make every count wrong.
        self._tokenizer.no_padding()
        self._tokenizer.no_truncation()
        self._special = self._tokenizer.num_special_tokens_to_add(is_pair=False)
        self._vocab = self._sampleable_ids()

    def _sampleable_ids(self) -> list[int]:
        special = {tok.content for tok in self._tokenizer.get_added_tokens_decoder().values()}
        # NOTE: get_vocab() is a hash map with no stable order; sort by id so that a seed
        # gives the same texts in every process and every run.
        vocab = sorted(self._tokenizer.get_vocab(with_added_tokens=False).items(),
                       key=lambda item: item[1])
        ids = [i for tok, i in vocab
               if tok not in special and not _SKIP_PATTERN.match(tok)
               and not tok.startswith(_CONTINUATION_PREFIX) and tok.strip()]
        if not ids:
            raise ValueError("no sampleable tokens in the vocabulary")
        return ids

    def count_pairs(self, query: str, documents: list[str]) -> list[int]:
        """Tokens per (query, document) pair as the server computes them, truncated."""
        encodings = self._tokenizer.encode_batch([(query, d) for d in documents],
                                                 add_special_tokens=True)
        return [min(len(e.ids), self.max_length) for e in encodings]

    def pair_extra(self) -> int:
        """Tokens a pair's specials add to both texts' own counts (BERT: 3 - 2 * 2 = -1)."""
        return (self._tokenizer.num_special_tokens_to_add(is_pair=True) - 2 * self._special)

    def count(self, texts: list[str]) -> list[int]:
        """Tokens per text as the server computes them (special tokens in, truncated)."""
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        return [min(len(e.ids), self.max_length) for e in encodings]

    def _make_text(self, rng: random.Random, target: int, lo: int, hi: int) -> tuple[str, int]:
        n = max(1, target - self._special)
        for _ in range(_MAX_ATTEMPTS):
            ids = rng.choices(self._vocab, k=n)
            text = self._tokenizer.decode(ids, skip_special_tokens=True)
            # The untruncated length decides acceptance (hi <= max_length): a text over the limit
            # would be truncated by the server and the requested range would be a lie.
            got = len(self._tokenizer.encode(text, add_special_tokens=True).ids)
            if lo <= got <= hi:
                return text, got
            n = max(1, n + target - got)
        raise RuntimeError(f"could not make a text of {target} tokens in {_MAX_ATTEMPTS} tries")

    def make(self, count: int, lo: int, hi: int, seed: int) -> Texts:
        """`count` texts whose lengths are drawn from U[lo, hi] tokens (special tokens included)."""
        if not 1 + self._special <= lo <= hi <= self.max_length:
            raise ValueError(f"length range [{lo}, {hi}] must lie within "
                             f"[{1 + self._special}, {self.max_length}] for this model")
        rng = random.Random(seed)
        texts: list[str] = []
        tokens: list[int] = []
        for _ in range(count):
            text, got = self._make_text(rng, rng.randint(lo, hi), lo, hi)
            texts.append(text)
            tokens.append(got)
        return Texts(texts=texts, tokens=tokens)


def corpus(factory: TextFactory, count: int, max_tokens: int | None, seed: int) -> Texts:
    """The corpus workload: U[16, max_tokens] tokens (default: the model's max input length)."""
    hi = min(max_tokens or factory.max_length, factory.max_length)
    return factory.make(count, 16, hi, seed)


def queries(factory: TextFactory, count: int, seed: int) -> Texts:
    """The queries workload: short texts of U[6, 10] tokens (about 8)."""
    return factory.make(count, 6, 10, seed + 1)


def embed_bodies(texts: Texts, batch: int) -> list[tuple[bytes, int, int]]:
    """JSON bodies of `batch` texts each, with their text and token counts."""
    out = []
    for start in range(0, len(texts.texts), batch):
        chunk = texts.texts[start:start + batch]
        body = json.dumps({"inputs": chunk}, ensure_ascii=False).encode()
        out.append((body, len(chunk), sum(texts.tokens[start:start + batch])))
    return out


@dataclass(frozen=True)
class Reranks:
    """Rerank requests: one query and k documents each, with each pair's tokens as the server
    counts them (query and document together, specials included)."""

    queries: list[str]
    documents: list[list[str]]
    pair_tokens: list[list[int]]

    @property
    def pairs(self) -> int:
        return sum(len(docs) for docs in self.documents)

    @property
    def total_tokens(self) -> int:
        return sum(sum(tokens) for tokens in self.pair_tokens)


def rerank_document_max(factory: TextFactory, doc_max: int, query_max: int = 10) -> int:
    """The longest document (alone, specials included) whose pair with the longest query still
    fits the model's max input length, capped at `doc_max`: no pair is truncated."""
    fit = factory.max_length - query_max - factory.pair_extra()
    return min(doc_max, fit)


def reranks(factory: TextFactory, count: int, k: int, doc_max: int, seed: int) -> Reranks:
    """`count` requests of one U[6, 10]-token query and `k` documents of U[16, doc_max] tokens,
    doc_max lowered until every pair fits (`rerank_document_max`)."""
    hi = rerank_document_max(factory, doc_max)
    qs = queries(factory, count, seed)
    docs = factory.make(count * k, 16, hi, seed + 2)
    documents = [docs.texts[i * k:(i + 1) * k] for i in range(count)]
    return Reranks(qs.texts, documents,
                   [factory.count_pairs(q, d) for q, d in zip(qs.texts, documents, strict=True)])


def rerank_bodies(work: Reranks) -> list[tuple[bytes, int, int]]:
    """TEI /rerank bodies ({"query", "texts"}), with their pair and token counts."""
    return [(json.dumps({"query": q, "texts": d}, ensure_ascii=False).encode(), len(d), sum(t))
            for q, d, t in zip(work.queries, work.documents, work.pair_tokens, strict=True)]
