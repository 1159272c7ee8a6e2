"""Attention over a flat, unpadded token batch and a paged KV cache.

The runner builds one `AttentionMetadata` per step and installs it with
`forward_context`; attention layers read it with `get_forward_context()`, so
model code never threads batch metadata through its signatures.

Cache layout, per layer: keys and values each [num_blocks, block_size,
num_kv_heads, head_dim]; viewed flat as [num_slots, num_kv_heads, head_dim], a
token's slot is block * block_size + offset.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
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


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [T] cache slot each new token's K/V is written to
    query_starts: list[int]             # per sequence: first row of its tokens in the flat batch
    query_lens: list[int]               # per sequence: tokens computed this step
    context_lens: list[int]             # per sequence: tokens cached after this step (prefix + new)
    block_tables: list[list[int]]       # per sequence: its cache blocks
    block_size: int
    # Built once per step by the backend and shared by all layers.
    prefill: list[tuple[int, int, int, torch.Tensor | None]] | None = None
    decode: "DecodeTiles | None" = None


class AttentionBackend(Protocol):
    """Attention for the torch model: `prepare` once per step, `forward` in every layer."""

    def prepare(self, md: AttentionMetadata) -> None:
        """Work out what every layer's attention needs of the step's metadata (stored on md)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] of the new tokens: write k and v to their cache slots and
        return the attention output [T, H, D]."""


@dataclass
class DecodeTiles:
    """Decode sequences (one query token each) cut into tiles of whole cache blocks.

    Tile t is `tile_blocks[t]` (padded past the context's last block with block
    0), for decode sequence `tile_seq[t]`; `tile_mask[t]` is 0 on its context's
    tokens and -inf past the end.
    """

    rows: torch.Tensor         # [B] row of each decode sequence's query in the flat batch
    tile_seq: torch.Tensor     # [N] decode-sequence index of each tile
    tile_blocks: torch.Tensor  # [N, blocks per tile] cache blocks
    tile_mask: torch.Tensor    # [N, 1, 1, tile tokens] additive mask


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
        md.prefill, decode = [], []
        for seq in range(len(md.query_lens)):
            q_len, ctx_len = md.query_lens[seq], md.context_lens[seq]
            if q_len > 1 or ctx_len == 1:
                cached = None
                if ctx_len > q_len:
                    cached = context_slots(md.block_tables[seq], md.block_size, torch.arange(ctx_len))
                md.prefill.append((md.query_starts[seq], q_len, ctx_len, cached))
            else:
                decode.append(seq)
        md.decode = self._decode_tiles(md, decode) if decode else None

    def _decode_tiles(self, md: AttentionMetadata, seqs: list[int]) -> DecodeTiles:
        bs = md.block_size
        blocks_per_tile = max(1, self.tile_size // bs)
        context_lens = torch.tensor([md.context_lens[s] for s in seqs])
        num_blocks = (context_lens + bs - 1) // bs
        tiles_per_seq = (num_blocks + blocks_per_tile - 1) // blocks_per_tile
        tile_seq = torch.repeat_interleave(torch.arange(len(seqs)), tiles_per_seq)
        first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
        tile_start = (torch.arange(len(tile_seq)) - first_tile[tile_seq]) * blocks_per_tile     # in blocks
        block_index = tile_start[:, None] + torch.arange(blocks_per_tile)                        # [N, blocks]
        width = int(num_blocks.max())
        tables = torch.tensor([md.block_tables[s][:width] + [0] * (width - len(md.block_tables[s][:width]))
                               for s in seqs])
        in_context = block_index < num_blocks[tile_seq][:, None]
        blocks = torch.where(in_context, tables[tile_seq[:, None], block_index.clamp(max=width - 1)], 0)
        positions = tile_start[:, None] * bs + torch.arange(blocks_per_tile * bs)
        mask = torch.zeros(positions.shape).masked_fill_(positions >= context_lens[tile_seq][:, None], float("-inf"))
        rows = torch.tensor([md.query_starts[s] for s in seqs])
        return DecodeTiles(rows, tile_seq, blocks, mask[:, None, None, :])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] for the new tokens; returns [T, H, D]. The cache may hold
        another float dtype than q's (a float16 cache for a float32 model): attention computes in q's."""
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        k_flat.index_copy_(0, md.slot_mapping, k.to(k_cache.dtype))
        v_flat.index_copy_(0, md.slot_mapping, v.to(v_cache.dtype))
        if not md.prefill:                       # decode only: the rows are the decode sequences in order
            return self._decode(q, k_cache, v_cache, md.decode)
        out = torch.empty_like(q)
        for start, q_len, ctx_len, cached in md.prefill:
            rows = slice(start, start + q_len)
            if cached is None:
                keys, values = k[rows], v[rows]
            else:
                keys, values = k_flat[cached].to(q.dtype), v_flat[cached].to(q.dtype)
            out[rows] = _causal_attention(q[rows], keys, values)
        if md.decode is not None:
            out[md.decode.rows] = self._decode(q[md.decode.rows], k_cache, v_cache, md.decode)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                tiles: DecodeTiles) -> torch.Tensor:
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
        tile_out, tile_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            queries, keys.transpose(1, 2).to(q.dtype), values.transpose(1, 2).to(q.dtype), 0.0, False,
            attn_mask=tiles.tile_mask.to(q.dtype), scale=1.0 / math.sqrt(head_dim))[:2]
        if num_tiles == batch:                   # one tile a sequence: nothing to merge
            return tile_out.view(q.shape)
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


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [n, H, D] are the last n of k/v's m positions; query i sees keys 0 .. m - n + i."""
    n, m = q.shape[0], k.shape[0]
    mask = None
    if n != m:
        mask = torch.ones(n, m, dtype=torch.bool).tril(diagonal=m - n)
    # 4-D inputs: with 3-D ones torch's CPU SDPA falls back to its slow, memory-hungry math path.
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None and n > 1, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)
