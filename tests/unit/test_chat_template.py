"""LogitScore re-rankers' conversations: the router's token ids against what
sentence-transformers' CrossEncoder feeds the model (its Transformer module's preprocess), for
pairs and single texts, cut or not, with and without a prompt, in both message formats."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from router import tokenization
from shared.errors import ConfigError, EmbedServeError, ErrorType
from shared.modelinfo import load_model_info
from tests.fixtures.causal_reranker import TEMPLATE, make_causal_reranker, make_chat_classifier
from tests.fixtures.decoders import set_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PAIRS = [("what is a cat", "a cat is a small animal"), ("hello", "world"),
         ("q", "the dog " * 40), ("a long query " * 30, "d")]
TEXTS = ["just a text", "the dog " * 40]
STRUCTURED = TEMPLATE.replace("map(attribute='content') | first",
                              "map(attribute='content') | map(attribute=0) "
                              "| map(attribute='text') | first")


def theirs(root: Path, items: list, prompt: str | None = None) -> list[list[int]]:
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(root), device="cpu")
    features = model[0].preprocess(items, prompt=prompt)
    return [row[mask.bool()].tolist()
            for row, mask in zip(features["input_ids"], features["attention_mask"], strict=True)]


def ours(root: Path, items: list, system: str | None = None,
         truncate: bool = True) -> list[list[int]]:
    info = load_model_info(root)
    before = tokenization._tokenizer, tokenization._chat
    try:
        tokenization._load(str(info.tokenizer_path), False, info.model_type, info.conversations)
        max_length = info.max_input_length if truncate else None
        outcome = tokenization._encode(items, max_length, "right", system)
        assert outcome.error is None, outcome.error
        return [enc.ids.tolist() for enc in outcome.value]
    finally:
        tokenization._tokenizer, tokenization._chat = before


def copy_of(model: Path, tmp_path: Path) -> Path:
    """A copy of the module's model to edit."""
    return Path(shutil.copytree(model, tmp_path / "copy"))


@pytest.fixture(scope="module")
def reranker(tmp_path_factory) -> Path:
    return make_causal_reranker(tmp_path_factory.mktemp("causal") / "reranker")


@pytest.mark.parametrize("items", [PAIRS, TEXTS], ids=["pairs", "texts"])
@pytest.mark.parametrize("prompt", [None, "judge the document"])
def test_ids_equal_cross_encoders(reranker: Path, items: list, prompt: str | None) -> None:
    expected = theirs(reranker, items, prompt)
    if items is PAIRS:  # (this template has no place for a user message: texts render empty)
        assert any(len(ids) == load_model_info(reranker).max_input_length for ids in expected)
    assert ours(reranker, items, prompt) == expected


def test_untruncated_conversations_are_whole(reranker: Path) -> None:
    long = ours(reranker, PAIRS[2:3], truncate=False)[0]
    assert len(long) > load_model_info(reranker).max_input_length
    assert long[-3:] == ours(reranker, PAIRS[:1])[0][-3:]  # the template's tail


@pytest.mark.parametrize(("name", "options"), [
    ("structured", {"template": STRUCTURED}),
    ("template-kwargs", {"chat_kwargs": {"enable_thinking": False}}),
    ("no-suffix-restore", {"chat_kwargs": {"restore_suffix": False}}),
])
def test_options_equal_cross_encoders(tmp_path: Path, name: str, options: dict) -> None:
    root = make_causal_reranker(tmp_path / name, **options)
    if name == "structured":
        config = load_model_info(root).conversations
        assert config is not None and config.message_format == "flat"  # as saved ...
        set_json(root / "sentence_bert_config.json", modality_config={
            "text": {"method": "forward", "method_output_name": "logits"},
            "message": {"method": "forward", "method_output_name": "logits",
                        "format": "structured"}})
    assert ours(root, PAIRS) == theirs(root, PAIRS)


