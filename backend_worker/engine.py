"""The worker's compute: a loaded model plus pooling, turning a packed batch into vectors.

The engine knows nothing about tokenization; it takes token ids, positions and token types as
BatchArrays and returns float32 [n, embedding_dim]. Device, dtype and attention implementation
are fixed in `Engine.load`; `embed` has no per-call decisions beyond the batch's shape.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from backend_worker.attention import Attention, PackedVarlen, attention_candidates
from backend_worker.cpu_linear import pack_linears, packing_available
from backend_worker.experts import MixtureOfExperts
from backend_worker.graphs import Capture, GraphedPooling, graph_buckets
from backend_worker.loading import checkpoint_files, load_strict
from backend_worker.models import EncoderModel, model_class
from backend_worker.pooling import Pooler
from backend_worker.staging import HostStaging
from shared.modelinfo import ModelInfo
from shared.protocol import BatchArrays, CostModel

log = logging.getLogger(__name__)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def first_line(exc: Exception) -> str:
    """What a log line says of a torch error (whose later lines are a C++ backtrace)."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def _build(model_cls: type[EncoderModel], info: ModelInfo, attention: Attention,
           device: torch.device, dtype: torch.dtype) -> EncoderModel:
    # Built on the meta device: no random init of weights that the loader overwrites anyway
    # (strict loading guarantees every tensor is filled), then materialised on the target.
    with torch.device("meta"):
        model = model_cls.from_config(info.config, attention)
    assert isinstance(model, nn.Module)
    model.to(dtype).to_empty(device=device)  # both in place
    # The instance's map: a family may adjust its class map to the config (DeBERTa).
    load_strict(model, checkpoint_files(info.model_dir), model.weight_map)
    model.eval()
    return model


def _first_that_runs(model_cls: type[EncoderModel], info: ModelInfo, candidates: list[Attention],
                     device: torch.device, dtype: torch.dtype) -> tuple[EncoderModel, Attention]:
    """The model built on the first candidate attention that runs it here; the last candidate
    is taken untried (padded SDPA, which runs wherever torch does)."""
    for attention in candidates[:-1]:
        model = _build(model_cls, info, attention, device, dtype)
        # Whether a varlen kernel runs depends on the GPU (flash kernels need compute
        # capability >= 8.0) and on the model (its head size), known only by trying: a user
        # with an older GPU or an unusual model gets a slower server, not none.
        problem = _cannot_run(model, attention, device)
        if problem is None:
            return model, attention
        log.warning("attention %s cannot run this model on %s (%s): falling back",
                    attention.name, device, problem)
        del model  # before the next copy is built: never two models on the device at once
    attention = candidates[-1]
    return _build(model_cls, info, attention, device, dtype), attention


def _cannot_run(model: EncoderModel, attention: Attention, device: torch.device) -> str | None:
    """Why `model` fails on `attention` here (None when it runs): two short sequences through
    every layer, which meets the same kernel checks as any real batch."""
    host_cu = np.array([0, 2, 5], dtype=np.int32)
    ids = torch.zeros(5, dtype=torch.int64, device=device)  # id 0 exists in every vocabulary
    positions = torch.tensor([0, 1, 0, 1, 2], device=device)
    cu_seqlens = torch.from_numpy(host_cu.astype(np.int64)).to(device)
    try:
        with torch.inference_mode():
            model(ids, positions, torch.zeros_like(ids), attention.prepare(cu_seqlens, host_cu))
    except torch.OutOfMemoryError:
        raise  # a full device, not an unsupported kernel: another attention would not help
    except RuntimeError as exc:  # what torch raises for an unsupported dtype, GPU or shape
        return first_line(exc)
    return None


# On the CPU a batch runs as consecutive chunks whose activations ([tokens, hidden]) are about
# this large: past it, the memory-bound ops (GELU, residual adds, LayerNorm, gathers) run from
# DRAM instead of cache (GELU took 2.6x as long per token in one 16,384-token batch as in
# 2,048-token ones). On the 2-core AMX Xeon here (bench/RESULTS.md, 2026-12-06): HTTP corpus
# throughput +16-18% in float32 (all-MiniLM-L6-v2: 0.9x -> 1.04-1.08x SentenceTransformer's)
# and +3-4% in bfloat16; 16,384-token batches in the engine alone +18% (bge-base shape,
# float32) to +21% (MiniLM, bfloat16). 4 MB chunks lost bfloat16 a little; smaller ones lose
# to per-layer overhead.
CPU_CHUNK_BYTES = 8 << 20


def cpu_chunk_tokens(hidden_size: int, dtype: torch.dtype) -> int:
    """Tokens per chunk on the CPU: a power of two, [tokens, hidden] near CPU_CHUNK_BYTES."""
    element = torch.empty((), dtype=dtype).element_size()
    tokens = CPU_CHUNK_BYTES / (hidden_size * element)
    return 1 << max(9, round(np.log2(tokens)))


