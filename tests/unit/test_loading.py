"""Strict weight loading and model resolution: every failure is a ConfigError naming the key."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from backend_worker.engine import Engine
from backend_worker.loading import Rule, WeightMap, checkpoint_files, load_strict
from backend_worker.models import model_class, supported
from backend_worker.models.bert import BertModel
from backend_worker.models.jina import JinaBertModel
from backend_worker.pooling import Pooler
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from shared.st_modules import DenseSpec
from tests.fixtures.tiny import make_tiny_bert, pack

os.environ.setdefault("HF_HUB_OFFLINE", "1")

JINA_AUTO_MAP = {
    "AutoConfig": "jinaai/jina-bert-implementation--configuration_bert.JinaBertConfig",
    "AutoModel": "jinaai/jina-bert-implementation--modeling_bert.JinaBertModel",
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("pristine") / "m", pooling="cls", dense_out=8)


@pytest.fixture
def model_dir(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "m"))


def edit_weights(path: Path, edit) -> None:
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))


def load(model_dir: Path) -> Engine:
    return Engine.load(load_model_info(model_dir))


def test_pristine_model_loads(model_dir: Path) -> None:
    # The checkpoint carries pooler.* keys, which are ignored explicitly.
    assert any(k.startswith("pooler.") for k in load_file(str(model_dir / "model.safetensors")))
    load(model_dir)


@pytest.mark.parametrize(
    "key",
    [
        "encoder.layer.1.attention.output.dense.weight",
        "embeddings.LayerNorm.bias",
        "encoder.layer.0.attention.self.key.bias",  # one slice of a fused QKV
    ],
)
def test_missing_key_is_named(model_dir: Path, key: str) -> None:
    edit_weights(model_dir / "model.safetensors", lambda s: s.pop(key))
    # (the message starts with tmp_path, which holds this test's name: match past it)
    with pytest.raises(ConfigError, match=r"strictly: missing \(") as info:
        load(model_dir)
    assert str(info.value).count(key) == 1, "named once (a fused slice: not its whole parameter)"


@pytest.mark.parametrize(
    "key",
    ["encoder.layer.0.attention.self.rotary.weight", "encoder.extra.weight", "lm_head.bias",
     # A known name plus a trailing segment is not that name: templates and ignore patterns
     # match whole keys, never a prefix.
     "encoder.layer.0.output.dense.weight.extra", "embeddings.position_ids.extra",
     # A layer past num_hidden_layers, in a parameter of its own (not fused).
     "encoder.layer.2.output.dense.weight"],
)
def test_unexpected_key_is_named(model_dir: Path, key: str) -> None:
    edit_weights(model_dir / "model.safetensors", lambda s: s.update({key: torch.zeros(3)}))
    # (the message starts with tmp_path, which holds this test's name: match past it)
    with pytest.raises(ConfigError, match=r"strictly: unexpected keys: ") as info:
        load(model_dir)
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("key", "shape"),
    [
        ("embeddings.position_embeddings.weight", (64, 32)),
        ("encoder.layer.1.intermediate.dense.bias", (65,)),
        ("encoder.layer.0.attention.self.value.weight", (32, 31)),  # fused slice, inner dim
        ("encoder.layer.0.attention.self.query.weight", (31, 32)),  # fused slice, outer dim
        ("encoder.layer.1.intermediate.dense.weight", (32, 64)),  # transposed: same size
    ],
)
def test_wrong_shape_is_named(model_dir: Path, key: str, shape: tuple[int, ...]) -> None:
    edit_weights(model_dir / "model.safetensors", lambda s: s.update({key: torch.zeros(shape)}))
    with pytest.raises(ConfigError, match="shape mismatch") as info:
        load(model_dir)
    assert key in str(info.value)
    assert "missing" not in str(info.value), "a refused tensor is reported once"


def test_fused_slices_are_checked_one_by_one(model_dir: Path) -> None:
    # 33 + 32 + 31 rows add up to the fused 96: only a per-slice check sees it.
    prefix = "encoder.layer.0.attention.self."

    def skew(state: dict[str, torch.Tensor]) -> None:
        query, value = state[prefix + "query.weight"], state[prefix + "value.weight"]
        state[prefix + "query.weight"] = torch.cat([query, torch.zeros(1, query.shape[1])])
        state[prefix + "value.weight"] = value[:-1].contiguous()

    edit_weights(model_dir / "model.safetensors", skew)
    with pytest.raises(ConfigError, match="shape mismatch") as info:
        load(model_dir)
    assert prefix + "query.weight" in str(info.value)
    assert prefix + "value.weight" in str(info.value)


def test_a_layer_past_the_configured_count_is_unexpected(model_dir: Path) -> None:
    # Its Q/K/V slices fuse into a parameter the 2-layer model does not have.
    def add_layer(state: dict[str, torch.Tensor]) -> None:
        state.update({k.replace("layer.1.", "layer.2."): v.clone() for k, v in state.items()
                      if k.startswith("encoder.layer.1.")})

    edit_weights(model_dir / "model.safetensors", add_layer)
    with pytest.raises(ConfigError, match=r"unexpected keys: .*encoder\.layer\.2\.attention"
                                          r"\.self\.key\.bias"):
        load(model_dir)


@pytest.mark.parametrize("shape", [(32, 1), ()])
def test_a_fused_slice_of_the_wrong_rank_is_a_shape_mismatch(model_dir: Path,
                                                              shape: tuple[int, ...]) -> None:
    key = "encoder.layer.0.attention.self.query.bias"
    edit_weights(model_dir / "model.safetensors", lambda s: s.update({key: torch.zeros(shape)}))
    with pytest.raises(ConfigError, match="shape mismatch") as info:
        load(model_dir)
    assert key in str(info.value)


@pytest.mark.parametrize(
    ("key", "dtype"),
    [("encoder.layer.0.output.dense.weight", torch.int8),
     ("embeddings.LayerNorm.weight", torch.bool),
     ("encoder.layer.0.attention.self.key.weight", torch.int32)],  # fused slice
)
def test_a_non_float_tensor_is_refused_not_cast(model_dir: Path, key: str,
                                               dtype: torch.dtype) -> None:
    edit_weights(model_dir / "model.safetensors", lambda s: s.update({key: s[key].to(dtype)}))
    with pytest.raises(ConfigError, match="dtype mismatch") as info:
        load(model_dir)
    assert key in str(info.value)
    assert "missing" not in str(info.value), "a refused tensor is reported once"


def test_float_values_for_an_integer_buffer_are_refused_not_truncated(tmp_path: Path) -> None:
    class Mapped(torch.nn.Module):  # as a StaticEmbedding's id mapping
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mapping", torch.zeros(4, dtype=torch.int64))

    path = tmp_path / "model.safetensors"
    weight_map = WeightMap(rules=(Rule("mapping", "mapping"),))
    save_file({"mapping": torch.tensor([0.0, 1.5, 2.0, 3.0])}, str(path))
    with pytest.raises(ConfigError, match=r"dtype mismatch for mapping: checkpoint "
                                          r"torch\.float32, model torch\.int64"):
        load_strict(Mapped(), [path], weight_map)
    save_file({"mapping": torch.tensor([3, 2, 1, 0])}, str(path))
    module = Mapped()
    load_strict(module, [path], weight_map)
    assert module.mapping.tolist() == [3, 2, 1, 0]


def test_legacy_gamma_beta_names_load_identically(model_dir: Path, pristine: Path) -> None:
    def rename(state: dict) -> None:
        for key in [k for k in state if "LayerNorm" in k]:
            new = key.replace("LayerNorm.weight", "LayerNorm.gamma")
            state[new.replace("LayerNorm.bias", "LayerNorm.beta")] = state.pop(key)

    edit_weights(model_dir / "model.safetensors", rename)
    arrays, _ = pack(pristine, ["hello world", "the weather is lovely"])
    assert np.array_equal(load(model_dir).embed(arrays), load(pristine).embed(arrays))


def test_keys_nested_under_the_family_prefix_load_identically(model_dir: Path,
                                                             pristine: Path) -> None:
    # BertFor* checkpoints nest the encoder in "bert.".
    edit_weights(model_dir / "model.safetensors",
                 lambda state: state.update({f"bert.{k}": state.pop(k) for k in list(state)}))
    arrays, _ = pack(pristine, ["hello world", "the weather is lovely"])
    assert np.array_equal(load(model_dir).embed(arrays), load(pristine).embed(arrays))


def test_dense_module_is_strict(model_dir: Path) -> None:
    dense = model_dir / "2_Dense" / "model.safetensors"
    edit_weights(dense, lambda s: s.update({"residual.weight": torch.zeros(8, 32)}))
    with pytest.raises(ConfigError, match=r"unexpected keys: residual\.weight"):
        load(model_dir)
    edit_weights(dense, lambda s: (s.pop("residual.weight"), s.pop("linear.bias")))
    with pytest.raises(ConfigError, match=r"missing.*linear\.bias"):
        load(model_dir)


def test_no_weights_found(model_dir: Path) -> None:
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="no weights found"):
        checkpoint_files(model_dir)


def test_shard_listed_but_absent(model_dir: Path) -> None:
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"shards listed but not found.*model-00002-of-00002"):
        checkpoint_files(model_dir)


def shard(model_dir: Path, weight_map) -> None:
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00001.safetensors")
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("weight_map", [{}, ["model-00001-of-00001.safetensors"], {"a": 1}])
def test_a_malformed_shard_index_is_refused(model_dir: Path, weight_map) -> None:
    shard(model_dir, weight_map)
    with pytest.raises(ConfigError, match="shard index"):
        checkpoint_files(model_dir)


def test_a_tensor_the_index_lists_but_no_shard_holds_is_refused(model_dir: Path) -> None:
    keys = load_file(str(model_dir / "model.safetensors"))
    # pooler.* would be ignored, but its absence still means a truncated download.
    shard(model_dir, {**dict.fromkeys(keys, "model-00001-of-00001.safetensors"),
                      "pooler.extra": "model-00001-of-00001.safetensors"})
    with pytest.raises(ConfigError, match=r"in no shard.*pooler\.extra"):
        checkpoint_files(model_dir)
    shard_file = model_dir / "model-00001-of-00001.safetensors"
    shard_file.rename(model_dir / "model.safetensors")
    shard(model_dir, dict.fromkeys(keys, "model-00001-of-00001.safetensors"))
    load(model_dir)  # the complete index loads


@pytest.mark.parametrize("key", ["encoder.layer.0.output.dense.weight",
                                 "encoder.layer.0.attention.self.query.weight"])  # fused slice
def test_a_tensor_two_shards_hold_is_refused(model_dir: Path, key: str) -> None:
    # Two shards of a mixed-up download both hold the key (its index names one): whichever is
    # read last must not win silently.
    state = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").rename(model_dir / "model-00001-of-00002.safetensors")
    save_file({key: state[key] + 1}, str(model_dir / "model-00002-of-00002.safetensors"))
    index = {**dict.fromkeys(state, "model-00001-of-00002.safetensors"),
             key: "model-00002-of-00002.safetensors"}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    with pytest.raises(ConfigError, match=r"filled twice|both fill one slice") as info:
        load(model_dir)
    assert key in str(info.value)


def test_a_non_tensor_in_a_bin_checkpoint_is_refused(model_dir: Path) -> None:
    state = load_file(str(model_dir / "model.safetensors"))
    state["embeddings.LayerNorm.weight"] = [1.0, 2.0]
    (model_dir / "model.safetensors").unlink()
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"LayerNorm\.weight.*not a tensor"):
        load(model_dir)


def test_a_bin_checkpoint_that_is_not_a_state_dict_is_refused(model_dir: Path) -> None:
    state = load_file(str(model_dir / "model.safetensors"))
    (model_dir / "model.safetensors").unlink()
    torch.save(list(state.values()), model_dir / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="not a state dict"):
        load(model_dir)


class _Opens:
    """A pickle that runs code when loaded (here: creates a file)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_checkpoint_cut_short_is_refused_by_name(model_dir: Path) -> None:
    # An interrupted copy or download: refused as a configuration error (the worker's Fatal
    # names the file), not a traceback from safetensors.
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ConfigError) as refused:
        load(model_dir)
    assert str(refused.value).startswith(f"{weights}: cannot read weights: ")