@pytest.mark.parametrize("template", [TEMPLATE, TEMPLATE + "{# content[0] #}"])
def test_an_auto_format_is_guessed_as_sentence_transformers_guesses(
        tmp_path: Path, template: str) -> None:
    from sentence_transformers import CrossEncoder

    root = make_causal_reranker(tmp_path / "auto", template=template)
    set_json(root / "sentence_bert_config.json", modality_config={
        "message": {"method": "forward", "method_output_name": "logits", "format": "auto"}})
    config = load_model_info(root).conversations
    expected = CrossEncoder(str(root), device="cpu")[0].input_formatter.message_format
    assert config is not None and config.message_format == expected


@pytest.mark.parametrize(("change", "named"), [
    ({"processing_kwargs": {"chat_template": {"max_length": 16}}}, "max_length"),
    # (sentence-transformers fails on these itself: apply_chat_template's own arguments)
    ({"processing_kwargs": {"chat_template": {"sanitize_control_tokens": True}}},
     "sanitize_control_tokens"),
    ({"processing_kwargs": {"chat_template": {"tokenizer_kwargs": {}}}}, "tokenizer_kwargs"),
    ({"processing_kwargs": {"text": {"padding_side": "right"}}}, "text"),
    ({"transformer_task": "sequence-classification"}, "sequence-classification"),
])
def test_settings_not_reproduced_are_refused_by_name(reranker: Path, tmp_path: Path,
                                                     change: dict, named: str) -> None:
    root = copy_of(reranker, tmp_path)
    set_json(root / "sentence_bert_config.json", **change)
    with pytest.raises(ConfigError, match=named):
        load_model_info(root)


def test_a_model_that_takes_messages_needs_a_template(reranker: Path, tmp_path: Path) -> None:
    root = copy_of(reranker, tmp_path)
    (root / "chat_template.jinja").unlink()
    with pytest.raises(ConfigError, match="no chat template"):
        load_model_info(root)


@pytest.mark.parametrize("token", [10**6, "vocab_size"])
def test_a_token_outside_the_vocabulary_is_refused(reranker: Path, tmp_path: Path,
                                                   token: int | str) -> None:
    root = copy_of(reranker, tmp_path)
    if token == "vocab_size":  # one past the last
        token = load_model_info(root).vocab_size
    set_json(root / "1_LogitScore" / "config.json", true_token_id=token)
    with pytest.raises(ConfigError, match=f"true_token_id {token} is not a token"):
        load_model_info(root)


@pytest.mark.parametrize(("change", "named"), [
    ("module_input_name", "LogitScore on 'logits' is not supported"),
    ("third module", "LogitScore is supported only right after the Transformer"),
])
def test_other_logit_score_pipelines_are_refused(reranker: Path, tmp_path: Path, change: str,
                                                 named: str) -> None:
    import json
    root = copy_of(reranker, tmp_path)
    if change == "module_input_name":
        set_json(root / "1_LogitScore" / "config.json", module_input_name="logits")
    else:
        modules = json.loads((root / "modules.json").read_text())
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.base.modules.normalize.Normalize"})
        (root / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConfigError, match=named):
        load_model_info(root)


@pytest.mark.parametrize(("template", "named"), [
    (TEMPLATE.replace("'eq', 'query'", "'eq', 'user'"), "drops the query"),
    (TEMPLATE + "{% if", "does not compile"),
    (TEMPLATE + "{{ raise_exception('no pairs here') }}", "no pairs here"),
    (TEMPLATE + "{{ 1 / 0 }}", "fails on a pair: ZeroDivisionError"),
])
def test_a_template_that_cannot_carry_a_pair_is_refused_at_start(
        reranker: Path, tmp_path: Path, template: str, named: str) -> None:
    root = copy_of(reranker, tmp_path)
    (root / "chat_template.jinja").write_text(template)
    info = load_model_info(root)
    before = tokenization._tokenizer, tokenization._chat
    try:
        with pytest.raises(ConfigError, match=named):
            tokenization._load(str(info.tokenizer_path), False, info.model_type,
                               info.conversations)
    finally:
        tokenization._tokenizer, tokenization._chat = before


