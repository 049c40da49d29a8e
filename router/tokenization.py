"""Tokenization in a pool of processes, so the event loop never runs the tokenizer.

Each pool process loads `tokenizer.json` once, with the file's own padding and truncation
settings switched off: many Hub tokenizers ship e.g. `Fixed 128` padding and `max_length 128`
truncation, which would silently change token counts and embeddings. We truncate at the
model's limit (from ModelInfo) instead, with the side a request asks for. A static model's
tokenizer is the exception: it runs as its file says (router/static_tokens.py).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, NamedTuple

import msgspec
import numpy as np

from router.chat_template import ChatFormatter
from router.decode_spaces import clean_up_spaces, cleans_up_spaces
from router.pair_cut import truncating
from router.prompt_exclusion import prompt_starts
from router.schemas import TokenInfo
from router.static_tokens import StaticTokens
from shared.conversations import Conversations
from shared.errors import EmbedServeError, ErrorType, backend
from shared.logs import setup_logging
from shared.process import supervised_child

log = logging.getLogger(__name__)

# Per-process state, set once by `_load`: each pool process's tokenizer, and the router's own;
# for a model that takes chat conversations, their formatter.
_tokenizer = None
_chat: ChatFormatter | None = None
_static: StaticTokens | None = None  # a static model's (ModelInfo.empty_bag_id set)
_typed = True  # false: every token type sent is 0 (router.tokenizer_config.sends_token_types)
_clean_up = False  # /decode's text cleaned up as transformers does (router/decode_spaces.py)
# Requests with at most this many characters are tokenized in the router process itself.
INLINE_CHARACTERS = 512
# A pool call still unanswered after its stall limit (`--tokenizer-timeout`, plus this per MB of
# text) means a wedged pool (a hung or stopped process): generous next to the 1-2 MB of text one
# process tokenizes per second.
STALL_S_PER_MB = 10.0


class Encoded(NamedTuple):
    ids: np.ndarray  # int32
    type_ids: np.ndarray  # int32
    pool_from: int = 0  # leading tokens pooling leaves out (router/prompt_exclusion.py)


class Outcome(NamedTuple):
    """What a pool call returns: a value, or the tokenizer's own error message."""

    value: Any
    error: str | None = None


class Token(NamedTuple):
    """One token of /tokenize: byte offsets into the input, None for special tokens."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


def _load(tokenizer_path: str, lowercase: bool = False, model_type: str = "",
          conversations: Conversations | None = None, empty_bag_id: int | None = None) -> str:
    """Load this process's tokenizer; returns what tokenizer_config.json changed ("" if
    nothing), for the router to log once (see router.tokenizer_config)."""
    global _tokenizer, _chat, _static, _typed, _clean_up
    # One core per process: rayon threads inside each of N processes would oversubscribe.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    from router.tokenizer_config import configure, sends_token_types

    _tokenizer = Tokenizer.from_file(tokenizer_path)
    _tokenizer.no_padding()
    _clean_up = cleans_up_spaces(_tokenizer, Path(tokenizer_path).parent)
    _static = StaticTokens(_tokenizer, empty_bag_id) if empty_bag_id is not None else None
    if _static is not None:
        return ""  # the file as it is (StaticEmbedding's), its truncation included
    _tokenizer.no_truncation()
    changed = configure(_tokenizer, Path(tokenizer_path).parent, model_type, lowercase)
    _typed = sends_token_types(Path(tokenizer_path).parent)
    _chat = ChatFormatter(conversations, _tokenizer) if conversations is not None else None
    return changed


def _init(tokenizer_path: str, lowercase: bool, model_type: str,
          conversations: Conversations | None, empty_bag_id: int | None, parent_pid: int,
          json_logs: bool) -> None:
    supervised_child(parent_pid)
    setup_logging(json_logs, f"tokenizer-{os.getpid()}")
    _load(tokenizer_path, lowercase, model_type, conversations, empty_bag_id)


def _encode(texts: list[str | tuple[str, str]], max_length: int | None,
            direction: str, system: str | None = None, special_tokens: bool = True,
            excluded_prompt: str | None = None) -> Outcome:
    """Texts or pairs with special tokens unless `special_tokens` is false (or, for a model
    that takes conversations, each as its conversation after the `system` prompt); texts
    that start with `excluded_prompt` are pooled from after it."""
    assert _tokenizer is not None, "pool process not initialised"
    try:
        if _static is not None:  # no special tokens; an input without tokens: the empty bag
            bags = [_static.bag_ids(e)
                    for e in _static.encodings(texts, max_length, direction)]
            return Outcome([Encoded(ids, np.zeros_like(ids)) for ids in bags])
        if _chat is not None:
            encodings = _chat.encode(texts, system, max_length, direction)
        else:
            # (long pairs first cut to what truncation keeps: see router/pair_cut.py)
            texts = truncating(_tokenizer, texts, max_length, direction)
            encodings = _tokenizer.encode_batch(texts, add_special_tokens=special_tokens)
        starts = (prompt_starts(_tokenizer, excluded_prompt, encodings, direction,
                                special_tokens)
                  if excluded_prompt and _chat is None else [0] * len(encodings))
    except Exception as exc:  # the tokenizer's (and the template's) failures are the client's
        return Outcome(None, str(exc))
    return Outcome([
        Encoded(ids := np.asarray(e.ids, dtype=np.int32),
                np.asarray(e.type_ids, dtype=np.int32) if _typed else np.zeros_like(ids), start)
        for e, start in zip(encodings, starts, strict=True)
    ])


def _untruncated(texts: list[str], add_special_tokens: bool) -> list:
    """Each text's whole encoding (what /tokenize shows and a cut is measured on); for a
    static model the encoding the model sees (no special tokens, the file's truncation)."""
    assert _tokenizer is not None, "pool process not initialised"
    if _static is not None:
        return _static.encodings(texts)
    _tokenizer.no_truncation()
    return _tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)


