"""Varlen causal prefill attention in Triton over a prepacked (flat, unpadded) batch.

Sequence s owns query rows query_starts[s] .. + query_lens[s] of q [T, H, D];
its context has context_lens[s] >= query_lens[s] tokens, all of them already in
the paged cache (the runner writes the new keys and values before attention),
so the kernel reads every key through the block table, whether it came from a
prefix hit, an earlier chunk or this step. Query i sits at absolute position
ctx_len - q_len + i and attends keys 0 .. that position: block-diagonal causal
attention over the packed batch, no padding rows. With a sliding window it attends
only keys > its position - window: the window's edge is a lower bound on key
positions per row, and a query block reads keys from its first row's edge on.
Scores are scale * q.k, soft-capped to softcap * tanh(scores / softcap) if set;
window and soft-cap are compile-time switches, so plain causal attention runs the
kernel it always did.

One program per (sequence, query block, query head), flash-attention style
online softmax. The (sequence, query block) work list is built on the host
(`plan_prefill_blocks`) so no program is launched for padding.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from leanserve.kernels.triton.lean_attention import (compute_dtype, dot_precision, online_softmax_step,
                                                     paged_kv_tile, soft_cap)


def plan_prefill_blocks(query_lens: list[int], block_m: int, device: torch.device | str = "cpu"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query block of `block_m` rows: its sequence and its block index within the sequence."""
    seqs, blocks = [], []
    for seq, q_len in enumerate(query_lens):
        n = -(-q_len // block_m)
        seqs += [seq] * n
        blocks += range(n)
    return (torch.tensor(seqs, dtype=torch.int32, device=device),
            torch.tensor(blocks, dtype=torch.int32, device=device))


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, BlockTables, QueryStarts, QueryLens, ContextLens, WorkSeq, WorkBlock, scale, window, softcap,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
    DTYPE: tl.constexpr, PRECISION: tl.constexpr, WINDOWED: tl.constexpr, SOFTCAP: tl.constexpr,
):
    work = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(WorkSeq + work)
    q_block = tl.load(WorkBlock + work)
    q_start = tl.load(QueryStarts + seq)
    q_len = tl.load(QueryLens + seq)
    ctx_len = tl.load(ContextLens + seq)
    kv_head = head // GROUP

    offs_m = q_block * BLOCK_M + tl.arange(0, BLOCK_M)       # query index within the sequence
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < HEAD_DIM
    row_valid = offs_m < q_len
    # Absolute position of each query; padding rows past q_len stand in for the last row, whose keys
    # the block reads anyway, so no row is left without a visible key (their output is not stored).
    q_pos = ctx_len - q_len + tl.minimum(offs_m, q_len - 1)
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=row_valid[:, None] & mask_d[None, :], other=0.0).to(DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Keys past the block's last query position, or before its first row's window edge, are masked
    # for every row: don't read them.
    key_end = tl.minimum(ctx_len, ctx_len - q_len + (q_block + 1) * BLOCK_M)
    key_start = 0
    if WINDOWED:
        key_start = tl.maximum(0, ctx_len - q_len + q_block * BLOCK_M - window + 1)
    for n0 in range(key_start, key_end, BLOCK_N):
        pos = n0 + offs_n
        key_valid = pos < key_end
        k, v = paged_kv_tile(K, V, BlockTables, seq, stride_bt, kv_head, pos, key_valid, offs_d, mask_d,
                             stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE, DTYPE)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale                 # [M, N] fp32
        if SOFTCAP:
            qk = soft_cap(qk, softcap)
        visible = key_valid[None, :] & (pos[None, :] <= q_pos[:, None])
        if WINDOWED:
            visible = visible & (pos[None, :] > q_pos[:, None] - window)
        qk = tl.where(visible, qk, float("-inf"))
        m_i, l_i, acc = online_softmax_step(qk, v, m_i, l_i, acc, DTYPE, PRECISION)
    out = acc / l_i[:, None]
    tl.store(Out + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=row_valid[:, None] & mask_d[None, :])


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_starts: torch.Tensor, query_lens: torch.Tensor, context_lens: torch.Tensor,
                      scale: float | None = None, *, window: int | None = None, softcap: float | None = None,
                      out: torch.Tensor | None = None, block_m: int = 32, block_n: int = 32,
                      work: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Causal attention of each sequence's query rows over its cached context (with a sliding
    `window`, over its last `window` positions up to each row's own), scores scale * q.k
    (default 1 / sqrt(D)) soft-capped to softcap * tanh(scores / softcap) if set.

    q [T, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D] already holding
    every sequence's keys and values (new ones included); block_tables int32
    [S, max_blocks]; query_starts, query_lens, context_lens int32 [S]. Writes the
    sequences' rows of `out` (default a new tensor like q; other rows untouched)
    and returns it. `work` is `plan_prefill_blocks(query_lens, block_m)` on q's
    device, built here (reading query_lens back to the host) when not given.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the head dimension must be contiguous")
    if window is not None and window < 1:
        raise ValueError(f"window must be positive or None, got {window}")
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if out is None:
        out = torch.empty_like(q)
    if work is None:
        work = plan_prefill_blocks(query_lens.tolist(), block_m, q.device)
    work_seq, work_block = work
    if work_seq.numel() == 0:
        return out
    block_tables = block_tables.to(torch.int32)
    dtype = compute_dtype(q)
    _prefill_kernel[(work_seq.numel(), num_heads)](
        q, k_cache, v_cache, out, block_tables, query_starts, query_lens, context_lens, work_seq, work_block, scale,
        0 if window is None else window, 1.0 if softcap is None else softcap,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_M=block_m, BLOCK_N=block_n, PAGE=k_cache.shape[1], DTYPE=dtype, PRECISION=dot_precision(dtype),
        WINDOWED=window is not None, SOFTCAP=softcap is not None,
    )
    return out