def test_a_sequence_classifier_that_declares_messages_gets_conversations(tmp_path: Path) -> None:
    root = make_chat_classifier(tmp_path / "declared")
    assert load_model_info(root).conversations is not None
    assert ours(root, PAIRS) == theirs(root, PAIRS)


def test_a_bare_sequence_classifier_is_read_plainly_as_tei_reads_it(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    root = make_chat_classifier(tmp_path / "bare", saved=False)
    info = load_model_info(root)
    assert info.conversations is None  # (sentence-transformers >= 5.4 would render the template)
    plain = AutoTokenizer.from_pretrained(str(root))
    expected = [plain(q, d, truncation=True, max_length=info.max_input_length)["input_ids"]
                for q, d in PAIRS]
    assert ours(root, PAIRS) == expected


def test_an_embedder_that_declares_messages_is_refused(tmp_path: Path) -> None:
    from tests.fixtures.decoders import make_st_decoder

    root = make_st_decoder(tmp_path / "embedder", "qwen3")
    set_json(root / "sentence_bert_config.json", modality_config={
        "text": {"method": "forward", "method_output_name": "last_hidden_state"},
        "message": {"method": "forward", "method_output_name": "last_hidden_state"}})
    with pytest.raises(ConfigError, match="takes messages"):
        load_model_info(root)


def test_an_empty_prompt_is_no_system_message(tmp_path: Path) -> None:
    # prompts {"none": ""} with default_prompt_name "none" (or --default-prompt ""): the
    # CrossEncoder scores the pair without a system message. This template renders one
    # whenever it is there, empty or not.
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
                "{% endfor %}<|im_start|>assistant\n")
    root = make_causal_reranker(tmp_path / "m", template=template)
    expected = theirs(root, PAIRS, "")
    assert expected == theirs(root, PAIRS) != theirs(root, PAIRS, " ")
    from router.inputs import InputRules, tokenize_inputs

    info = load_model_info(root)
    rules = InputRules(max_input_length=info.max_input_length, max_client_batch_size=8,
                       vocab_size=info.vocab_size, prompts={}, default_prompt="")

    class Pool:  # the router's own tokenizer, as for a short request
        conversations = True

        async def encode(self, texts, max_length, direction, system=None, special_tokens=True,
                         excluded_prompt=None):
            outcome = tokenization._encode(texts, max_length, direction, system, special_tokens,
                                           excluded_prompt)
            assert outcome.error is None, outcome.error
            return outcome.value

    before = tokenization._tokenizer, tokenization._chat
    try:
        tokenization._load(str(info.tokenizer_path), False, info.model_type, info.conversations)
        encoded, _ = asyncio.run(tokenize_inputs(
            PAIRS, prompt="", explicit_prompt=False, truncate=True, direction="right",
            rules=rules, tokenizers=Pool()))  # type: ignore[arg-type]
    finally:
        tokenization._tokenizer, tokenization._chat = before
    assert [e.ids.tolist() for e in encoded] == expected


def test_a_template_with_a_generation_block_is_rendered_as_transformers_does(
        tmp_path: Path) -> None:
    # {% generation %} (transformers' marker of the assistant's text, in many chat templates)
    # renders its body; Jinja alone does not know the tag.
    template = TEMPLATE + "{% generation %}<think></think>{% endgeneration %}"
    root = make_causal_reranker(tmp_path / "m", template=template)
    assert ours(root, PAIRS) == theirs(root, PAIRS)
    assert ours(root, PAIRS[:1])[0] != ours(make_causal_reranker(tmp_path / "n"), PAIRS[:1])[0]


def _auto_format(root: Path) -> None:
    set_json(root / "sentence_bert_config.json", modality_config={
        "message": {"method": "forward", "method_output_name": "logits", "format": "auto"}})


