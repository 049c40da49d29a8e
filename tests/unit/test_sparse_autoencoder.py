"""A CSR SparseEncoder's files on hand-written model directories: the SparseAutoEncoder's settings
as read (shared/sparse_autoencoder.py), what is refused and where it is named, and the strict load
of its weights (backend_worker/csr_head.py). Parity with SparseEncoder: tests/parity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from backend_worker.csr_head import build_csr_head
from shared.errors import ConfigError
from shared.modelinfo import load_model_info
from tests.unit.test_modelinfo import BERT_CONFIG, model_dir, st6_pooling, write

SAE = "sentence_transformers.sparse_encoder.modules.sparse_auto_encoder.SparseAutoEncoder"
SAE_V5 = "sentence_transformers.sparse_encoder.models.SparseAutoEncoder"
SAE_CONFIG = {"input_dim": 32, "hidden_dim": 48, "k": 5, "k_aux": 10, "normalize": True,
              "dead_threshold": 30}
CSR = [("Transformer", ""), ("Pooling", "1_Pooling"), (SAE, "2_SparseAutoEncoder")]
CSR_L2 = [("Transformer", ""), ("Pooling", "1_Pooling"), ("Normalize", "2_Normalize"),
          (SAE, "3_SparseAutoEncoder")]


def csr_dir(root: Path, *, modules: list[tuple[str, str]] = CSR, sae: dict[str, Any] | None = None,
            st_config: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
            extra: dict[str, Any] | None = None) -> Path:
    sae_path = next(path for kind, path in modules if kind in (SAE, SAE_V5))
    files: dict[str, Any] = {
        "1_Pooling/config.json": st6_pooling("mean"),
        f"{sae_path}/config.json": SAE_CONFIG if sae is None else sae,
        "config_sentence_transformers.json": st_config or {"model_type": "SparseEncoder"},
    }
    return model_dir(root, config=config, modules=modules, style="v6", files=files | (extra or {}))


def test_the_modules_settings_and_the_sparse_width(tmp_path: Path) -> None:
    info = load_model_info(csr_dir(tmp_path))
    assert info.csr is not None
    assert (info.csr.input_dim, info.csr.hidden_dim, info.csr.k) == (32, 48, 5)
    assert (info.csr.standardize, info.csr.l2_first) == (True, False)
    assert (info.pooling, info.embedding_dim, info.lexical) == ("mean", 48, None)
    assert info.sparse_vectors == "csr"
    with_l2 = load_model_info(csr_dir(tmp_path / "l2", modules=CSR_L2))
    assert with_l2.csr is not None and with_l2.csr.l2_first and with_l2.has_normalize


def test_a_csr_model_has_no_lexical_weights(tmp_path: Path) -> None:
    """BGE-M3's head file beside a CSR model's weights is not a second SPARSE output."""
    root = csr_dir(tmp_path)
    (root / "sparse_linear.pt").write_bytes(b"")
    assert load_model_info(root).lexical is None


def test_missing_settings_are_the_modules_defaults(tmp_path: Path) -> None:
    """SparseAutoEncoder(input_dim): hidden_dim 512, k 8, normalize false."""
    info = load_model_info(csr_dir(tmp_path, sae={"input_dim": 32}))
    assert info.csr is not None
    assert (info.csr.hidden_dim, info.csr.k, info.csr.standardize) == (512, 8, False)


def test_max_active_dims_replaces_k(tmp_path: Path) -> None:
    info = load_model_info(csr_dir(tmp_path, st_config={"max_active_dims": 40}))
    assert info.csr is not None and info.csr.k == 40


def test_k_may_keep_the_whole_width(tmp_path: Path) -> None:
    """torch.topk takes k == hidden_dim (every latent kept, then relu): served, whether k is the
    module's or max_active_dims."""
    info = load_model_info(csr_dir(tmp_path / "k", sae=SAE_CONFIG | {"k": 48}))
    assert info.csr is not None and info.csr.k == 48
    info = load_model_info(csr_dir(tmp_path / "max", st_config={"max_active_dims": 48}))
    assert info.csr is not None and info.csr.k == 48


def test_the_pooling_override_replaces_the_pooling_mode_only(tmp_path: Path) -> None:
    info = load_model_info(csr_dir(tmp_path), pooling_override="cls")
    assert info.pooling == "cls" and info.csr is not None


@pytest.mark.parametrize(("modules", "named"), [
    ([("Transformer", ""), (SAE, "1_SparseAutoEncoder")], "Transformer -> SparseAutoEncoder"),
    ([*CSR, ("Normalize", "3_Normalize")], "SparseAutoEncoder -> Normalize"),
    ([("Transformer", ""), ("Pooling", "1_Pooling"), ("Dense", "2_Dense"),
      (SAE, "3_SparseAutoEncoder")], "Pooling -> Dense -> SparseAutoEncoder"),
    ([*CSR, (SAE, "3_SparseAutoEncoder")], "SparseAutoEncoder -> SparseAutoEncoder"),
    ([("Pooling", "1_Pooling"), ("Transformer", ""), (SAE, "2_SparseAutoEncoder")],
     "Pooling -> Transformer"),
])
def test_other_places_for_the_module_are_refused(
        tmp_path: Path, modules: list[tuple[str, str]], named: str) -> None:
    root = csr_dir(tmp_path, modules=modules,
                   extra={"2_Dense/config.json": {"in_features": 32, "out_features": 32}})
    with pytest.raises(ConfigError, match=f"modules.json: .*{named}.*served only as"):
        load_model_info(root)


