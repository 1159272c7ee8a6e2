"""Torch attention backend on a paged cache against a float64 per-sequence reference."""
import math

import pytest
import torch

from leanserve.kernels.attention import AttentionMetadata, TorchAttentionBackend
from leanserve.kernels.cpu_kernels import native_kernels


def backend_for(native: bool, tile: int) -> TorchAttentionBackend:
    if native and native_kernels() is None:
        pytest.skip("the native CPU kernel did not build here (no C++ compiler?)")
    return TorchAttentionBackend(tile_size=tile, native=native)


def reference(q, keys, values):
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


@pytest.mark.parametrize("native", [False, True], ids=["torch", "native"])
@pytest.mark.parametrize("cache_dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("block_size,num_kv,group,tile", [(16, 3, 3, 128), (4, 2, 1, 8), (8, 1, 8, 16), (8, 2, 5, 16)])
def test_mixed_batch_matches_reference(block_size, num_kv, group, tile, cache_dtype, tolerance, native):
    """float32 queries over a float32 or float16 cache (the reference: float64 on unrounded keys). Natively,
    the prefill segments run in prefill_attention, except with 5 query heads a KV head (its items hold
    48 rows, so the group must divide 48), which takes the torch path."""
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
    backend = backend_for(native, tile)
    backend.prepare(md)
    out = backend.forward(torch.cat(q_parts), torch.cat(k_parts), torch.cat(v_parts), k_cache, v_cache, md)
    for i, (q, fk, fv) in enumerate(zip(q_parts, full_k, full_v)):
        expected = reference(q, fk, fv)
        got = out[starts[i]:starts[i] + q.shape[0]].double()
        assert (got - expected).abs().max() / expected.abs().max() < tolerance, f"sequence {i} {shapes[i]}"
    # Every new token's keys and values landed in its own slot.
    flat_k = k_cache.view(-1, num_kv, d)
    assert torch.equal(flat_k[torch.tensor(slots)], torch.cat(k_parts).to(cache_dtype))


@pytest.mark.parametrize("cache_dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("block_size,num_kv,group,head_dim", [(16, 3, 3, 64), (8, 1, 8, 128), (32, 2, 1, 64)])
def test_native_prefill_attention_on_long_segments(cache_dtype, tolerance, block_size, num_kv, group, head_dim):
    """The prefill kernel alone: fresh prompts and chunks after cached prefixes of up to 300 tokens (in
    shuffled blocks), several items and key blocks each, segments that end inside both."""
    kernels = backend_for(True, 128).kernels
    assert kernels.prefill_attention_supported(num_kv * group, num_kv, head_dim)
    g = torch.Generator().manual_seed(block_size + group + head_dim)
    shapes = [(0, 200), (300, 77), (0, 1), (45, 130), (1, 2)]          # (cached, new)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in shapes) + 1
    k_cache = torch.zeros(num_blocks, block_size, num_kv, head_dim, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables, full_k, full_v, segments, row = [], [], [], [], 0
    for cached, new in shapes:
        table = [order.pop() for _ in range(-(-(cached + new) // block_size))]
        tables.append(table)
        full_k.append(torch.randn(cached + new, num_kv, head_dim, generator=g))
        full_v.append(torch.randn(cached + new, num_kv, head_dim, generator=g))
        for p in range(cached):
            k_cache[table[p // block_size], p % block_size] = full_k[-1][p]
            v_cache[table[p // block_size], p % block_size] = full_v[-1][p]
        segments.append([row, new, cached + new])
        row += new
    q = torch.randn(row, num_kv * group, head_dim, generator=g)
    k = torch.cat([fk[c:] for fk, (c, _) in zip(full_k, shapes)])
    v = torch.cat([fv[c:] for fv, (c, _) in zip(full_v, shapes)])
    width = max(len(t) for t in tables)
    out = torch.zeros_like(q)
    kernels.prefill_attention(q, k, v, k_cache, v_cache, torch.tensor(segments),
                              torch.tensor([t + [0] * (width - len(t)) for t in tables]), head_dim ** -0.5, out)
    for (start, new, _), fk, fv in zip(segments, full_k, full_v):
        expected = reference(q[start:start + new], fk, fv)
        got = out[start:start + new].double()
        assert (got - expected).abs().max() / expected.abs().max() < tolerance, f"segment at row {start}"


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("block_size,group,head_dim,tile", [
    (16, 1, 64, 128), (32, 3, 64, 40), (16, 8, 128, 100), (32, 3, 128, 2048)])
def test_native_lean_decode_on_ragged_contexts(dtype, tolerance, block_size, group, head_dim, tile):
    """The kernel alone, on contexts of 1 to 2,000 tokens in shuffled blocks; tiles that end inside
    blocks and split heads in odd places."""
    backend = backend_for(True, tile)
    g = torch.Generator().manual_seed(block_size + group + head_dim + tile)
    num_kv = 2
    contexts = [1, 2000, 17, 333, 64, 1, 999, 1500]
    num_blocks = sum(-(-c // block_size) for c in contexts) + 1
    k_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=g).to(dtype)
    order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    tables = [[order.pop() for _ in range(-(-c // block_size))] for c in contexts]
    q = torch.randn(len(contexts), num_kv * group, head_dim, generator=g).to(dtype)
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    out = backend.kernels.lean_attention_decode(q, k_cache, v_cache, block_tables, torch.tensor(contexts), tile,
                                                1 / math.sqrt(head_dim))
    assert out.dtype == dtype
    for b, (table, context) in enumerate(zip(tables, contexts)):
        keys = k_cache[torch.tensor(table)].flatten(0, 1)[:context]
        values = v_cache[torch.tensor(table)].flatten(0, 1)[:context]
        expected = reference(q[b:b + 1], keys, values)[0]
        assert (out[b].double() - expected).abs().max() / expected.abs().max() < tolerance, f"sequence {b}"


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_native_attention_step_equals_rotary_cache_write_and_attention(cache_dtype):
    """The fused step (rotary, cache write, prefill and decode attention in one call) against the unfused
    path it replaces, on a batch of decodes, a fresh prompt and a chunk after a cached prefix."""
    from leanserve.engine.models.llama import rotate

    backend = backend_for(True, 64)
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, d, block_size = 6, 2, 32, 16
    shapes = [(0, 1), (39, 1), (0, 50), (129, 1), (20, 13)]           # (cached, new)
    num_blocks = sum(-(-(c + n) // block_size) for c, n in shapes) + 1
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(cache_dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(cache_dtype)
    order = list(range(1, num_blocks))
    tables = [[order.pop() for _ in range(-(-(c + n) // block_size))] for c, n in shapes]
    slots, starts = [], []
    for (cached, new), table in zip(shapes, tables):
        starts.append(len(slots))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
    md = AttentionMetadata(torch.tensor(slots), starts, [n for _, n in shapes], [c + n for c, n in shapes], tables,
                           block_size)
    backend.prepare(md)
    rows = len(slots)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g)
    freqs = torch.rand(rows, 1, d // 2, generator=g) * 10
    rope = torch.cat([freqs.cos()] * 2, -1), torch.cat([-freqs.sin(), freqs.sin()], -1)

    k2, v2 = k_cache.clone(), v_cache.clone()
    fused = backend.attention_step(qkv, rope, k_cache, v_cache, md, heads)
    qk, v = qkv.split([(heads + kv_heads) * d, kv_heads * d], dim=-1)
    qk = rotate(qk.reshape(rows, heads + kv_heads, d), *rope)
    q, k = qk.split([heads, kv_heads], dim=1)
    expected = backend.forward(q, k, v.reshape(rows, kv_heads, d), k2, v2, md).reshape(rows, heads * d)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache, k2, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache, v2)