def split_by_tokens(arrays: BatchArrays, limit: int) -> list[BatchArrays]:
    """`arrays` as consecutive batches of whole sequences, each of at most `limit` tokens (a
    longer sequence alone), in order; the batch itself when it fits."""
    cu = arrays.cu_seqlens
    if int(cu[-1]) <= limit:
        return [arrays]
    parts, first = [], 0
    while first < len(cu) - 1:
        # The last sequence that still ends within `limit` tokens of this part's start.
        last = max(first + 1, int(np.searchsorted(cu, cu[first] + limit, side="right")) - 1)
        start, stop = int(cu[first]), int(cu[last])
        parts.append(BatchArrays(arrays.input_ids[start:stop], arrays.position_ids[start:stop],
                                 arrays.token_type_ids[start:stop], cu[first:last + 1] - start))
        first = last
    return parts


class Engine:
    """A model ready to embed packed batches on one device."""

    def __init__(
        self,
        info: ModelInfo,
        model: EncoderModel,
        pooler: Pooler,
        attention: Attention,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.info = info
        self.model = model
        self.pooler = pooler
        self.attention = attention
        self.device = device
        self.dtype = dtype
        self.cost_model: CostModel = attention.cost_model
        self.dtype_name = _dtype_name(dtype)
        self.device_name = str(device)
        # Position ids index the model's table directly (any family offset is already in them).
        self._position_rows = model.max_positions
        # Tokens one sequence may hold: what the router may send after its offset.
        self.max_positions = model.max_positions - info.position_offset
        self._vocab_rows = info.input_id_rows or None  # (a static model's empty bag too)
        type_rows = info.config.get("type_vocab_size")
        self._type_rows = int(type_rows) if type_rows else None
        # Chunks only where a batch's arrays are plain tensors (the CUDA staging buffer is
        # reused per transfer, and a GPU wants the whole batch at once).
        self.chunk_tokens = (cpu_chunk_tokens(info.hidden_size, dtype)
                             if device.type == "cpu" else None)
        self.graphs: GraphedPooling | None = None
        self._graphed_reduce: nn.Module | None = None  # what the graphs end with
        self._staging = HostStaging(device)

    @classmethod
    def load(
        cls, info: ModelInfo, device: str = "cpu", dtype: torch.dtype = torch.float32,
        attention: Attention | None = None,
    ) -> Engine:
        """Build the model through the registry and load its weights strictly, on the best
        attention implementation that runs it on this device (`attention` overrides the choice:
        tests run the packed path's logic on the CPU)."""
        target = torch.device(device)
        model_cls = model_class(info.config)
        candidates = [attention] if attention is not None else attention_candidates(target, dtype)
        model, attention = _first_that_runs(model_cls, info, candidates, target, dtype)
        if packing_available(target, dtype):
            # After strict loading: the packed copies are what forward uses from here on.
            assert isinstance(model, nn.Module)
            pack_linears(model)
        pooler = Pooler(info.pooling, info.dense)
        pooler.load_dense()
        pooler.to(target).eval()
        log.info(
            "loaded %s (%s) on %s in %s, attention %s",
            model_cls.__name__, info.model_dir, target, _dtype_name(dtype), attention.name,
        )
        return cls(info, model, pooler, attention, target, dtype)

    def _check(self, arrays: BatchArrays) -> None:
        """Invariants the router guarantees, checked on the host where an out-of-range index
        is an exception (on CUDA it is a device assert that kills the worker)."""
        lengths = np.diff(arrays.cu_seqlens)
        if lengths.size == 0 or lengths.min() <= 0 or arrays.cu_seqlens[0] != 0:
            raise ValueError("a batch needs >= 1 sequence and every sequence >= 1 token")
        if arrays.input_ids.shape[0] != arrays.cu_seqlens[-1]:
            raise ValueError("cu_seqlens does not cover input_ids")
        for name, values, rows in (
            ("input_ids", arrays.input_ids, self._vocab_rows),
            ("position_ids", arrays.position_ids, self._position_rows),
            ("token_type_ids", arrays.token_type_ids, self._type_rows),
        ):
            if values.min() < 0 or (rows is not None and values.max() >= rows):
                raise ValueError(f"{name} out of range [0, {rows})")

    def _forward(self, arrays: BatchArrays) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat hidden states [T, hidden] and the batch's cu_seqlens, on the device."""
        self._check(arrays)
        parts = (split_by_tokens(arrays, self.chunk_tokens) if self.chunk_tokens is not None
                 else [arrays])
        if len(parts) == 1:
            return self._run_model(arrays)
        hidden = torch.cat([self._run_model(part)[0] for part in parts])
        return hidden, torch.from_numpy(arrays.cu_seqlens.astype(np.int64)).to(self.device)

    def _run_model(self, arrays: BatchArrays) -> tuple[torch.Tensor, torch.Tensor]:
        # The conversion also makes the read-only, zero-copy wire buffers safe to hand to torch.
        input_ids, position_ids, token_type_ids, cu_seqlens = self._staging.to_device(*arrays)
        meta = self.attention.prepare(cu_seqlens, arrays.cu_seqlens)
        hidden = self.model(input_ids, position_ids, token_type_ids, meta)
        return hidden, cu_seqlens

    def hidden_states(self, arrays: BatchArrays) -> torch.Tensor:
        """The model's last hidden state, flat [T, hidden] in the model dtype, on the device."""
        with torch.inference_mode():
            return self._forward(arrays)[0]

    def embed(self, arrays: BatchArrays, pool_from: Sequence[int] = ()) -> np.ndarray:
        """float32 [n, embedding_dim] for the n sequences of a packed batch (not normalised);
        `pool_from`: per sequence, the leading tokens (its prompt) that pooling leaves out."""
        starts = self._pool_starts(arrays, pool_from)
        with torch.inference_mode():
            # (the graphs pool every token: a batch that leaves a prompt out runs eagerly)
            graphed = self.replay(arrays, self.pooler) if starts is None else None
            if graphed is not None:
                return graphed
            hidden, cu_seqlens = self._forward(arrays)
            return self.pooler(hidden, cu_seqlens, starts).cpu().numpy()

    def _pool_starts(self, arrays: BatchArrays, pool_from: Sequence[int]) -> torch.Tensor | None:
        if not any(pool_from):
            return None
        starts = np.asarray(pool_from, dtype=np.int64)
        lengths = np.diff(arrays.cu_seqlens)
        if starts.shape != lengths.shape or starts.min() < 0 or (starts >= lengths).any():
            raise ValueError("pool_from needs one start per sequence, each inside it")
        return torch.from_numpy(starts).to(self.device)

    def replay(self, arrays: BatchArrays, reduce: nn.Module) -> np.ndarray | None:
        """`reduce`'s rows for a batch from a captured graph, or None when no graph was
        captured for `reduce` or none fits the batch (the caller then runs eagerly)."""
        if self.graphs is None or reduce is not self._graphed_reduce:
            return None
        bucket = self.graphs.bucket_for(arrays)
        if bucket is None:
            return None
        self._check(arrays)
        with torch.inference_mode():  # the static buffers were made under it, at capture
            return self.graphs(arrays, bucket).cpu().numpy()

    def _reduced_static(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, token_type_ids: torch.Tensor,
        cu_seqlens: torch.Tensor, max_len: int,
    ) -> torch.Tensor:
        """The forward to per-sequence rows on device tensors only (what a graph captures)."""
        assert isinstance(self.attention, PackedVarlen) and self._graphed_reduce is not None
        meta = self.attention.prepare_static(cu_seqlens, max_len)
        hidden = self.model(input_ids, position_ids, token_type_ids, meta)
        return self._graphed_reduce(hidden, cu_seqlens)

    def capture_graphs(self, max_batch_tokens: int, capture: Capture,
                       reduce: nn.Module | None = None) -> bool:
        """Serve small batches from captured graphs (the latency path): the model, then
        `reduce` (hidden, cu_seqlens) -> float32 rows per sequence, by default the pooler (a
        classifier's head for its logits). Only the packed path can be captured (padded
        attention lays out each batch on the host); its layers with a position bias attend
        over a block-diagonal mask there. Returns whether graphs are in use: a capture that
        fails (a kernel this torch cannot capture) leaves the server serving eagerly, slower
        for short requests but up, and says why in the log."""
        if not isinstance(self.attention, PackedVarlen):
            log.info("no graphs: attention %s is not capturable", self.attention.name)
            return False
        self._graphed_reduce = self.pooler if reduce is None else reduce
        buckets = graph_buckets(max_batch_tokens)
        # Routing reads token counts on the host, which a graph cannot: batches that fit a
        # bucket run every expert (backend_worker/experts.py).
        self._dense_experts(max((bucket.tokens for bucket in buckets), default=0))
        try:
            with torch.inference_mode():
                self.graphs = GraphedPooling(self._reduced_static, buckets, self.device,
                                             capture)
        except torch.OutOfMemoryError:
            raise  # the warm-up's message names the flag to lower
        except RuntimeError as exc:
            self.graphs = self._graphed_reduce = None
            self._dense_experts(0)
            log.error("cannot capture CUDA graphs (%s): every batch runs eagerly "
                      "(--cuda-graphs false skips the attempt)", first_line(exc))
            return False
        return True

    def _dense_experts(self, tokens: int) -> None:
        """Let mixture-of-experts layers run every expert on batches of at most `tokens`."""
        assert isinstance(self.model, nn.Module)
        for module in self.model.modules():
            if isinstance(module, MixtureOfExperts):
                module.dense_tokens = tokens
