"""Turns a scheduled batch into flat tensors and runs the model on it."""
from __future__ import annotations

from typing import Callable

import torch

from leanserve.engine.config import ModelConfig
from leanserve.engine.executor import Executor, NativeExecutor, TorchExecutor
from leanserve.engine.models.decoder import DecoderForCausalLM
from leanserve.kernels.attention import AttentionMetadata, TorchAttentionBackend
from leanserve.kernels.quant import use_triton_kernels
from leanserve.scheduler.scheduler import ScheduledBatch


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def make_attention_backend(name: str, device: torch.device, num_kv_heads: int):
    """The torch model's attention: 'auto' is Triton on a GPU and the torch (lean attention) backend on the CPU."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "triton":
        from leanserve.kernels.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend(num_kv_heads=num_kv_heads)
    if device.type != "cpu":
        raise ValueError("the torch attention backend is the CPU path; use attention_backend='triton' on a GPU")
    return TorchAttentionBackend()


class ModelRunner:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                 num_blocks: int, block_size: int, device: str = "cpu", attention_backend: str = "auto",
                 quantize: Callable[[DecoderForCausalLM], object] | None = None,
                 kv_cache_dtype: torch.dtype | None = None, deterministic: bool = False) -> None:
        """`quantize`, if given, swaps quantized modules into the loaded float model; the KV cache is
        `kv_cache_dtype` (default: the model's dtype). `attention_backend` "auto" runs the native executor
        where it can, else the torch model with the device's attention backend; "torch" or "triton" run
        the torch model with that backend."""
        self.config = config
        self.block_size = block_size
        self.device = torch.device(device)
        backend = make_attention_backend(attention_backend, self.device, config.num_key_value_heads)
        self.model = DecoderForCausalLM(config, backend).to(dtype)
        self.model.load_weights(weights)
        if quantize is not None:
            quantize(self.model)
            if self.device.type == "cuda":
                use_triton_kernels()
        self.model.to(self.device).eval()
        shape = (config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        kv_cache_dtype = kv_cache_dtype or dtype
        self.k_cache = torch.empty(shape, dtype=kv_cache_dtype, device=self.device)
        self.v_cache = torch.empty(shape, dtype=kv_cache_dtype, device=self.device)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.k_cache = self.k_cache[i]
            layer.self_attn.v_cache = self.v_cache[i]
        native = (NativeExecutor.build(self.model, batch_invariant=deterministic) if attention_backend == "auto"
                  else f"attention_backend={attention_backend!r}")
        self.executor: Executor = (native if isinstance(native, NativeExecutor)
                                   else TorchExecutor(self.model, backend, native))
        if isinstance(self.executor, TorchExecutor):
            # The torch backend's tiles read whole blocks, masked: zeros, so that no stale garbage meets a
            # zero weight (0 * nan). The native kernels read only written slots, so the pages of a cache
            # they use stay untouched (and unallocated) until its blocks fill.
            self.k_cache.zero_()
            self.v_cache.zero_()

    def prepare(self, batch: ScheduledBatch):
        """Flat inputs for the batch: token ids, positions, attention metadata and the rows whose logits are
        sampled (those of `batch.sampling_requests()`, in its order)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_starts, context_lens, sample_rows = [], [], []
        bs = self.block_size
        for request, n in zip(batch.requests, batch.num_tokens):
            start = request.num_computed_tokens
            end = start + n
            query_starts.append(len(input_ids))
            input_ids += request.token_ids[start:end]
            positions += range(start, end)
            table = request.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            context_lens.append(end)
            if batch.samples(request, n):
                sample_rows.append(len(input_ids) - 1)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device), query_starts=query_starts, query_lens=list(batch.num_tokens),
            context_lens=context_lens, block_tables=[r.block_table for r in batch.requests], block_size=bs)
        device = self.device
        return (torch.tensor(input_ids, device=device), torch.tensor(positions, device=device), metadata,
                torch.tensor(sample_rows, dtype=torch.long, device=device))

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step; return float32 logits of the requests that sample now (`batch.sampling_requests()`)."""
        input_ids, positions, metadata, sample_rows = self.prepare(batch)
        hidden = self.executor.forward(input_ids, positions, metadata)
        return self.executor.compute_logits(hidden[sample_rows]).cpu()