def _tokens(texts: list[str], add_special_tokens: bool) -> Outcome:
    try:
        encodings = _untruncated(texts, add_special_tokens)
    except Exception as exc:
        return Outcome(None, str(exc))
    result = []
    for text, encoding in zip(texts, encodings, strict=True):
        # tokenizers reports character offsets; TEI (and its clients) use byte offsets.
        byte_at = [0]
        for char in text:
            byte_at.append(byte_at[-1] + len(char.encode()))
        result.append([
            Token(token_id, token, True, None, None) if special
            else Token(token_id, text[start:stop], False, byte_at[start], byte_at[stop])
            for token_id, token, special, (start, stop) in zip(
                encoding.ids, encoding.tokens, encoding.special_tokens_mask, encoding.offsets,
                strict=True)])
    return Outcome(result)


def _tokens_json(texts: list[str], add_special_tokens: bool) -> Outcome:
    """`_tokens` as /tokenize's JSON answer: written here, in the pool, since it runs ~30x the
    request's size (a 2 MB request answers ~65 MB), which on the event loop would stall every
    other request for seconds. (msgspec writes a Struct far faster than a dict.)"""
    outcome = _tokens(texts, add_special_tokens)
    if outcome.error is not None:
        return outcome
    return Outcome(msgspec.json.encode([[TokenInfo(*token) for token in per_text]
                                        for per_text in outcome.value]))


def _kept_tokens(texts: list[str], count: int, direction: str = "right") -> Outcome:
    """Each text up to the end of its `count`-th token ("left": from the start of its
    `count`-th last), special tokens not counted; shorter texts whole."""
    try:
        encodings = _untruncated(texts, add_special_tokens=False)
    except Exception as exc:
        return Outcome(None, str(exc))
    # Offsets are character offsets into the text.
    return Outcome([text if len(encoding.ids) <= count
                    else text[encoding.offsets[_first_kept(encoding.word_ids, count)][0]:]
                    if direction == "left" else text[:encoding.offsets[count - 1][1]]
                    for text, encoding in zip(texts, encodings, strict=True)])


def _first_kept(word_ids: list[int | None], count: int) -> int:
    """The first of the last `count` tokens that starts a word. NOTE: a suffix cut inside a
    word tokenizes again as another word (WordPiece's "##bed" alone is "bed"), maybe in more
    tokens; from a word's start it gives the same tokens. Where no whole word fits, the cut
    is inside the word."""
    first = len(word_ids) - count
    return next((i for i in range(first, len(word_ids))
                 if word_ids[i] is None or word_ids[i] != word_ids[i - 1]), first)


class Chunked(NamedTuple):
    """What `_chunks` returns: the room each piece had beside the query, in tokens, and each
    text's pieces (None when the query leaves no room)."""

    room: int
    pieces: list[list[str]] | None


