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

import torch
import torch.nn.functional as F


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


@dataclass
class DecodeTiles:
    """Decode sequences (one query token each) cut into tiles of their contexts.

    Tile t covers `tile_slots[t]` (padded past the context end with slot 0 and
    masked by `tile_valid`), for decode sequence `tile_seq[t]`.
    """

    rows: torch.Tensor        # [D] row of each decode sequence's query in the flat batch
    tile_seq: torch.Tensor    # [N] decode-sequence index of each tile
    tile_slots: torch.Tensor  # [N, tile] cache slots
    tile_valid: torch.Tensor  # [N, tile] bool


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
    """Plain torch attention for the CPU: no padded query rows or keys beyond a decode tile's tail.

    Prefill segments (several query tokens) run one SDPA call each: a fresh prompt
    attends to its own new keys with a causal mask; a chunk or a prompt with a
    cached prefix reads its earlier keys from the cache. Decode sequences (one
    query token) are cut into tiles of `tile_size` cached tokens, computed as
    one batched product, and each sequence's tiles are merged by log-sum-exp.
    """

    def __init__(self, tile_size: int = 128) -> None:
        self.tile_size = tile_size

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
        context_lens = torch.tensor([md.context_lens[s] for s in seqs])
        tiles_per_seq = (context_lens + self.tile_size - 1) // self.tile_size
        tile_seq = torch.repeat_interleave(torch.arange(len(seqs)), tiles_per_seq)
        first_tile = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq
        tile_start = (torch.arange(len(tile_seq)) - first_tile[tile_seq]) * self.tile_size
        positions = tile_start[:, None] + torch.arange(self.tile_size)          # [N, tile]
        valid = positions < context_lens[tile_seq][:, None]
        width = max(len(md.block_tables[s]) for s in seqs)
        tables = torch.tensor([md.block_tables[s] + [0] * (width - len(md.block_tables[s])) for s in seqs])
        blocks = tables[tile_seq[:, None], (positions // md.block_size).clamp(max=width - 1)]
        slots = torch.where(valid, blocks * md.block_size + positions % md.block_size, 0)
        rows = torch.tensor([md.query_starts[s] for s in seqs])
        return DecodeTiles(rows, tile_seq, slots, valid)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hkv, D] for the new tokens; returns [T, H, D]."""
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        k_flat = k_cache.view(-1, num_kv_heads, head_dim)
        v_flat = v_cache.view(-1, num_kv_heads, head_dim)
        k_flat.index_copy_(0, md.slot_mapping, k)
        v_flat.index_copy_(0, md.slot_mapping, v)
        out = torch.empty_like(q)
        for start, q_len, ctx_len, cached in md.prefill:
            rows = slice(start, start + q_len)
            if cached is None:
                keys, values = k[rows], v[rows]
            else:
                keys, values = k_flat[cached], v_flat[cached]
            out[rows] = _causal_attention(q[rows], keys, values)
        if md.decode is not None:
            out[md.decode.rows] = _tiled_decode_attention(q[md.decode.rows], k_flat, v_flat, md.decode)
        return out


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


def _tiled_decode_attention(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor,
                            tiles: DecodeTiles) -> torch.Tensor:
    """q [B, H, D] one token per sequence; returns [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_flat.shape[1]
    group = num_heads // num_kv_heads
    keys = k_flat[tiles.tile_slots]                      # [N, tile, Hkv, D]
    values = v_flat[tiles.tile_slots]
    queries = q.view(batch, num_kv_heads, group, head_dim)[tiles.tile_seq]   # [N, Hkv, G, D]
    scores = torch.einsum("nhgd,nthd->nhgt", queries, keys) * (1.0 / math.sqrt(head_dim))
    scores = scores.masked_fill(~tiles.tile_valid[:, None, None, :], float("-inf"))
    tile_max = scores.amax(dim=-1)                       # [N, Hkv, G]
    probs = torch.exp(scores - tile_max.unsqueeze(-1))
    tile_sum = probs.sum(dim=-1)
    tile_out = torch.einsum("nhgt,nthd->nhgd", probs, values)
    # Merge the tiles of each sequence: rescale each to the sequence's running max.
    seq_max = torch.full((batch, num_kv_heads, group), float("-inf"), dtype=scores.dtype).scatter_reduce(
        0, tiles.tile_seq[:, None, None].expand_as(tile_max), tile_max, "amax")
    weight = torch.exp(tile_max - seq_max[tiles.tile_seq])
    numerator = torch.zeros(batch, num_kv_heads, group, head_dim, dtype=scores.dtype)
    numerator.index_add_(0, tiles.tile_seq, tile_out * weight.unsqueeze(-1))
    denominator = torch.zeros(batch, num_kv_heads, group, dtype=scores.dtype)
    denominator.index_add_(0, tiles.tile_seq, tile_sum * weight)
    return (numerator / denominator.unsqueeze(-1)).view(batch, num_heads, head_dim).to(q.dtype)
