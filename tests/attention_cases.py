"""Ragged attention batches on a paged cache and their float64 reference, shared by the torch and Triton
backend tests."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from leanserve.kernels.attention import AttentionMetadata, AttentionOptions


def attention_reference(q, keys, values, options: AttentionOptions | None = None):
    """q [n, H, D] are the last n of keys' m positions: explicit masked softmax attention in float64,
    HuggingFace's semantics (scale, then soft-cap, then the causal and sliding-window mask)."""
    n, num_heads, d = q.shape
    m, num_kv = keys.shape[:2]
    options = options or AttentionOptions(scale=d ** -0.5)
    group = num_heads // num_kv
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", q.double(), k) * options.scale
    if options.softcap is not None:
        scores = options.softcap * torch.tanh(scores / options.softcap)
    query_pos, key_pos = torch.arange(m - n, m)[:, None], torch.arange(m)[None, :]
    visible = key_pos <= query_pos
    if options.sliding_window is not None:
        visible &= key_pos > query_pos - options.sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v)


def relative_error(got, expected):
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


@dataclass
class RaggedBatch:
    """One step's flat batch: q, k, v [T, ...] of the new tokens, a cache already holding every
    sequence's earlier tokens, and each sequence's whole keys and values (for the reference)."""

    shapes: list[tuple[int, int]]   # per sequence: (tokens cached before this step, new tokens)
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slots: list[int]
    starts: list[int]
    tables: list[list[int]]
    block_size: int
    full_k: list[torch.Tensor]
    full_v: list[torch.Tensor]

    def metadata(self) -> AttentionMetadata:
        return AttentionMetadata(torch.tensor(self.slots), self.starts, [n for _, n in self.shapes],
                                 [c + n for c, n in self.shapes], self.tables, self.block_size)

    def rows(self, seq: int) -> slice:
        return slice(self.starts[seq], self.starts[seq] + self.shapes[seq][1])

    def expected(self, seq: int, options: AttentionOptions | None = None) -> torch.Tensor:
        return attention_reference(self.q[self.rows(seq)], self.full_k[seq], self.full_v[seq], options)


def ragged_batch(shapes, block_size, num_kv, group, d, num_blocks=None, cache_dtype=torch.float32, seed=0):
    """Sequences in shuffled cache blocks; their earlier tokens already cached, as earlier steps left them."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-(c + n) // block_size) for c, n in shapes]
    num_blocks = num_blocks or sum(needed) + 3
    k_cache = torch.zeros(num_blocks, block_size, num_kv, d, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(n)] for n in needed]
    full_k = [torch.randn(c + n, num_kv, d, generator=g) for c, n in shapes]
    full_v = [torch.randn(c + n, num_kv, d, generator=g) for c, n in shapes]
    q_parts, slots, starts = [], [], []
    for (cached, new), table, fk, fv in zip(shapes, tables, full_k, full_v):
        pos = torch.arange(cached + new)
        seq_slots = (torch.tensor(table)[pos // block_size] * block_size + pos % block_size).tolist()
        k_cache.view(-1, num_kv, d)[seq_slots[:cached]] = fk[:cached].to(cache_dtype)
        v_cache.view(-1, num_kv, d)[seq_slots[:cached]] = fv[:cached].to(cache_dtype)
        starts.append(sum(p.shape[0] for p in q_parts))
        q_parts.append(torch.randn(new, num_kv * group, d, generator=g))
        slots += seq_slots[cached:]
    q = torch.cat(q_parts)
    k = torch.cat([fk[c:] for (c, _), fk in zip(shapes, full_k)])
    v = torch.cat([fv[c:] for (c, _), fv in zip(shapes, full_v)])
    return RaggedBatch(list(shapes), q, k, v, k_cache, v_cache, slots, starts, tables, block_size, full_k, full_v)


# (cached tokens before this step, new tokens): fresh prompts of 40 tokens and shorter, chunks after a
# cached prefix, decode rows with contexts 1 to 100.
MIXED_SHAPES = [(0, 40), (0, 1), (30, 12), (99, 1), (4, 1), (0, 3), (63, 1), (17, 1), (8, 40)]

HEAD_DIM = 32

# Layer options the tests sweep (head dim HEAD_DIM): a non-default scale, windows shorter than the prompts,
# a soft-cap that barely matters (50) and one that does (2), both together, and a window of one (a token
# sees only itself).
OPTION_CASES = {
    "scale": AttentionOptions(scale=0.3),
    "window5": AttentionOptions(scale=HEAD_DIM ** -0.5, sliding_window=5),
    "window24": AttentionOptions(scale=HEAD_DIM ** -0.5, sliding_window=24),
    "softcap50": AttentionOptions(scale=HEAD_DIM ** -0.5, softcap=50.0),
    "softcap2": AttentionOptions(scale=0.3, softcap=2.0),
    "window5_softcap2": AttentionOptions(scale=HEAD_DIM ** -0.5, sliding_window=5, softcap=2.0),
    "window1": AttentionOptions(scale=HEAD_DIM ** -0.5, sliding_window=1),
}