@pytest.mark.parametrize("layout", ["jinja-over-config", "folder-default", "folder-extra",
                                    "config-list"])
def test_templates_are_found_as_transformers_finds_them(tmp_path: Path, layout: str) -> None:
    # transformers 5: additional_chat_templates/*.jinja are named templates that replace
    # tokenizer_config.json's; of several it renders "default", and sentence-transformers'
    # "auto" message format takes several templates (not a string) for structured.
    root = make_causal_reranker(tmp_path / layout)
    jinja = root / "chat_template.jinja"
    folder = root / "additional_chat_templates"
    folder.mkdir()
    wrong = "{{ messages | map(attribute='role') | join }}"  # renders no content
    _auto_format(root)
    if layout == "jinja-over-config":
        set_json(root / "tokenizer_config.json", chat_template=wrong)
    elif layout == "folder-default":
        jinja.rename(folder / "default.jinja")
        set_json(root / "tokenizer_config.json", chat_template=wrong)
    else:
        jinja.write_text(STRUCTURED)
        (folder / "tool_use.jinja").write_text(wrong)
        if layout == "config-list":
            jinja.unlink()
            folder.joinpath("tool_use.jinja").unlink()
            set_json(root / "tokenizer_config.json", chat_template=[
                {"name": "tool_use", "template": wrong},
                {"name": "default", "template": STRUCTURED}])
    config = load_model_info(root).conversations
    assert config is not None
    assert config.message_format == ("structured" if layout in ("folder-extra", "config-list")
                                     else "flat")
    assert ours(root, PAIRS) == theirs(root, PAIRS)


def test_several_templates_without_a_default_are_refused(reranker: Path, tmp_path: Path) -> None:
    root = copy_of(reranker, tmp_path)
    (root / "additional_chat_templates").mkdir()
    (root / "chat_template.jinja").rename(root / "additional_chat_templates" / "rerank.jinja")
    with pytest.raises(ConfigError, match=r"additional_chat_templates: several chat templates "
                                          r"\(\['rerank'\]\) and none named 'default'"):
        load_model_info(root)


def test_a_template_that_fails_on_a_request_is_the_clients_error(tmp_path: Path) -> None:
    # Passed the start probes, the template raises on this request's document: the request's
    # error (a Tokenizer error, 422), never the process's; the next request is served.
    template = ("{% if 'forbidden' in messages[-1].content %}"
                "{{ raise_exception('no forbidden documents') }}{% endif %}" + TEMPLATE)
    root = make_causal_reranker(tmp_path / "m", template=template)
    info = load_model_info(root)
    before = tokenization._tokenizer, tokenization._chat
    try:
        tokenization._load(str(info.tokenizer_path), False, info.model_type,
                           info.conversations)
        failed = tokenization._encode([("q", "a forbidden doc")], 64, "right")
        assert failed.value is None and failed.error == "no forbidden documents"
        pool = tokenization.TokenizerPool(str(info.tokenizer_path), 1,
                                          conversations=info.conversations)
        try:  # (short: tokenized in this process, the pool's processes never start)
            with pytest.raises(EmbedServeError) as raised:
                asyncio.run(pool.encode([("q", "a forbidden doc")], 64, "right"))
        finally:
            pool.close()
        assert raised.value.error_type is ErrorType.TOKENIZER
        served = tokenization._encode([("q", "a fine doc")], 64, "right")
        assert served.error is None
    finally:
        tokenization._tokenizer, tokenization._chat = before
    assert [e.ids.tolist() for e in served.value] == theirs(root, [("q", "a fine doc")])


@pytest.mark.parametrize("modality_config", [None, {"text": {
    "method": "forward", "method_output_name": "logits"}}], ids=["absent", "text-only"])
