"""Attention over a flat, unpadded token batch and a paged KV cache.

The runner builds one `AttentionMetadata` per step and installs it with
`forward_context`; attention layers read it with `get_forward_context()`, so
model code never threads batch metadata through its signatures. Each layer
passes its own `AttentionOptions` (scale, soft-cap, sliding window): layers of
one model may differ, so what depends on the window is built per step and per
distinct window, and shared by the layers that have it.

Cache layout, per layer: keys and values each [num_blocks, block_size,
num_kv_heads, head_dim]; viewed flat as [num_slots, num_kv_heads, head_dim], a
token's slot is block * block_size + offset.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionOptions:
    """What one attention layer computes beyond causal softmax attention: scores = scale * q.k, soft-capped
    to softcap * tanh(scores / softcap) where softcap is set, and, with a sliding window, a token at
    position p attends only to keys at positions > p - sliding_window (its own included)."""

    scale: float
    sliding_window: int | None = None
    softcap: float | None = None

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be a positive integer or None, got {self.sliding_window!r}")
        if self.softcap is not None and not self.softcap > 0:
            raise ValueError(f"softcap must be positive or None, got {self.softcap!r}")


def default_options(head_dim: int) -> AttentionOptions:
    """Plain causal attention with the usual 1 / sqrt(head_dim) scale."""
    return AttentionOptions(scale=head_dim ** -0.5)


@dataclass
class PrefillSegment:
    """Query rows start .. start + q_len - 1 of one sequence (ctx_len tokens after this step) over its keys
    at positions key_start .. ctx_len - 1: key_start is the first row's window edge (0 without a window),
    since no row of the segment sees an earlier key."""

    start: int
    q_len: int
    key_start: int
    slots: torch.Tensor | None   # cache slots of those keys; None: they are this step's new keys (a fresh prompt)
    mask: torch.Tensor | None    # bool [q_len, ctx_len - key_start], True where visible; None: plain causal


@dataclass
class DecodeTiles:
    """Decode sequences (one query token each) cut into tiles of whole cache blocks.

    Tile t is `tile_blocks[t]` (padded past the context's last block with block
    0), for decode sequence `tile_seq[t]`; `tile_mask[t]` is 0 on the keys the
    token sees and -inf elsewhere (past the context's end, before its window).
    """

    rows: torch.Tensor         # [B] row of each decode sequence's query in the flat batch
    tile_seq: torch.Tensor     # [N] decode-sequence index of each tile
    tile_blocks: torch.Tensor  # [N, blocks per tile] cache blocks
    tile_mask: torch.Tensor    # [N, 1, 1, tile tokens] additive mask


@dataclass
class WindowPlan:
    """What the layers with one sliding window (None: the whole context) attend to this step."""

    prefill: list[PrefillSegment]
    decode: DecodeTiles | None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [T] cache slot each new token's K/V is written to
    query_starts: list[int]             # per sequence: first row of its tokens in the flat batch
    query_lens: list[int]               # per sequence: tokens computed this step
    context_lens: list[int]             # per sequence: tokens cached after this step (prefix + new)
    block_tables: list[list[int]]       # per sequence: its cache blocks
    block_size: int
    # Built by the backend once per step and per distinct sliding window, shared by all layers.
    plans: dict[int | None, WindowPlan] = field(default_factory=dict)


class AttentionBackend(Protocol):
    """Attention for the torch model: `prepare` once per step, `forward` in every layer."""

    def prepare(self, md: AttentionMetadata) -> None:
        """Work out what every layer's attention needs of the step's metadata (stored on md)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, md: AttentionMetadata, options: AttentionOptions | None = None
                ) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] of the new tokens: write k and v to their cache slots and
        return the attention output [T, H, D] under this layer's options (None: `default_options`)."""


_context: AttentionMetadata | None = None


@contextlib.contextmanager
def forward_context(metadata: AttentionMetadata):
    global _context
    previous, _context = _context, metadata
    try:
        yield
    finally:
        _context = previous