@pytest.mark.parametrize(("sae", "st_config", "named"), [
    (SAE_CONFIG | {"module_input_name": "token_embeddings"}, None,
     r"settings \['module_input_name'\] are not known"),
    ({"hidden_dim": 48}, None, "without input_dim"),
    (SAE_CONFIG | {"k": 0}, None, "k 0 is not a positive integer"),
    # (torch.topk refuses a bool k: SparseEncoder.encode fails.)
    (SAE_CONFIG | {"k": True}, None, "k True is not a positive integer"),
    (SAE_CONFIG | {"k": 49}, None, "k 49 is more than hidden_dim 48"),
    (SAE_CONFIG | {"hidden_dim": 48.0}, None, "hidden_dim 48.0 is not a positive integer"),
    (SAE_CONFIG | {"normalize": "yes"}, None, "normalize 'yes' is not true or false"),
    (SAE_CONFIG | {"input_dim": 16}, None, "input_dim 16 is not the pooled embedding's size 32"),
    (SAE_CONFIG, {"max_active_dims": 49},
     "config_sentence_transformers.json: max_active_dims 49 is more than"),
    (SAE_CONFIG, {"max_active_dims": 0}, "config_sentence_transformers.json: max_active_dims 0"),
])
def test_unusable_settings_are_refused_by_file_and_name(
        tmp_path: Path, sae: dict[str, Any], st_config: dict[str, Any] | None,
        named: str) -> None:
    with pytest.raises(ConfigError, match=named) as refused:
        load_model_info(csr_dir(tmp_path, sae=sae, st_config=st_config))
    assert ".json: " in str(refused.value)  # the file is named


def test_unservable_combinations_are_refused(tmp_path: Path) -> None:
    root = csr_dir(tmp_path)
    with pytest.raises(ConfigError, match="--pooling splade"):
        load_model_info(root, pooling_override="splade")
    write(root / "2_Dense" / "config.json", {"in_features": 32, "out_features": 32})
    with pytest.raises(ConfigError, match="--dense-path '2_Dense'"):
        load_model_info(root, dense_path="2_Dense")
    classifier = csr_dir(tmp_path / "clf", config=BERT_CONFIG | {
        "architectures": ["BertForSequenceClassification"], "id2label": {"0": "a", "1": "b"}})
    with pytest.raises(ConfigError, match="SparseAutoEncoder over a classifier"):
        load_model_info(classifier)


# -- weights ---------------------------------------------------------------------------------


def _tensors(**changes: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """A SparseAutoEncoder(32, 48) state dict as safetensors saves it (the tied encoder weight
    under the name it kept), with `changes` (None: drop the key)."""
    gen = torch.Generator().manual_seed(0)
    tensors: dict[str, torch.Tensor | None] = {
        "pre_bias": torch.randn(32, generator=gen),
        "decoder.linear.weight": torch.randn(48, 32, generator=gen),
        "latent_bias": torch.randn(48, generator=gen),
        "stats_last_nonzero": torch.zeros(48, dtype=torch.long),
    }
    tensors |= changes
    return {key: value for key, value in tensors.items() if value is not None}


def _load(tmp_path: Path, tensors: dict[str, torch.Tensor], name: str = "model.safetensors"):
    from safetensors.torch import save_file

    root = csr_dir(tmp_path)
    path = root / "2_SparseAutoEncoder" / name
    if name.endswith(".bin"):
        torch.save(tensors, str(path))
    else:
        save_file(tensors, str(path))
    return build_csr_head(load_model_info(root), torch.device("cpu"))


def test_the_weights_load_under_either_tied_name(tmp_path: Path) -> None:
    saved = _tensors()
    head = _load(tmp_path / "a", saved)
    assert torch.equal(head.encoder.weight, saved["decoder.linear.weight"])
    assert torch.equal(head.encoder.bias, saved["latent_bias"])
    assert torch.equal(head.pre_bias, saved["pre_bias"])
    weight = saved["decoder.linear.weight"]
    renamed = _tensors(**{"decoder.linear.weight": None, "encoder.weight": weight})
    assert torch.equal(_load(tmp_path / "b", renamed).encoder.weight, weight)
    # A torch.save of the module's state dict holds the tied tensor under both names.
    both = _tensors(**{"encoder.weight": weight, "stats_last_nonzero": None})
    assert torch.equal(_load(tmp_path / "c", both, "pytorch_model.bin").encoder.weight, weight)


@pytest.mark.parametrize(("changes", "named"), [
    ({"latent_bias": None}, "missing .*latent_bias"),
    ({"pre_bias": None}, "missing .*pre_bias"),
    ({"decoder.linear.weight": None}, "missing .*encoder.weight"),
    ({"decoder.bias": torch.zeros(32)}, "unexpected keys: decoder.bias"),
    ({"pre_bias": torch.zeros(48)}, "shape mismatch for pre_bias"),
    ({"latent_bias": torch.zeros(48, dtype=torch.int32)}, "dtype mismatch for latent_bias"),
    ({"encoder.weight": torch.zeros(48, 32)}, "encoder.weight and decoder.linear.weight differ"),
])
def test_missing_extra_or_wrong_weights_are_refused(
        tmp_path: Path, changes: dict[str, torch.Tensor | None], named: str) -> None:
    with pytest.raises(ConfigError, match=f"2_SparseAutoEncoder.*{named}"):
        _load(tmp_path, _tensors(**changes))


def test_no_weights_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="2_SparseAutoEncoder: no weights found"):
        build_csr_head(load_model_info(csr_dir(tmp_path)), torch.device("cpu"))


def test_a_pooling_that_leaves_the_prompt_out_is_refused(tmp_path: Path) -> None:
    """The CSR head pools for itself, without the prompt exclusion the Pooler applies."""
    root = csr_dir(tmp_path, extra={"1_Pooling/config.json":
                                    st6_pooling("mean", include_prompt=False)})
    with pytest.raises(ConfigError, match="include_prompt"):
        load_model_info(root)