def _chunks(query: str, texts: list[str], max_length: int, limit: int) -> Outcome:
    """Each text in consecutive pieces that each fit, with the query and the pair's special
    tokens, in `max_length` tokens (Cohere's `max_chunks_per_doc`); at most `limit` pieces, the
    rest of a longer text dropped. A text that fits is one piece, itself."""
    assert _tokenizer is not None, "pool process not initialised"
    try:
        query_tokens = len(_untruncated([query], add_special_tokens=False)[0].ids)
        encodings = _untruncated(texts, add_special_tokens=False)
    except Exception as exc:
        return Outcome(None, str(exc))
    processor = _tokenizer.post_processor
    specials = processor.num_special_tokens_to_add(True) if processor is not None else 0
    room = max_length - specials - query_tokens
    if room < 1:
        return Outcome(Chunked(room, None))
    pieces = []
    for text, encoding in zip(texts, encodings, strict=True):
        # Read once: each read of `offsets` builds the whole list anew.
        offsets = encoding.offsets
        # Pieces meet at a token's first character (offsets are character offsets): nothing is
        # lost but what lies past the last piece. Tokens of one character (NFD's jamo, bytes)
        # share its offsets: a cut among them is dropped, not an empty piece.
        starts = sorted({0, *(offsets[i][0] for i in range(room, min(len(offsets),
                                                                     room * limit + 1), room))})
        ends = [*starts[1:], len(text)]
        pieces.append([text[start:end] for start, end in zip(starts, ends, strict=True)][:limit])
    return Outcome(Chunked(room, pieces))


def _decode(ids: list[list[int]], skip_special_tokens: bool) -> Outcome:
    assert _tokenizer is not None, "pool process not initialised"
    try:
        texts = _tokenizer.decode_batch(ids, skip_special_tokens=skip_special_tokens)
    except Exception as exc:
        return Outcome(None, str(exc))
    return Outcome([clean_up_spaces(text) for text in texts] if _clean_up else texts)


def _ping() -> int:
    return os.getpid()


def _kill(executor: ProcessPoolExecutor) -> None:
    """SIGKILL the pool's processes (a stopped one ignores anything else). concurrent.futures
    has no public way to; they would die with the router anyway (PDEATHSIG), but the pool's
    shutdown and the interpreter's exit wait on them first."""
    for process in list((getattr(executor, "_processes", None) or {}).values()):
        process.kill()