def get_forward_context() -> AttentionMetadata:
    assert _context is not None, "attention ran outside forward_context()"
    return _context


def context_slots(block_table: list[int], block_size: int, positions: torch.Tensor) -> torch.Tensor:
    """Cache slots of a sequence's token positions."""
    return torch.tensor(block_table)[positions // block_size] * block_size + positions % block_size


def effective_window(md: AttentionMetadata, window: int | None) -> int | None:
    """The window, or None where it is at least as long as every context of the step: then it cuts
    nothing, and the layers with it share the whole-context plan."""
    if window is None or window >= max(md.context_lens, default=0):
        return None
    return window


class TorchAttentionBackend:
    """Torch attention for the CPU: no padded query rows, no keys past a decode tile's tail.

    Prefill segments (several query tokens) run one SDPA call each: a fresh prompt
    attends to its own new keys with a causal mask; a chunk or a prompt with a
    cached prefix reads its earlier keys from the cache. Decode sequences (one
    query token each) are lean attention's flat batch of tiles: every context is
    cut into tiles of `tile_size` tokens (whole cache blocks), all tiles of all
    sequences go through one flash-attention call that also returns each tile's
    log-sum-exp, and each sequence's tiles are merged by log-sum-exp. Work is
    proportional to the sum of context lengths, not batch x longest context.

    With a sliding window, prefill reads keys from its first row's window edge on and
    masks the rest, and decode tiles start at the block holding the window's edge.
    Soft-capping has no fused kernel: where it is set, scores go through an explicit
    matmul, tanh, mask and softmax (in float32).

    This is the torch model's attention: the reference, and the fallback where the
    native executor (leanserve/kernels/cpu) does not run. That executor reads the paged
    cache in place instead of gathering tiles: on the ragged batch of `leanserve bench
    attention`, about 1.2 ms against 5.3 to 6.3 for the torch tiles (`--torch`).
    """

    def __init__(self, tile_size: int = 128) -> None:
        self.tile_size = tile_size
        # Gathered tiles land in buffers reused across layers and steps: a fresh
        # allocation this large is page-faulted in each time, which costs more than the copy.
        self._workspace = torch.empty(0)

    def prepare(self, md: AttentionMetadata) -> None:
        # The whole-context plan now (most layers of most models use it); a window's, which only
        # `forward` sees, on its first layer.
        md.plans = {}
        self._plan(md, None)

    def _plan(self, md: AttentionMetadata, window: int | None) -> WindowPlan:
        window = effective_window(md, window)
        if window not in md.plans:
            prefill, decode = [], []
            for seq in range(len(md.query_lens)):
                if md.query_lens[seq] > 1 or md.context_lens[seq] == 1:
                    prefill.append(self._prefill_segment(md, seq, window))
                else:
                    decode.append(seq)
            md.plans[window] = WindowPlan(prefill, self._decode_tiles(md, decode, window) if decode else None)
        return md.plans[window]

    @staticmethod
    def _prefill_segment(md: AttentionMetadata, seq: int, window: int | None) -> PrefillSegment:
        q_len, ctx_len = md.query_lens[seq], md.context_lens[seq]
        first = ctx_len - q_len                                   # position of the segment's first row
        key_start = 0 if window is None else max(0, first - window + 1)
        slots = None
        if ctx_len > q_len:
            slots = context_slots(md.block_tables[seq], md.block_size, torch.arange(key_start, ctx_len))
        mask = None
        if ctx_len > q_len or (window is not None and window < q_len):
            query_pos = torch.arange(first, ctx_len)[:, None]
            key_pos = torch.arange(key_start, ctx_len)[None, :]
            mask = key_pos <= query_pos
            if window is not None:
                mask &= key_pos > query_pos - window
        return PrefillSegment(md.query_starts[seq], q_len, key_start, slots, mask)

    def _decode_tiles(self, md: AttentionMetadata, seqs: list[int], window: int | None) -> DecodeTiles:
        bs = md.block_size
        blocks_per_tile = max(1, self.tile_size // bs)
        context_lens = torch.tensor([md.context_lens[s] for s in seqs])
        # The token at position ctx - 1 sees keys from ctx - window on: tiles start at the block holding it.
        key_start = (context_lens - window).clamp(min=0) if window is not None else torch.zeros_like(context_lens)
        first_block = key_start // bs
        end_block = (context_lens + bs - 1) // bs
        tiles_per_seq = (end_block - first_block + blocks_per_tile - 1) // blocks_per_tile
        tile_seq = torch.repeat_interleave(torch.arange(len(seqs)), tiles_per_seq)
        first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
        tile_start = first_block[tile_seq] + (torch.arange(len(tile_seq)) - first_tile[tile_seq]) * blocks_per_tile
        block_index = tile_start[:, None] + torch.arange(blocks_per_tile)                        # [N, blocks]
        width = int(end_block.max())
        tables = torch.tensor([md.block_tables[s][:width] + [0] * (width - len(md.block_tables[s][:width]))
                               for s in seqs])
        in_context = block_index < end_block[tile_seq][:, None]
        blocks = torch.where(in_context, tables[tile_seq[:, None], block_index.clamp(max=width - 1)], 0)
        positions = tile_start[:, None] * bs + torch.arange(blocks_per_tile * bs)
        hidden = (positions >= context_lens[tile_seq][:, None]) | (positions < key_start[tile_seq][:, None])
        mask = torch.zeros(positions.shape).masked_fill_(hidden, float("-inf"))
        rows = torch.tensor([md.query_starts[s] for s in seqs])
        return DecodeTiles(rows, tile_seq, blocks, mask[:, None, None, :])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, md: AttentionMetadata, options: AttentionOptions | None = None
                ) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] for the new tokens; returns [T, H, D]. The cache may hold
        another float dtype than q's (a float16 cache for a float32 model): attention computes in q's."""
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        options = options if options is not None else default_options(head_dim)
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        k_flat.index_copy_(0, md.slot_mapping, k.to(k_cache.dtype))
        v_flat.index_copy_(0, md.slot_mapping, v.to(v_cache.dtype))
        plan = self._plan(md, options.sliding_window)
        if not plan.prefill:                     # decode only: the rows are the decode sequences in order
            return self._decode(q, k_cache, v_cache, plan.decode, options)
        out = torch.empty_like(q)
        for seg in plan.prefill:
            rows = slice(seg.start, seg.start + seg.q_len)
            if seg.slots is None:
                keys, values = k[rows], v[rows]
            else:
                keys, values = k_flat[seg.slots].to(q.dtype), v_flat[seg.slots].to(q.dtype)
            out[rows] = _prefill_attention(q[rows], keys, values, seg.mask, options)
        if plan.decode is not None:
            out[plan.decode.rows] = self._decode(q[plan.decode.rows], k_cache, v_cache, plan.decode, options)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                tiles: DecodeTiles, options: AttentionOptions) -> torch.Tensor:
        """q [B, H, D], one token per sequence; returns [B, H, D]."""
        batch, num_heads, head_dim = q.shape
        num_tiles, blocks_per_tile = tiles.tile_blocks.shape
        num_kv_heads = k_cache.shape[2]
        group = num_heads // num_kv_heads
        block_numel = k_cache[0].numel()
        needed = 2 * tiles.tile_blocks.numel() * block_numel
        if self._workspace.numel() < needed or self._workspace.dtype != k_cache.dtype:
            self._workspace = torch.empty(needed, dtype=k_cache.dtype)
        buffers = self._workspace[:needed].view(2, -1, block_numel)
        ids = tiles.tile_blocks.view(-1)
        shape = (num_tiles, blocks_per_tile * k_cache.shape[1], num_kv_heads, head_dim)
        keys = torch.index_select(k_cache.view(k_cache.shape[0], -1), 0, ids, out=buffers[0]).view(shape)
        values = torch.index_select(v_cache.view(v_cache.shape[0], -1), 0, ids, out=buffers[1]).view(shape)
        queries = q.view(batch, num_kv_heads, group, head_dim)                          # [B, Hkv, G, D]
        if num_tiles > batch:
            queries = queries[tiles.tile_seq]                                              # [N, Hkv, G, D]
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)                      # [N, Hkv, L, D]
        if options.softcap is None:
            tile_out, tile_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                queries, keys.to(q.dtype), values.to(q.dtype), 0.0, False,
                attn_mask=tiles.tile_mask.to(q.dtype), scale=options.scale)[:2]
        else:
            tile_out, tile_lse = _softcapped_attention(queries, keys, values, tiles.tile_mask, options)
        if num_tiles == batch:                   # one tile a sequence: nothing to merge
            return tile_out.view(q.shape).to(q.dtype)
        return merge_by_lse(tile_out.float(), tile_lse, tiles.tile_seq, batch).view(q.shape).to(q.dtype)


def merge_by_lse(partial: torch.Tensor, lse: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Merge partial softmax outputs [N, ...rows, D] with log-sum-exps [N, ...rows] into [num_segments, ...rows, D]:
    O = sum_j exp(lse_j - L) o_j with L the segment's combined log-sum-exp."""
    rows = lse.shape[1:]
    top = torch.full((num_segments, *rows), float("-inf")).scatter_reduce(
        0, segment.view(-1, *[1] * len(rows)).expand_as(lse), lse, "amax")
    weight = torch.exp(lse - top[segment])
    numerator = torch.zeros(num_segments, *partial.shape[1:]).index_add_(0, segment, partial * weight[..., None])
    denominator = torch.zeros(num_segments, *rows).index_add_(0, segment, weight)
    return numerator / denominator[..., None]


