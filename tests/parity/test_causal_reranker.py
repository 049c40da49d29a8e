"""LogitScore re-rankers (a causal LM scoring a pair by its next-token logits): our raw score
against sentence-transformers' own CrossEncoder on the same token ids, for an untied LM head,
one tied to the embeddings, and a true token alone; and the checkpoints we refuse. Tiny random
Qwen3ForCausalLM saved by CrossEncoder itself, fp32 on CPU."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backend_worker.engine import Engine
from backend_worker.heads import build_head, run_head
from backend_worker.main import outputs
from backend_worker.models.decoder import LastTokenClassifier
from shared import protocol
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from shared.protocol import BatchArrays
from tests.fixtures.causal_reranker import make_causal_reranker
from tests.fixtures.decoders import set_json

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCORE_TOL = 1e-4
# Room for the template's frame and most documents; the last pair overflows it, so
# CrossEncoder truncates it (and restores the template's tail).
MAX_SEQ_LENGTH = 96
PAIRS = [
    ("what is the capital of france?", "Paris is the capital and largest city of France."),
    ("hi", "yes"),
    ("query", "no"),
    ("does the document meet the query?",
     "A much longer document, with punctuation; digits 0123456789 and MiXeD case: it spans "
     "well over forty word pieces so that the padding CrossEncoder adds is substantial, and "
     "then some more words so that it overflows the maximum sequence length of the model."),
    ("short", "a"),
]


def cross_encoder_inputs(model_dir: Path) -> tuple[list[list[int]], np.ndarray]:
    """The token ids CrossEncoder scores for PAIRS (left padding removed) and its raw scores."""
    from sentence_transformers import CrossEncoder

    model = CrossEncoder(str(model_dir), device="cpu")
    features = model[0].preprocess(PAIRS)
    ids = [row[mask.bool()].tolist()
           for row, mask in zip(features["input_ids"], features["attention_mask"], strict=True)]
    scores = model.predict(PAIRS, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    return ids, np.asarray(scores, dtype=np.float32).reshape(-1)


def pack_ids(ids: list[list[int]]) -> BatchArrays:
    """Sequences of token ids packed as the router sends them."""
    lengths = [len(seq) for seq in ids]
    return BatchArrays(
        input_ids=np.concatenate(ids).astype(np.int32),
        position_ids=np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
        token_type_ids=np.zeros(sum(lengths), dtype=np.int32),
        cu_seqlens=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
    )


def serve(model_dir: Path):
    info = load_model_info(model_dir)
    engine = Engine.load(info)
    return info, engine, build_head(info, engine.device)


CASES = [
    ("untied", {"tied": False}),
    ("tied", {"tied": True}),
    ("true-token-only", {"false_token": False, "seed": 1}),
]


@pytest.mark.parametrize(("case", "options"), CASES, ids=[c[0] for c in CASES])
def test_scores_match_cross_encoder(tmp_path: Path, case: str, options: dict) -> None:
    model_dir = make_causal_reranker(tmp_path / "m", max_seq_length=MAX_SEQ_LENGTH, **options)
    held = load_file(str(model_dir / "model.safetensors"))
    assert ("lm_head.weight" in held) is not options.get("tied", False)
    false_id = json.loads((model_dir / "1_LogitScore" / "config.json").read_text())[
        "false_token_id"]
    assert (false_id is None) is (case == "true-token-only")

    info, engine, head = serve(model_dir)
    assert info.kind == "reranker" and info.logit_score is not None
    assert isinstance(head, LastTokenClassifier)
    ids, expected = cross_encoder_inputs(model_dir)
    assert len(set(map(len, ids))) > 2, "the pairs must have different lengths"
    assert max(map(len, ids)) == MAX_SEQ_LENGTH, "one pair must be truncated"

    # Served like a one-label classifier: the LOGITS output, one raw float32 score a row.
    assert set(outputs(engine, head)) == {protocol.OutputKind.LOGITS,
                                          protocol.OutputKind.ALL_TOKENS}
    rows, dim, logits = run_head(engine, head)(pack_ids(ids))
    assert (rows, dim, logits.dtype) == (len(PAIRS), 1, np.float32)
    diff = float(np.abs(logits[:, 0] - expected).max())
    print(f"{case}: max abs diff of raw scores {diff:.2e} (scores {expected})")
    assert diff <= SCORE_TOL, diff
    # The scores differ between pairs: a head that ignored the hidden state would not pass.
    assert float(np.ptp(expected)) > 10 * SCORE_TOL
    # One at a time gives the same score as the ragged batch.
    single = run_head(engine, head)(pack_ids(ids[1:2]))[2]
    assert abs(float(single[0, 0]) - float(expected[1])) <= SCORE_TOL


def test_untied_without_lm_head_is_refused(tmp_path: Path) -> None:
    model_dir = make_causal_reranker(tmp_path / "m", tied=False)
    state = load_file(str(model_dir / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(model_dir / "model.safetensors"))
    info = load_model_info(model_dir)
    engine = Engine.load(info)  # the decoder itself does not need the LM head
    with pytest.raises(ConfigError, match=r"missing lm_head\.weight .*tie_word_embeddings"):
        build_head(info, engine.device)
    # Leaving the key out of config.json is untied too: transformers' Qwen3 default.
    set_json(model_dir / "config.json", tie_word_embeddings=None)
    with pytest.raises(ConfigError, match=r"missing lm_head\.weight"):
        build_head(load_model_info(model_dir), engine.device)


def test_non_decoder_family_is_refused(tmp_path: Path) -> None:
    # Gemma3ForCausalLM is a *ForCausalLM of a family served here (EmbeddingGemma), but not as
    # a LogitScore re-ranker.
    model_dir = make_causal_reranker(tmp_path / "m")
    set_json(model_dir / "config.json", model_type="gemma3_text",
             architectures=["Gemma3ForCausalLM"])
    info = load_model_info(model_dir)
    assert info.logit_score is not None
    with pytest.raises(ConfigError, match=r"model_type 'gemma3_text' as a LogitScore"):
        build_head(info, torch.device("cpu"))


def test_token_ids_outside_the_lm_head_are_refused(tmp_path: Path) -> None:
    # An LM head with fewer rows than vocab_size says (the ids pass modelinfo's vocab check).
    model_dir = make_causal_reranker(tmp_path / "m")
    state = load_file(str(model_dir / "model.safetensors"))
    score = json.loads((model_dir / "1_LogitScore" / "config.json").read_text())
    true_id, false_id = score["true_token_id"], score["false_token_id"]
    rows = min(true_id, false_id)
    state["lm_head.weight"] = state["lm_head.weight"][:rows].contiguous()
    save_file(state, str(model_dir / "model.safetensors"))
    info = load_model_info(model_dir)
    with pytest.raises(ConfigError, match=rf"\[{true_id}, {false_id}\] are outside .*{rows} rows"):
        build_head(info, torch.device("cpu"))


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "unprefixed"])
def test_other_checkpoint_layouts_give_the_same_head(tmp_path: Path, layout: str) -> None:
    # Tied: the embeddings also saved without the "model." nesting (a base model's keys).
    model_dir = make_causal_reranker(tmp_path / "m", tied=True)
    info = load_model_info(model_dir)
    expected = build_head(info, torch.device("cpu")).score.weight.detach().clone()
    state = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    if layout == "unprefixed":
        state = {key.removeprefix("model."): value for key, value in state.items()}
        save_file(state, str(model_dir / "model.safetensors"))
    else:
        torch.save(state, str(model_dir / layout))
    head = build_head(load_model_info(model_dir), torch.device("cpu"))
    assert torch.equal(head.score.weight, expected)


@pytest.mark.parametrize("bad", ["int", "columns"])
def test_an_lm_head_of_another_dtype_or_width_is_refused_by_name(tmp_path: Path, bad: str) -> None:
    """Integer rows would be cast to float32 without a word, and rows of another width than
    hidden_size would fail later without naming the tensor."""
    model_dir = make_causal_reranker(tmp_path / "m")
    state = load_file(str(model_dir / "model.safetensors"))
    weight = state["lm_head.weight"]
    hidden = weight.shape[1]
    state["lm_head.weight"] = (weight.to(torch.int32) if bad == "int"
                               else torch.cat([weight, weight[:, :1]], dim=1).contiguous())
    save_file(state, str(model_dir / "model.safetensors"))
    info = load_model_info(model_dir)
    with pytest.raises(ConfigError) as caught:
        build_head(info, torch.device("cpu"))
    assert str(caught.value) == (
        f"{model_dir}: lm_head.weight is torch.int32, not floating point" if bad == "int"
        else f"{model_dir}: lm_head.weight has {hidden + 1} columns, hidden_size is {hidden}")


def test_an_lm_head_not_a_matrix_or_a_tie_not_a_bool_is_refused(tmp_path: Path) -> None:
    model_dir = make_causal_reranker(tmp_path / "m")
    path = model_dir / "model.safetensors"
    state = load_file(str(path))
    shape = tuple(state["lm_head.weight"].shape)
    state["lm_head.weight"] = state["lm_head.weight"].flatten().contiguous()
    save_file(state, str(path))
    with pytest.raises(ConfigError) as caught:
        build_head(load_model_info(model_dir), torch.device("cpu"))
    assert str(caught.value) == (f"{path}: lm_head.weight has shape ({shape[0] * shape[1]},), "
                                 "not vocabulary x hidden")
    del state["lm_head.weight"]
    save_file(state, str(path))
    set_json(model_dir / "config.json", tie_word_embeddings="yes")
    with pytest.raises(ConfigError) as caught:
        build_head(load_model_info(model_dir), torch.device("cpu"))
    assert str(caught.value) == ("config.json: tie_word_embeddings must be true or false, "
                                 "found 'yes'")