def test_a_bin_checkpoint_never_runs_its_pickled_code(model_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    (model_dir / "model.safetensors").unlink()
    torch.save({"embeddings.LayerNorm.weight": _Opens(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="cannot read weights"):
        load(model_dir)
    assert not marker.exists()


def test_a_template_placeholder_is_one_name_segment() -> None:
    rule = Rule("layers.{i}.out.{w}", "blocks.{i}.down.{w}")
    assert rule.forward("layers.3.out.weight") == ("blocks.3.down.weight", None, ())
    assert rule.forward("layers.3.extra.out.weight") is None
    assert rule.sources_of("blocks.3.extra.down.weight") == []


class _Many(torch.nn.Module):
    def __init__(self, count: int) -> None:
        super().__init__()
        for i in range(count):
            self.register_parameter(f"p{i:02d}", torch.nn.Parameter(torch.zeros(1)))


@pytest.mark.parametrize(("held", "named", "more"), [(1, 10, ""), (0, 10, " and 1 more")])
def test_an_error_names_ten_keys_and_counts_the_rest(tmp_path: Path, held: int, named: int,
                                                      more: str) -> None:
    path = tmp_path / "model.safetensors"
    save_file({f"p{i:02d}": torch.zeros(1) for i in range(held)}, str(path))
    with pytest.raises(ConfigError, match="missing") as info:
        load_strict(_Many(11), [path], WeightMap(rules=(Rule("{name}", "{name}"),)))
    listed = str(info.value).split("fills): ")[1]
    assert listed.count("p") == named
    assert listed.endswith(f"p{named + held - 1:02d}{more}")


def test_jinabert_v2_is_served_as_jina_not_bert(model_dir: Path) -> None:
    # A BERT checkpoint under a JinaBERT config: the marker routes it to the Jina family, whose
    # strict load then finds BERT's position table and MLP names unexpected.
    config = json.loads((model_dir / "config.json").read_text())
    config |= {"architectures": ["JinaBertForMaskedLM"], "auto_map": JINA_AUTO_MAP,
               "position_embedding_type": "alibi", "feed_forward_type": "geglu"}
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="position_embeddings"):
        load(model_dir)


def test_jina_marker_alone_is_enough() -> None:
    # Even with BERT's own architecture name, the auto_map marks custom code: never plain BERT.
    config = {"model_type": "bert", "architectures": ["BertModel"], "auto_map": JINA_AUTO_MAP}
    assert model_class(config) is JinaBertModel


def test_unknown_jina_implementation_is_refused() -> None:
    config = {"model_type": "bert", "architectures": ["BertModel"],
              "auto_map": {"AutoModel": "jinaai/jina-bert-flash-implementation--x.JinaBertModel"}}
    with pytest.raises(ConfigError, match="JinaBERT"):
        model_class(config)


def test_classifier_encoder_resolves_to_bert() -> None:
    # Its head (pooler + classifier) is loaded by backend_worker/heads.py.
    config = {"model_type": "bert", "architectures": ["BertForSequenceClassification"]}
    assert model_class(config) is BertModel


def test_plain_bert_resolves() -> None:
    assert model_class({"model_type": "bert", "architectures": ["BertForMaskedLM"]}) is BertModel


def test_unknown_model_type_lists_supported() -> None:
    with pytest.raises(ConfigError) as info:
        model_class({"model_type": "umt5", "architectures": ["UMT5EncoderModel"]})
    message = str(info.value)
    assert "'umt5'" in message and "UMT5EncoderModel" in message
    assert "supported model types" in message and "bert" in message
    assert "bert" in supported()


@pytest.mark.parametrize(
    "override",
    [{"is_decoder": True}, {"position_embedding_type": "relative_key"}, {"hidden_act": "mish"}],
)
def test_bert_variants_we_would_compute_wrongly_are_refused(
    model_dir: Path, override: dict
) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | override))
    with pytest.raises(ConfigError, match=next(iter(override))):
        load(model_dir)