class TokenizerPool:
    """A fixed pool of tokenizer processes (spawned: forking a uvloop process is unsafe)."""

    def __init__(self, tokenizer_path: str, processes: int, json_logs: bool = False,
                 lowercase: bool = False, model_type: str = "",
                 conversations: Conversations | None = None,
                 empty_bag_id: int | None = None, stall_timeout: float = 30.0) -> None:
        self._tokenizer_path = tokenizer_path
        self._stall_timeout = stall_timeout
        self._lowercase = lowercase
        self._model_type = model_type
        self._conversations = conversations
        self._empty_bag_id = empty_bag_id
        # Whether inputs are written as conversations (prompts become system messages).
        self.conversations = conversations is not None
        self._queued = 0  # characters (or ids) of the calls in the pool, running or waiting
        self._processes = processes
        self._json_logs = json_logs
        self._executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self._processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init,
            initargs=(self._tokenizer_path, self._lowercase, self._model_type,
                      self._conversations, self._empty_bag_id, os.getpid(), self._json_logs),
        )

    async def start(self) -> None:
        """Start every process now (and surface a broken tokenizer) instead of on first use."""
        # This process's copy, for short inputs (see `encode`).
        changed = _load(self._tokenizer_path, self._lowercase, self._model_type,
                        self._conversations, self._empty_bag_id)
        if changed:
            log.info("tokenizer: %s (as transformers does, so sentence-transformers)", changed)
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._executor, _ping) for _ in range(self._processes))
        )

    async def encode(
        self, texts: list[str | tuple[str, str]], max_length: int | None, direction: str,
        system: str | None = None, special_tokens: bool = True,
        excluded_prompt: str | None = None,
    ) -> list[Encoded]:
        """Tokenize texts or text pairs, with special tokens unless `special_tokens` is false;
        truncate to `max_length` on `direction` if given (pairs: the longest member first, as
        transformers does). With `conversations`, each is written as one, after the `system`
        prompt if given. Texts (not pairs) that begin with `excluded_prompt` say where their
        pooling starts, after it."""
        characters = sum(len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in texts)
        args = (texts, max_length, direction, system, special_tokens, excluded_prompt)
        if characters <= INLINE_CHARACTERS and _tokenizer is not None:
            # A short request tokenizes in tens of microseconds: cheaper here than the
            # round trip to a pool process (~0.5-1 ms), which is the latency of one query.
            return self._result(_encode(*args))
        return await self._call(characters, _encode, *args)

    async def tokens(self, texts: list[str], add_special_tokens: bool) -> list[list[Token]]:
        """Every token of each text with its byte offsets (for /tokenize)."""
        return await self._call(sum(map(len, texts)), _tokens, texts, add_special_tokens)

    async def tokens_json(self, texts: list[str], add_special_tokens: bool) -> bytes:
        """`tokens`, as the JSON array /tokenize answers."""
        return await self._call(sum(map(len, texts)), _tokens_json, texts, add_special_tokens)

    async def kept_tokens(self, texts: list[str], count: int, direction: str) -> list[str]:
        """Each text cut to its first `count` tokens ("left": its last), as Cohere's
        `max_tokens_per_doc` and embed `max_tokens` cut them (`_kept_tokens`)."""
        return await self._call(sum(map(len, texts)), _kept_tokens, texts, count, direction)

    async def chunks(self, query: str, texts: list[str], max_length: int,
                     limit: int) -> Chunked:
        """Each text in at most `limit` pieces that fit beside the query (`_chunks`)."""
        return await self._call(len(query) + sum(map(len, texts)), _chunks, query, texts,
                                max_length, limit)

    async def decode(self, ids: list[list[int]], skip_special_tokens: bool) -> list[str]:
        return await self._call(sum(map(len, ids)), _decode, ids, skip_special_tokens)

    async def _call(self, size: int, function: Callable[..., Outcome], *args: Any) -> Any:
        """Run `function` in the pool; `size` (characters or ids) bounds how long it may take."""
        loop = asyncio.get_running_loop()
        executor = self._executor
        # The pool runs calls in order: this one may wait behind all the work already in it, so
        # that work counts in its deadline, or a busy pool would look like a hung one (and be
        # killed, failing every request in it).
        deadline = self._stall_timeout + STALL_S_PER_MB * (self._queued + size) / 1e6
        self._queued += size
        try:
            outcome = await asyncio.wait_for(loop.run_in_executor(executor, function, *args),
                                             deadline)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this request was cancelled (its client left, a drain)
            # Its call was dropped from the queue of a pool that another request's stall
            # replaced: an answer, not a bare cancellation (hypercorn's empty 500).
            raise backend("the tokenizer pool was restarted while this request waited in "
                          "it") from None
        except BrokenProcessPool:
            # A tokenizer process died (OOM killer, signal): replace the pool once, fail only
            # the requests that were in it.
            if self._executor is executor:
                log.error("a tokenizer process died; restarting the tokenizer pool")
                self._replace(executor)
            raise backend("a tokenizer process died while tokenizing this request") from None
        except TimeoutError:
            # Hung or stopped, the pool would hold every later request too (a stopped process
            # may hold its queue's lock): replace it, failing only the requests in it.
            if self._executor is executor:
                log.error("the tokenizer pool gave no answer in %.0f s; restarting it", deadline)
                self._replace(executor)
            raise backend(f"the tokenizer pool gave no answer within {deadline:.0f} s; it was "
                          "restarted") from None
        finally:
            self._queued -= size
        return self._result(outcome)

    def _replace(self, executor: ProcessPoolExecutor) -> None:
        _kill(executor)
        executor.shutdown(wait=False, cancel_futures=True)
        self._executor = self._new_executor()

    @staticmethod
    def _result(outcome: Outcome) -> Any:
        if outcome.error is not None:
            raise EmbedServeError(ErrorType.TOKENIZER, f"tokenizer error {outcome.error}")
        return outcome.value

    def close(self) -> None:
        """Stop the pool without waiting on it: a process that hangs, or was stopped, must not
        hold the exit (the requests are drained by now)."""
        # Killed first, the pool breaks and its manager thread ends at once: joined here, not
        # raced by the interpreter's exit hook.
        _kill(self._executor)
        self._executor.shutdown(wait=True, cancel_futures=True)