def _softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                          options: AttentionOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-capped attention of q [..., n, D] over k, v [..., m, D] with an additive mask broadcastable to
    [..., n, m], in float32; returns the output [..., n, D] and the log-sum-exp [..., n]."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2))
    scores.mul_(options.scale / options.softcap).tanh_().mul_(options.softcap).add_(bias)
    lse = torch.logsumexp(scores, -1)
    return torch.matmul(scores.sub_(lse[..., None]).exp_(), v.float()), lse


# Rows per explicit (soft-capped) prefill product: bounds its [heads, rows, keys] scores at long contexts.
_SOFTCAP_ROWS = 256


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       options: AttentionOptions) -> torch.Tensor:
    """q [n, H, D] over k, v [m, Hkv, D]; mask bool [n, m] (True: visible), None: causal with n == m."""
    n, num_heads, head_dim = q.shape
    m, num_kv_heads = k.shape[:2]
    if options.softcap is None:
        # 4-D inputs: with 3-D ones torch's CPU SDPA falls back to its slow, memory-hungry math path.
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=mask, is_causal=mask is None and n > 1, scale=options.scale,
            enable_gqa=num_heads != num_kv_heads)
        return out[0].transpose(0, 1)
    if mask is None:
        mask = torch.ones(n, m, dtype=torch.bool).tril()
    group = num_heads // num_kv_heads
    queries = q.view(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)              # [Hkv, G, n, D]
    keys, values = k.transpose(0, 1)[:, None], v.transpose(0, 1)[:, None]              # [Hkv, 1, m, D]
    out = torch.empty(num_kv_heads, group, n, head_dim)
    for r in range(0, n, _SOFTCAP_ROWS):
        rows = slice(r, r + _SOFTCAP_ROWS)
        bias = torch.zeros(mask[rows].shape).masked_fill_(~mask[rows], float("-inf"))
        out[:, :, rows] = _softcapped_attention(queries[:, :, rows], keys, values, bias, options)[0]
    return out.permute(2, 0, 1, 3).reshape(n, num_heads, head_dim).to(q.dtype)
