"""Chat conversations (shared/conversations.py), written and tokenized as sentence-transformers
does.

sentence-transformers (>= 5.4) gives a CrossEncoder that takes messages each pair as one
conversation, a `query` message and a `document` message (after a `system` message holding the
prompt, if one applies), renders it with the model's chat template through transformers'
apply_chat_template, and tokenizes the rendered string without adding special tokens (the
template has them). A conversation longer than the model's limit is cut on the right, then the
template's tail (the assistant header a LogitScore re-ranker's score is read after) is written
back over its last tokens. This module does the same in each tokenizer process, with the
sandboxed Jinja environment transformers compiles templates in. (sentence-transformers 6.3:
base/modules/transformer.py and base/modality.py; transformers 5.25:
utils/chat_template_utils.py.)"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Encoding, Tokenizer

from shared.conversations import Conversations
from shared.errors import ConfigError

Conversation = list[dict[str, Any]]
# The fillers sentence-transformers renders a conversation's skeleton with: they tokenize
# differently, so the token suffix the two renders share is the template's tail.
_FILLERS = ("0", "1 2 3 4")
# A pair, then one pair per role that changes only that role's content.
_PROBES = (("alpha", "bravo"), ("charlie", "bravo"), ("alpha", "foxtrot"))


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' own: Jinja's escapes HTML characters.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` block (it marks the assistant's
    text for return_assistant_tokens_mask; many chat templates have one): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return str(caller())


def compile_template(source: str) -> jinja2.Template:
    """The template in the environment transformers renders chat templates in: sandboxed
    (templates come from model repositories), blocks trimmed, loop controls, the generation
    block, its globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ConfigError(f"the model's chat template does not compile: {exc}") from None


class ChatFormatter:
    """Renders and tokenizes a model's conversations (one per tokenizer process)."""

    def __init__(self, spec: Conversations, tokenizer: Tokenizer) -> None:
        self._spec = spec
        self._template = compile_template(spec.chat_template)
        self._tokenizer = tokenizer
        self._suffixes: dict[tuple[bool, str | None], list[int]] = {}
        self._check_pairs()

    def _check_pairs(self) -> None:
        """Refuse a template that drops the query or the document (it would score something
        else, silently): as sentence-transformers does, by renders that vary one of them."""
        try:
            base, *varied = (self.render(self.conversation(pair, None)) for pair in _PROBES)
        except Exception as exc:  # a template's own error, or Python's inside it
            raise ConfigError(f"the model's chat template fails on a pair: "
                              f"{type(exc).__name__}: {exc}") from None
        dropped = [role for role, render in zip(("query", "document"), varied, strict=True)
                   if render == base]
        if dropped:
            raise ConfigError(f"the model's chat template drops the {' and '.join(dropped)} of "
                              "a pair (it renders no message of that role)")

    def _message(self, role: str, text: str) -> dict[str, Any]:
        if self._spec.message_format == "structured":
            return {"role": role, "content": [{"type": "text", "text": text}]}
        return {"role": role, "content": text}

    def conversation(self, item: str | tuple[str, str], system: str | None) -> Conversation:
        """A pair as query + document messages, a single text as a user message; the prompt,
        if any, as a system message before them."""
        if isinstance(item, tuple):
            messages = [self._message("query", item[0]), self._message("document", item[1])]
        else:
            messages = [self._message("user", item)]
        if system is not None:
            messages.insert(0, self._message("system", system))
        return messages

    def render(self, conversation: Conversation) -> str:
        # apply_chat_template's variables: the named special tokens, then the repository's
        # chat-template kwargs over them, and add_generation_prompt (False unless set there).
        variables = {**self._spec.special_tokens, **self._spec.template_kwargs}
        variables.setdefault("add_generation_prompt", False)
        return self._template.render(messages=conversation, tools=None, documents=None,
                                     **variables)

    def encode(self, items: list[str | tuple[str, str]], system: str | None,
               max_length: int | None, direction: str) -> list[Encoding]:
        """Each item's conversation, rendered and tokenized; cut to `max_length` on `direction`
        (then, as sentence-transformers does, the template's tail restored over the last
        tokens of a conversation that reached the limit)."""
        rendered = [self.render(self.conversation(item, system)) for item in items]
        if max_length is None:
            self._tokenizer.no_truncation()
        else:
            self._tokenizer.enable_truncation(max_length, direction=direction)
        encodings = self._tokenizer.encode_batch(rendered, add_special_tokens=False)
        if max_length is None or not self._spec.restore_suffix:
            return encodings
        return [self._restored(e, self._suffix(isinstance(item, tuple), system), max_length)
                for item, e in zip(items, encodings, strict=True)]

    @staticmethod
    def _restored(encoding: Encoding, suffix: list[int], max_length: int) -> Any:
        ids = encoding.ids
        keep = min(len(suffix), len(ids))
        if len(ids) < max_length or keep == 0:
            return encoding
        return _Restored(ids[:len(ids) - keep] + suffix[len(suffix) - keep:])

    def _suffix(self, pair: bool, system: str | None) -> list[int]:
        """The tokens every conversation of this shape ends with (cached per shape): the longest
        common token suffix of two renders with fillers for contents, if they differ before it.
        """
        key = (pair, system)
        if key not in self._suffixes:
            self._tokenizer.no_truncation()
            first, second = (
                self._tokenizer.encode(self.render(self.conversation(
                    (filler, filler) if pair else filler, system)),
                    add_special_tokens=False).ids
                for filler in _FILLERS)
            count = 0
            for left, right in zip(reversed(first), reversed(second), strict=False):
                if left != right:
                    break
                count += 1
            self._suffixes[key] = (first[len(first) - count:]
                                   if 0 < count < min(len(first), len(second)) else [])
        return self._suffixes[key]


class _Restored:
    """An encoding whose last tokens were replaced: only what the router reads of one."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids
        self.type_ids = [0] * len(ids)
