"""Triton attention backend: varlen prefill and lean (stream-K) decode on the paged cache.

Same interface as `TorchAttentionBackend`: `prepare(md)` once per step builds the
per-step tensors on the cache's device (block tables, query starts and lengths,
the prefill work list, the decode stream-K plan) and stores them on the metadata
as `md.triton_prefill` and `md.triton_decode`; `forward` writes the new keys and
values into the cache, then runs the prefill kernel over every sequence with
more than one query token and lean decode over the one-token ones, under the
layer's `AttentionOptions`. The stream-K plan depends on the sliding window (a
windowed plan tiles only the window), so one is built per step and distinct
window and shared by the layers that have it; the prefill kernel takes the
window and soft-cap as arguments.

The kernel modules are imported on first use, not with this module: `triton.jit`
decides when a kernel is defined whether it runs compiled or in the interpreter
(TRITON_INTERPRET=1), so defining kernels as a side effect of importing the
engine would fix that choice too early.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from leanserve.kernels.attention import AttentionMetadata, AttentionOptions, default_options, effective_window

if TYPE_CHECKING:
    from leanserve.kernels.triton.lean_attention import LeanPlan


@dataclass
class TritonPrefillBatch:
    """Sequences with several query tokens this step (fresh prompts, chunks, prompts after a prefix hit)."""

    query_starts: torch.Tensor   # int32 [S] first row in the flat batch
    query_lens: torch.Tensor     # int32 [S]
    context_lens: torch.Tensor   # int32 [S] tokens cached after this step (prefix + new)
    block_tables: torch.Tensor   # int32 [S, max_blocks], padded with block 0
    work: tuple[torch.Tensor, torch.Tensor]   # per query block: sequence, block index


@dataclass
class TritonDecodeBatch:
    """Sequences with one query token this step."""

    rows: torch.Tensor           # int64 [B] row of each query in the flat batch
    context_lens: torch.Tensor   # int32 [B]
    block_tables: torch.Tensor   # int32 [B, max_blocks], padded with block 0
    host_context_lens: list[int]  # the same lengths on the host, for the planner
    num_workers: int
    # Stream-K plans by (KV head count, sliding window), built when first needed.
    plans: "dict[tuple[int, int | None], LeanPlan]" = field(default_factory=dict)


def _block_table_tensor(md: AttentionMetadata, seqs: list[int], device: torch.device) -> torch.Tensor:
    # Only the blocks the context covers: a longer table row would widen every row.
    bs = md.block_size
    tables = [md.block_tables[s][:(md.context_lens[s] + bs - 1) // bs] for s in seqs]
    width = max(1, max(len(t) for t in tables))
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)


class TritonAttentionBackend:
    """Attention through Triton kernels: `prefill_attention` and `lean_attention_decode`.

    num_workers: stream-K workers for decode (None: the device's SM count).
    tile_size: decode tile in tokens (a multiple of the cache block size keeps a
    tile's reads inside whole blocks). num_kv_heads: the model's KV head count,
    which the stream-K plan depends on; given, the whole-context plan is built in
    `prepare`; otherwise, and for each sliding window, by the first layer of the
    step that needs it, and reused by the others.
    prefill_block_m: query rows per prefill program.
    """

    def __init__(self, num_workers: int | None = None, tile_size: int = 64, num_kv_heads: int | None = None,
                 prefill_block_m: int = 32) -> None:
        self.num_workers = num_workers
        self.tile_size = tile_size
        self.num_kv_heads = num_kv_heads
        self.prefill_block_m = prefill_block_m

    def prepare(self, md: AttentionMetadata) -> None:
        from leanserve.kernels.triton.lean_attention import default_num_workers
        from leanserve.kernels.triton.prefill_attention import plan_prefill_blocks

        device = md.slot_mapping.device
        prefill = [s for s, n in enumerate(md.query_lens) if n > 1]
        decode = [s for s, n in enumerate(md.query_lens) if n == 1]

        def int32(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        md.triton_prefill = None
        if prefill:
            query_lens = [md.query_lens[s] for s in prefill]
            md.triton_prefill = TritonPrefillBatch(
                int32([md.query_starts[s] for s in prefill]), int32(query_lens),
                int32([md.context_lens[s] for s in prefill]), _block_table_tensor(md, prefill, device),
                plan_prefill_blocks(query_lens, self.prefill_block_m, device))
        md.triton_decode = None
        if decode:
            context_lens = [md.context_lens[s] for s in decode]
            workers = self.num_workers if self.num_workers is not None else default_num_workers(device)
            md.triton_decode = TritonDecodeBatch(
                torch.tensor([md.query_starts[s] for s in decode], dtype=torch.int64, device=device),
                int32(context_lens), _block_table_tensor(md, decode, device), context_lens, workers)
            if self.num_kv_heads is not None:
                self._plan(md.triton_decode, self.num_kv_heads, None, device)

    def _plan(self, batch: TritonDecodeBatch, num_kv_heads: int, window: int | None,
              device: torch.device) -> "LeanPlan":
        from leanserve.kernels.triton.lean_attention import plan_lean_tiles

        key = (num_kv_heads, window)
        if key not in batch.plans:
            batch.plans[key] = plan_lean_tiles(batch.host_context_lens, num_kv_heads, self.tile_size,
                                               batch.num_workers, window).to(device)
        return batch.plans[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, md: AttentionMetadata, options: AttentionOptions | None = None
                ) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] for the new tokens; returns [T, H, D] under this layer's
        options (None: `default_options`)."""
        from leanserve.kernels.triton.lean_attention import lean_attention_decode
        from leanserve.kernels.triton.prefill_attention import prefill_attention

        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        options = options if options is not None else default_options(head_dim)
        window = effective_window(md, options.sliding_window)
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, md.slot_mapping, k)
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, md.slot_mapping, v)
        out = torch.empty_like(q)
        pf, dc = md.triton_prefill, md.triton_decode
        if pf is not None:
            prefill_attention(q, k_cache, v_cache, pf.block_tables, pf.query_starts, pf.query_lens,
                              pf.context_lens, options.scale, window=window, softcap=options.softcap, out=out,
                              block_m=self.prefill_block_m, work=pf.work)
        if dc is not None:
            plan = self._plan(dc, num_kv_heads, window, q.device)
            out[dc.rows] = lean_attention_decode(q[dc.rows], k_cache, v_cache, dc.block_tables, dc.context_lens,
                                                 options.scale, window=window, softcap=options.softcap, plan=plan)
        return out
