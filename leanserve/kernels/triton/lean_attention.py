"""Lean attention for decode (stream-K split-KV) in Triton, on the paged KV cache.

Every (sequence, KV head) pair is a *unit*; its context is cut into tiles of
`tile_size` tokens and the flat list of all units' tiles is divided into
`num_workers` contiguous ranges whose sizes differ by at most one (stream-K).
A worker's range may end inside one unit and go on into the next, so it is cut
at unit boundaries into *segments*. One program per worker walks its segments;
for each it computes the normalised partial output `o` and log-sum-exp `lse` of
all the unit's query heads (GQA: the group's query heads are the rows of one
tile) and writes them to the segment's slot of a partials buffer. A second
kernel merges each unit's partials:

    L = M + log(sum_j exp(lse_j - M)),  M = max_j lse_j;   O = sum_j exp(lse_j - L) o_j

No program waits for another, and work is proportional to the sum of context
lengths, not batch x longest context. Keys and values are read straight from
the cache through the block table, [num_blocks, block_size, Hkv, D] as in
`leanserve.kernels.attention`.

A sliding window is the plan's business: the decode token at position ctx - 1
sees keys ctx - window .. ctx - 1, so a windowed plan cuts only that range into
tiles and nothing before it is read. Soft-capping (cap * tanh(scores / cap)) is
a compile-time switch of the kernel.

The segment plan is built on the host with a few torch ops (`plan_lean_tiles`),
once per step, and shared by all layers.

Triton's interpreter (TRITON_INTERPRET=1) does not do bfloat16 arithmetic (it
multiplies bf16 bit patterns), so on CPU tensors every operand is upcast to
float32 after loading; on a GPU bf16 tiles go into `tl.dot` as they are. Set
TRITON_INTERPRET before importing this module: `triton.jit` reads it when the
kernels are defined.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class LeanPlan:
    """Stream-K decomposition of one decode batch.

    Segment `s` is tokens [token_start, token_end) of KV head `kv_head` of decode
    sequence `seq` (inside the last `window` tokens of its context, with a window);
    its partial result lives in slot `s` of the partials buffer.
    Segments are ordered by worker and, because the tile list is unit-major, by
    unit too: worker w owns segments worker_ptr[w] .. worker_ptr[w + 1] - 1 and
    unit u = seq * num_kv_heads + kv_head owns slots unit_ptr[u] .. unit_ptr[u + 1] - 1.
    """

    segments: torch.Tensor     # int32 [S, 4]: seq, kv_head, token_start, token_end
    worker_ptr: torch.Tensor   # int32 [num_workers + 1]
    unit_ptr: torch.Tensor     # int32 [batch * num_kv_heads + 1]
    worker_tiles: torch.Tensor  # int64 [num_workers + 1]: tile range bounds (kept for tests and stats)
    num_kv_heads: int
    tile_size: int
    window: int | None = None

    @property
    def num_workers(self) -> int:
        return self.worker_ptr.numel() - 1

    @property
    def num_segments(self) -> int:
        return self.segments.shape[0]

    def to(self, device: torch.device | str) -> "LeanPlan":
        return LeanPlan(self.segments.to(device), self.worker_ptr.to(device), self.unit_ptr.to(device),
                        self.worker_tiles, self.num_kv_heads, self.tile_size, self.window)


def default_num_workers(device: torch.device | str) -> int:
    """One worker per SM on CUDA (stream-K's choice); the CPU count under the interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return os.cpu_count() or 1


def plan_lean_tiles(context_lens: list[int] | torch.Tensor, num_kv_heads: int, tile_size: int,
                    num_workers: int, window: int | None = None) -> LeanPlan:
    """Cut every (sequence, KV head)'s context (with a window: its last `window` tokens)
    into tiles and split the flat tile list into `num_workers` contiguous ranges (sizes
    differ by at most one), each cut at unit boundaries into segments. Runs on the CPU;
    move the result with `.to()`."""
    if tile_size < 1 or num_workers < 1 or num_kv_heads < 1:
        raise ValueError(f"tile_size ({tile_size}), num_workers ({num_workers}) and "
                         f"num_kv_heads ({num_kv_heads}) must be positive")
    if window is not None and window < 1:
        raise ValueError(f"window must be positive or None, got {window}")
    ctx = torch.as_tensor(context_lens, dtype=torch.int64).cpu()
    if ctx.numel() and int(ctx.min()) < 1:
        raise ValueError("every decode sequence needs at least one context token")
    unit_ctx = ctx.repeat_interleave(num_kv_heads)                     # [U], unit u = seq * Hkv + head
    # First key each unit's token sees; tiles are counted from there.
    unit_key_start = (unit_ctx - window).clamp(min=0) if window is not None else torch.zeros_like(unit_ctx)
    unit_tiles = (unit_ctx - unit_key_start + tile_size - 1) // tile_size
    unit_bounds = torch.cat([torch.zeros(1, dtype=torch.int64), unit_tiles.cumsum(0)])   # [U + 1], in tiles
    total = int(unit_bounds[-1])
    # Balanced split: worker w gets tiles [w * total // W, (w + 1) * total // W).
    worker_bounds = torch.arange(num_workers + 1, dtype=torch.int64) * total // num_workers
    # Segment boundaries: every unit and worker boundary; consecutive distinct ones bound a segment.
    cuts = torch.unique(torch.cat([unit_bounds, worker_bounds]))        # sorted
    seg_start, seg_end = cuts[:-1], cuts[1:]
    unit = torch.searchsorted(unit_bounds, seg_start, right=True) - 1
    first_tile = seg_start - unit_bounds[unit]
    token_start = unit_key_start[unit] + first_tile * tile_size
    token_end = torch.minimum(unit_key_start[unit] + (seg_end - unit_bounds[unit]) * tile_size, unit_ctx[unit])
    segments = torch.stack([unit // num_kv_heads, unit % num_kv_heads, token_start, token_end], 1)
    worker_ptr = torch.searchsorted(seg_start, worker_bounds)            # first segment at or after each bound
    unit_ptr = torch.searchsorted(seg_start, unit_bounds)
    return LeanPlan(segments.to(torch.int32).contiguous(), worker_ptr.to(torch.int32), unit_ptr.to(torch.int32),
                    worker_bounds, num_kv_heads, tile_size, window)


def compute_dtype(t: torch.Tensor) -> tl.dtype:
    """What tiles are multiplied in: the input's dtype on a GPU; float32 under the
    interpreter (CPU tensors), which cannot do bfloat16 arithmetic."""
    if t.device.type == "cpu" or t.dtype == torch.float32:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[t.dtype]


def dot_precision(dtype: tl.dtype) -> str:
    # float32 tiles would go through TF32 on NVIDIA GPUs by default (10-bit mantissa): keep them exact.
    return "ieee" if dtype == tl.float32 else "tf32"


@triton.jit
def soft_cap(x, cap):
    """cap * tanh(x / cap). triton.language has no tanh (and the interpreter no libdevice): through
    e = exp(-2|y|), in (0, 1], which cannot overflow whatever the score."""
    y = x / cap
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(y < 0, -t, t)


@triton.jit
def online_softmax_step(qk, v, m_i, l_i, acc, DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """Fold one tile of scores qk [R, N] and values v [N, D] into the running max, sum and output.
    A row with no visible key yet (max -inf: a sliding window starting past this tile) stays empty
    instead of turning NaN (exp(-inf - -inf))."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(qk - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DTYPE), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def paged_kv_tile(K, V, BlockTables, seq, stride_bt, kv_head, pos, valid, offs_d, mask_d,
                  stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                  PAGE: tl.constexpr, DTYPE: tl.constexpr):
    """Keys and values [N, D] of a sequence's token positions `pos`, read through its block table
    (int64 offsets: large caches); rows where `valid` is false are zeros."""
    block = tl.load(BlockTables + seq * stride_bt + pos // PAGE, mask=valid, other=0).to(tl.int64)
    in_block = pos % PAGE
    kv_mask = valid[:, None] & mask_d[None, :]
    k = tl.load(K + block[:, None] * stride_kb + in_block[:, None] * stride_ks + kv_head * stride_kh
                + offs_d[None, :], mask=kv_mask, other=0.0).to(DTYPE)
    v = tl.load(V + block[:, None] * stride_vb + in_block[:, None] * stride_vs + kv_head * stride_vh
                + offs_d[None, :], mask=kv_mask, other=0.0).to(DTYPE)
    return k, v


@triton.jit
def _lean_decode_kernel(
    Q, K, V, BlockTables, Segments, WorkerPtr, PartialO, PartialLse, scale, softcap,
    stride_qb, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    worker = tl.program_id(0)
    seg_lo = tl.load(WorkerPtr + worker)
    seg_hi = tl.load(WorkerPtr + worker + 1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    for s in range(seg_lo, seg_hi):
        seq = tl.load(Segments + s * 4)
        kv_head = tl.load(Segments + s * 4 + 1)
        start = tl.load(Segments + s * 4 + 2)
        end = tl.load(Segments + s * 4 + 3)
        # The group's query heads are consecutive: rows of one [BLOCK_G, D] tile (padding rows are 0).
        heads = kv_head * GROUP + offs_g
        q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(DTYPE)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + offs_n
            valid = pos < end
            k, v = paged_kv_tile(K, V, BlockTables, seq, stride_bt, kv_head, pos, valid, offs_d, mask_d,
                                 stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE, DTYPE)
            qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale            # [G, N] fp32
            if SOFTCAP:
                qk = soft_cap(qk, softcap)
            qk = tl.where(valid[None, :], qk, float("-inf"))
            # A segment has at least one valid key, so the running max stays finite.
            m_i, l_i, acc = online_softmax_step(qk, v, m_i, l_i, acc, DTYPE, PRECISION)
        # Partials are contiguous fp32 [S, GROUP, HEAD_DIM] and [S, GROUP].
        out_mask = mask_g[:, None] & mask_d[None, :]
        tl.store(PartialO + (s * GROUP + offs_g[:, None]) * HEAD_DIM + offs_d[None, :],
                 acc / l_i[:, None], mask=out_mask)
        tl.store(PartialLse + s * GROUP + offs_g, m_i + tl.log(l_i), mask=mask_g)


@triton.jit
def _lean_merge_kernel(
    PartialO, PartialLse, UnitPtr, Out, stride_ob, stride_oh,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    unit = tl.program_id(0)
    seq = unit // NUM_KV_HEADS
    kv_head = unit % NUM_KV_HEADS
    lo = tl.load(UnitPtr + unit)
    hi = tl.load(UnitPtr + unit + 1)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask = mask_g[:, None] & (offs_d[None, :] < HEAD_DIM)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for s in range(lo, hi):
        lse = tl.load(PartialLse + s * GROUP + offs_g, mask=mask_g, other=float("-inf"))
        o = tl.load(PartialO + (s * GROUP + offs_g[:, None]) * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m, lse)
        # An empty segment (lse = -inf) weighs 0; keep -inf - -inf (NaN) out of exp.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        weight = tl.exp(lse - m_safe)
        acc = acc * alpha[:, None] + weight[:, None] * o
        denom = denom * alpha + weight
        m = m_new
    out = acc / tl.where(denom > 0, denom, 1.0)[:, None]
    heads = kv_head * GROUP + offs_g
    tl.store(Out + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=mask)


def lean_attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float | None = None,
                          *, window: int | None = None, softcap: float | None = None,
                          num_workers: int | None = None, tile_size: int = 64, plan: LeanPlan | None = None,
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention, one query token per sequence, on the paged cache.

    q [B, H, D]; k_cache, v_cache [num_blocks, block_size, Hkv, D]; block_tables
    int32 [B, max_blocks]; context_lens int32 [B] (keys 0 .. len - 1 are attended,
    with a sliding `window` only the last `window` of them). Scores are scale * q.k
    (default 1 / sqrt(D)), soft-capped to softcap * tanh(scores / softcap) if set.
    `plan` (from `plan_lean_tiles` with the same window, on q's device) is built here
    from context_lens when not given, which reads them back to the host. Returns
    [B, H, D] in q's dtype.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the head dimension must be contiguous")
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if plan is None:
        workers = num_workers if num_workers is not None else default_num_workers(q.device)
        plan = plan_lean_tiles(context_lens.tolist(), num_kv_heads, tile_size, workers, window).to(q.device)
    if plan.window != window:
        raise ValueError(f"plan is for window {plan.window}, attention for window {window}")
    if plan.num_kv_heads != num_kv_heads or plan.unit_ptr.numel() != batch * num_kv_heads + 1:
        raise ValueError(f"plan is for {plan.unit_ptr.numel() - 1} (sequence, KV head) pairs with "
                         f"{plan.num_kv_heads} KV heads; this batch has {batch} x {num_kv_heads}")
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    block_tables = block_tables.to(torch.int32)
    partial_o = torch.empty(plan.num_segments, group, head_dim, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(plan.num_segments, group, dtype=torch.float32, device=q.device)
    dtype = compute_dtype(q)
    block_g = max(16, triton.next_power_of_2(group))      # tl.dot wants M >= 16 on GPUs
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = max(16, min(64, triton.next_power_of_2(plan.tile_size)))
    _lean_decode_kernel[(plan.num_workers,)](
        q, k_cache, v_cache, block_tables, plan.segments, plan.worker_ptr, partial_o, partial_lse, scale,
        1.0 if softcap is None else softcap,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n,
        PAGE=k_cache.shape[1], DTYPE=dtype, PRECISION=dot_precision(dtype), SOFTCAP=softcap is not None,
    )
    merge_lean_partials(partial_o, partial_lse, plan.unit_ptr, out)
    return out


def merge_lean_partials(partial_o: torch.Tensor, partial_lse: torch.Tensor, unit_ptr: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
    """Merge per-segment partials into out [B, H, D] (any float dtype).

    partial_o float32 [S, G, D] (normalised), partial_lse float32 [S, G]; unit
    u = seq * Hkv + kv_head owns slots unit_ptr[u] .. unit_ptr[u + 1] - 1 and
    writes query heads kv_head * G .. + G - 1 of sequence seq. An empty segment
    has lse = -inf (its o must be finite, e.g. 0) and weight 0; a unit with no
    weight at all comes out as zeros.
    """
    batch, num_heads, head_dim = out.shape
    group = partial_o.shape[1]
    num_kv_heads = num_heads // group
    _lean_merge_kernel[(batch * num_kv_heads,)](
        partial_o, partial_lse, unit_ptr, out, out.stride(0), out.stride(1),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, BLOCK_G=triton.next_power_of_2(group),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out
