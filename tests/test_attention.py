"""Torch attention backend on a paged cache against a float64 per-sequence reference (the native
kernels' tests: test_native_kernels.py)."""
import math

import pytest
import torch

from leanserve.kernels.attention import AttentionMetadata, TorchAttentionBackend


def attention_reference(q, keys, values):
    """q [n, H, D] are the last n of m positions; plain softmax attention in float64."""
    n, num_heads, d = q.shape
    m, num_kv = keys.shape[:2]
    group = num_heads // num_kv
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", q.double(), k) / math.sqrt(d)
    visible = torch.arange(m)[None, :] <= torch.arange(m - n, m)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("cache_dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("block_size,num_kv,group,tile", [(16, 3, 3, 128), (4, 2, 1, 8), (8, 1, 8, 16), (8, 2, 5, 16)])
def test_mixed_batch_matches_reference(block_size, num_kv, group, tile, cache_dtype, tolerance):
    """float32 queries over a float32 or float16 cache (the reference: float64 on unrounded keys)."""
    torch.manual_seed(0)
    d, num_blocks = 32, 200
    k_cache = torch.zeros(num_blocks, block_size, num_kv, d, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    # (cached tokens before this step, new tokens): fresh prompts, a chunk after a prefix, decodes.
    shapes = [(0, 37), (0, 1), (20, 9), (5, 1), (63, 1), (1, 1), (130, 1), (0, 3)]
    free = torch.randperm(num_blocks).tolist()
    tables, full_k, full_v = [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        tables.append(table)
        full_k.append(torch.randn(total, num_kv, d))
        full_v.append(torch.randn(total, num_kv, d))
        for p in range(cached):                       # earlier steps already wrote the prefix
            k_cache[table[p // block_size], p % block_size] = full_k[-1][p]
            v_cache[table[p // block_size], p % block_size] = full_v[-1][p]
    q_parts, k_parts, v_parts, slots, starts = [], [], [], [], []
    for (cached, new), table, fk, fv in zip(shapes, tables, full_k, full_v):
        starts.append(sum(p.shape[0] for p in q_parts))
        q_parts.append(torch.randn(new, num_kv * group, d))
        k_parts.append(fk[cached:])
        v_parts.append(fv[cached:])
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
    md = AttentionMetadata(torch.tensor(slots), starts, [n for _, n in shapes], [c + n for c, n in shapes],
                           tables, block_size)
    backend = TorchAttentionBackend(tile_size=tile)
    backend.prepare(md)
    out = backend.forward(torch.cat(q_parts), torch.cat(k_parts), torch.cat(v_parts), k_cache, v_cache, md)
    for i, (q, fk, fv) in enumerate(zip(q_parts, full_k, full_v)):
        expected = attention_reference(q, fk, fv)
        got = out[starts[i]:starts[i] + q.shape[0]].double()
        assert (got - expected).abs().max() / expected.abs().max() < tolerance, f"sequence {i} {shapes[i]}"
    # Every new token's keys and values landed in its own slot.
    flat_k = k_cache.view(-1, num_kv, d)
    assert torch.equal(flat_k[torch.tensor(slots)], torch.cat(k_parts).to(cache_dtype))