def test_a_transformer_without_messages_tokenizes_pairs_as_pairs(
        reranker: Path, tmp_path: Path, modality_config: dict | None) -> None:
    # sentence-transformers loads a saved Transformer whose sentence_bert_config.json has no
    # modality_config as text only (TRANSFORMER_TASK_DEFAULTS), chat template or not.
    root = copy_of(reranker, tmp_path)
    set_json(root / "sentence_bert_config.json", modality_config=modality_config,
             module_output_name=None if modality_config is None else "causal_logits")
    info = load_model_info(root)
    assert info.logit_score is not None and info.conversations is None
    pool = tokenization.TokenizerPool("unused", 1, conversations=info.conversations)
    try:
        assert not pool.conversations  # a prompt goes in front of the text
    finally:
        pool.close()
    assert ours(root, PAIRS) == theirs(root, PAIRS)


def test_a_limit_shorter_than_the_template_tail(tmp_path: Path) -> None:
    # The tail (3 tokens here) is restored in part over a 2-token conversation, its last
    # tokens; a single text's renders never differ with its content (this template has no
    # place for it), so no tail is restored over it.
    root = make_causal_reranker(tmp_path / "m", max_seq_length=2)
    for items in (PAIRS, TEXTS):
        expected = theirs(root, items)
        assert {len(ids) for ids in expected} == {2}
        assert ours(root, items) == expected


# Whitespace around block tags, the variables transformers passes, tojson: the rendered
# string is compared with transformers' own (the tiny tokenizer does not see whitespace).
VARIABLES = (
    "{%- for m in messages %}\n"
    "  {% if m.role == 'system' %}\n"
    "<sys>{{ m.content }}</sys>\n"
    "  {% else %}\n"
    "<{{ m.role }}>{{ m.content | tojson }}\n"
    "  {% endif %}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt is defined %}agp={{ add_generation_prompt }}{% endif %}\n"
    "tools={{ tools is none }} documents={{ documents is none }}\n"
    "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ extra }}\n"
    "{{ 'é' | tojson }}"
)


@pytest.mark.parametrize("system", [None, "judge"])
def test_the_render_is_transformers(tmp_path: Path, system: str | None) -> None:
    from transformers import AutoTokenizer

    kwargs = {"pad_token": "the pad", "extra": "more"}  # (over the special token)
    root = make_causal_reranker(tmp_path / "m", template=VARIABLES, chat_kwargs=kwargs)
    info = load_model_info(root)
    hf = AutoTokenizer.from_pretrained(str(root))
    before = tokenization._tokenizer, tokenization._chat
    try:
        tokenization._load(str(info.tokenizer_path), False, info.model_type,
                           info.conversations)
        chat = tokenization._chat
        assert chat is not None
        for item in [*PAIRS[:2], TEXTS[0]]:
            conversation = chat.conversation(item, system)
            expected = hf.apply_chat_template(conversation, tokenize=False, **kwargs)
            assert chat.render(conversation) == expected
    finally:
        tokenization._tokenizer, tokenization._chat = before
    assert "the pad|more" in expected and "agp=False" in expected
    assert ours(root, PAIRS, system) == theirs(root, PAIRS, system)


def test_the_tail_restored_is_the_prompts(tmp_path: Path) -> None:
    # The prompt is in this template's tail: each prompt's conversations get their own.
    template = TEMPLATE + ("{{ messages | selectattr('role', 'eq', 'system') "
                           "| map(attribute='content') | first | default('') }}")
    root = make_causal_reranker(tmp_path / "m", template=template)
    info = load_model_info(root)
    before = tokenization._tokenizer, tokenization._chat
    got = {}
    try:
        tokenization._load(str(info.tokenizer_path), False, info.model_type,
                           info.conversations)
        for system in ("yes", "no", "yes"):  # one formatter, its tails cached
            outcome = tokenization._encode(PAIRS[2:3], info.max_input_length, "right", system)
            assert outcome.error is None, outcome.error
            got[system] = outcome.value[0].ids.tolist()
    finally:
        tokenization._tokenizer, tokenization._chat = before
    for system, ids in got.items():
        assert len(ids) == info.max_input_length
        assert [ids] == theirs(root, PAIRS[2:3], system)