def test_splade_pooler_constructs_but_never_pools() -> None:
    # The Engine builds a Pooler for every model; SPLADE's vectors come from heads.SpladeHead.
    pooler = Pooler("splade", [])
    with pytest.raises(RuntimeError, match="SPARSE"):
        pooler(torch.zeros(3, 4), torch.tensor([0, 3]))


def test_splade_pooling_with_dense_modules_is_refused() -> None:
    """SPLADE's vectors come from the MLM head, past the Pooler's Dense stack: a Dense module
    after it would be skipped silently, and the vectors differ from sentence-transformers'."""
    spec = DenseSpec("2_Dense", 4, 2, True, "torch.nn.modules.linear.Identity")
    with pytest.raises(ConfigError, match="splade pooling with Dense"):
        Pooler("splade", [spec])

def test_missing_pooling_is_refused() -> None:
    with pytest.raises(ConfigError, match="--pooling"):
        Pooler(None, [])


def test_attention_selection_touches_no_accelerator() -> None:
    from backend_worker.attention import PaddedSDPA, select_attention

    assert isinstance(select_attention("cpu"), PaddedSDPA)
    # The CUDA slot is chosen from the device string alone: no CUDA initialisation.
    select_attention("cuda:0")
    assert not torch.cuda.is_initialized()
    with pytest.raises(ConfigError, match="no attention implementation"):
        select_attention("meta")