def test_empty_processing_settings_are_accepted(reranker: Path, tmp_path: Path) -> None:
    root = copy_of(reranker, tmp_path)
    set_json(root / "sentence_bert_config.json",
             processing_kwargs={"text": {}, "common": {}, "chat_template": {}})
    assert ours(root, PAIRS) == theirs(root, PAIRS)


@pytest.mark.parametrize("layout", ["map", "class-default", "named-class-default"])
def test_special_tokens_reach_the_template_as_transformers_resolves_them(
        tmp_path: Path, layout: str) -> None:
    """A template's eos_token / bos_token / pad_token where tokenizer_config.json names none:
    special_tokens_map.json's (files transformers 4 wrote, without added_tokens_decoder), else
    the tokenizer class's own defaults (Qwen2Tokenizer: <|endoftext|>), else none."""
    import json

    from transformers import AutoTokenizer

    template = TEMPLATE + "{{ bos_token }}|{{ eos_token }}|{{ pad_token }}"
    root = make_causal_reranker(tmp_path / "m", template=template)
    path = root / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key in ("eos_token", "pad_token", "added_tokens_decoder"):
        config.pop(key, None)
    if layout == "map":
        (root / "special_tokens_map.json").write_text(json.dumps(
            {"eos_token": {"content": "<|im_end|>", "special": True}, "pad_token": "[UNK]"}))
    elif layout == "named-class-default":
        config["tokenizer_class"] = "Qwen2Tokenizer"
    path.write_text(json.dumps(config))
    info = load_model_info(root)
    assert info.conversations is not None
    hf = AutoTokenizer.from_pretrained(str(root))
    before = tokenization._tokenizer, tokenization._chat
    try:
        tokenization._load(str(info.tokenizer_path), False, info.model_type, info.conversations)
        chat = tokenization._chat
        assert chat is not None
        conversation = chat.conversation(PAIRS[0], None)
        rendered = chat.render(conversation)
        assert rendered == hf.apply_chat_template(conversation, tokenize=False)
    finally:
        tokenization._tokenizer, tokenization._chat = before
    tail = {"map": "|<|im_end|>|[UNK]", "class-default": "||",
            "named-class-default": "|<|endoftext|>|<|endoftext|>"}[layout]
    assert rendered.endswith(tail), rendered[-40:]


@pytest.mark.parametrize("layout", ["config", "extra-dict", "map"])
def test_model_specific_tokens_reach_the_template_as_transformers_gives_them(
        tmp_path: Path, layout: str) -> None:
    """transformers 5 names to a template, besides the seven standard special tokens, the
    model-specific ones (tokenizer_config.json's other `*_token` texts, its dict of
    `extra_special_tokens`, special_tokens_map.json's `*_token` keys): a template that reads
    one (here in the tail, where the score is read) rendered it empty, another score."""
    import json

    template = TEMPLATE.replace("<|im_start|>assistant\n",
                                "<|im_start|>assistant\n{{ answer_token }}")
    root = make_causal_reranker(tmp_path / "m", template=template)
    path = root / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if layout == "config":
        config["answer_token"] = "yes"
        config["flag_token"] = True  # (not a token: no variable)
    elif layout == "extra-dict":
        config["extra_special_tokens"] = {"answer_token": "yes"}
    else:
        config.pop("added_tokens_decoder", None)
        (root / "special_tokens_map.json").write_text(json.dumps(
            {"answer_token": {"content": "yes", "special": True}}))
    path.write_text(json.dumps(config))
    expected = theirs(root, PAIRS)
    assert ours(root, PAIRS) == expected
    assert all(ids[-1] == expected[0][-1] for ids in expected)  # the tail, cut or not
