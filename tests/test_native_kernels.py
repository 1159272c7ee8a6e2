"""Every native CPU kernel against a float64 (or plain torch) reference, on every ISA level this CPU
runs: on an AVX-512 machine the AVX2 and portable builds run too. Levels it cannot run are skipped
with the reason (tests/conftest.py lists at the end which ran)."""
from __future__ import annotations

import math

import pytest
import torch

from leanserve.kernels.attention import AttentionOptions
from tests.attention_cases import attention_reference, relative_error
from tests.conftest import LEVELS

QUANT_FORMATS = [("int4", 32), ("int4", 64), ("int4", 128), ("int8", 32), ("int8", 64), ("int8", 256)]


@pytest.fixture(params=LEVELS)
def kernels(request, native_kernels_of):
    return native_kernels_of(request.param)


class PagedBatch:
    """Sequences of (cached, new) tokens with random keys and values in shuffled cache blocks."""

    def __init__(self, shapes, block_size, num_kv, head_dim, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        self.shapes, self.block_size = shapes, block_size
        num_blocks = sum(-(-(c + n) // block_size) for c, n in shapes) + 1
        self.k_cache = torch.zeros(num_blocks, block_size, num_kv, head_dim, dtype=dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        order = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
        self.tables, self.keys, self.values, self.starts, self.slots = [], [], [], [], []
        for cached, new in shapes:
            table = [order.pop() for _ in range(-(-(cached + new) // block_size))]
            self.tables.append(table)
            self.keys.append(torch.randn(cached + new, num_kv, head_dim, generator=g))
            self.values.append(torch.randn(cached + new, num_kv, head_dim, generator=g))
            self.starts.append(len(self.slots))
            self.slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
        self.generator = g

    def write(self, which: str = "all") -> None:
        """Keys and values into the cache: of every position, or only of the cached prefixes."""
        for (cached, new), table, k, v in zip(self.shapes, self.tables, self.keys, self.values):
            for p in range(cached + new if which == "all" else cached):
                self.k_cache[table[p // self.block_size], p % self.block_size] = k[p]
                self.v_cache[table[p // self.block_size], p % self.block_size] = v[p]

    def plan(self, kernels, heads, tile=128, batch_invariant=False, windows=(0,)):
        return kernels.StepPlan(self.starts, [n for _, n in self.shapes], [c + n for c, n in self.shapes], self.tables,
                                torch.tensor(self.slots), self.block_size, heads, self.k_cache.shape[2], tile,
                                batch_invariant, list(windows))

    def rounded(self, t):
        """What the cache holds of t."""
        return t.to(self.k_cache.dtype).float()


# ------------------------------------------------------------------------------ quantized linear


def quantized_weight(fmt, n, k, group, seed=0):
    """Random stored weights (q, scales, mins with float16 values) and the exact float64 weight."""
    g = torch.Generator().manual_seed(seed)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 0.001).half()
    if fmt == "int4":
        q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
        mins = (-torch.rand(n, k // group, generator=g) * 0.2).half()
        w = q.double() * scales.double().repeat_interleave(group, 1) + mins.double().repeat_interleave(group, 1)
        return (q, scales, mins), w
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    return (q, scales), q.double() * scales.double().repeat_interleave(group, 1)


@pytest.mark.parametrize("fmt,group", QUANT_FORMATS, ids=[f"{f}-g{g}" for f, g in QUANT_FORMATS])
@pytest.mark.parametrize("m", [1, 3, 6, 70])
def test_quant_linear_matches_float64(kernels, fmt, group, m):
    """100 output rows (not a multiple of any tile), 1 to 70 activation rows (past the 64-row chunks),
    a zero row and an outlier: within the 16-bit activation bound of the exact product."""
    stored, w = quantized_weight(fmt, 100, 256, group)
    packed = getattr(kernels, f"pack_{fmt}")(*stored)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
    x[0, 3] = 40.0
    if m > 1:
        x[1] = 0.0
    y = kernels.quant_linear(x, *packed, group, 100)
    exact = x.double() @ w.t()
    assert y.dtype == torch.float32 and y.shape == (m, 100)
    # Two int8 parts per block of 32 keep ~16 bits: each element is off by at most its block's max|x| / 65024.
    bound = (x.view(m, -1, 32).abs().amax(-1).double() / 65024 * 32) @ w.abs().view(100, -1, 32).amax(-1).t()
    assert ((y.double() - exact).abs() <= bound * 1.01 + 1e-6).all()
    assert (y.double() - exact).norm() <= 1e-4 * exact.norm()


def test_quant_linear_linear_object_and_dense(kernels):
    """The executor's Linear: packed and dense weights give the same products as the kernel and torch."""
    stored, w = quantized_weight("int4", 40, 64, 32)
    packed = kernels.pack_int4(*stored)
    x = torch.randn(5, 64)
    assert torch.equal(kernels.Linear.quantized(*packed, 32, 40)(x), kernels.quant_linear(x, *packed, 32, 40))
    dense = w.float()
    torch.testing.assert_close(kernels.Linear.dense(dense)(x), x @ dense.t())


# ---------------------------------------------------------------------------------- elementwise


def test_norms_and_silu_match_float64(kernels):
    """Rows of 37 (vector tails), saturating SiLU inputs."""
    g = torch.Generator().manual_seed(0)
    x, residual, weight = torch.randn(5, 37, generator=g), torch.randn(5, 37, generator=g), torch.randn(37, generator=g)

    def norm(t):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()

    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5).double(), norm(x.double()), rtol=1e-5, atol=1e-6)
    x2, r2 = x.clone(), residual.clone()
    kernels.add_rms_norm(x2, r2, weight, 1e-5)
    torch.testing.assert_close(r2.double(), x.double() + residual.double(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x2.double(), norm(x.double() + residual.double()), rtol=1e-5, atol=1e-6)

    gate_up = torch.randn(5, 2 * 37, generator=g) * 8
    gate_up[0, :4] = torch.tensor([100.0, -100.0, 0.0, -0.0])
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(kernels.silu_mul(gate_up).double(), torch.nn.functional.silu(gate) * up,
                               rtol=1e-6, atol=1e-6)


def test_gelu_tanh_mul_matches_float64(kernels):
    """HF's gelu_pytorch_tanh times up: rows of 37 (vector tails), saturating inputs either side, and the
    negative inputs where 0.5 x (1 + tanh(u)) cancels (relative accuracy kept there too)."""
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(6, 2 * 37, generator=g) * 4
    gate_up[0, :8] = torch.tensor([100.0, -100.0, 0.0, -0.0, -6.0, -9.0, 1e-4, -1e-4])
    gate, up = gate_up.double().chunk(2, dim=-1)
    got = kernels.gelu_tanh_mul(gate_up).double()
    torch.testing.assert_close(got, torch.nn.functional.gelu(gate, approximate="tanh") * up, rtol=1e-5, atol=1e-7)
    # 0.5 x (1 + tanh(u)) = x sigmoid(2u): float64's own 1 + tanh(u) cancels to 0 near x = -9.
    exact = gate * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (gate + 0.044715 * gate ** 3)) * up
    assert ((got - exact).abs() <= 1e-5 * exact.abs() + 1e-36).all()


# ------------------------------------------------------------------------------------ attention

CACHE_DTYPES = [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)]


@pytest.mark.parametrize("dtype,tolerance", CACHE_DTYPES, ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("block_size,group,head_dim,tile", [
    (16, 1, 64, 128), (32, 3, 64, 40), (16, 8, 128, 100), (32, 3, 128, 2048), (16, 5, 80, 64), (16, 2, 256, 128)])
def test_lean_decode_on_ragged_contexts(kernels, dtype, tolerance, block_size, group, head_dim, tile):
    """Contexts of 1 to 2,000 tokens in shuffled blocks; tiles that end inside blocks and split heads in
    odd places; head dims whose vectors split unevenly into the kernel's chunks."""
    contexts = [1, 2000, 17, 333, 64, 1, 999, 1500]
    batch = PagedBatch([(c - 1, 1) for c in contexts], block_size, 2, head_dim, dtype, seed=block_size + group + tile)
    batch.write()
    q = torch.randn(len(contexts), 2 * group, head_dim, generator=batch.generator)
    width = max(len(t) for t in batch.tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in batch.tables])
    out = kernels.lean_attention_decode(q, batch.k_cache, batch.v_cache, tables, torch.tensor(contexts), tile,
                                        1 / math.sqrt(head_dim))
    for b, (k, v) in enumerate(zip(batch.keys, batch.values)):
        expected = attention_reference(q[b:b + 1], batch.rounded(k), batch.rounded(v))[0]
        assert (out[b].double() - expected).abs().max() / expected.abs().max() < 1e-5, f"sequence {b}"
        unrounded = attention_reference(q[b:b + 1], k, v)[0]
        assert (out[b].double() - unrounded).abs().max() / unrounded.abs().max() < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("block_size,num_kv,group,head_dim", [
    (16, 3, 3, 64), (8, 1, 8, 128), (32, 2, 1, 64), (16, 2, 5, 80), (16, 1, 16, 64)])
def test_prefill_attention_on_long_segments(kernels, dtype, block_size, num_kv, group, head_dim):
    """Fresh prompts and chunks after cached prefixes of up to 300 tokens, several items and key blocks
    each, segments that end inside both, groups that do not divide an item's rows."""
    shapes = [(0, 200), (300, 77), (45, 130), (1, 2), (0, 5)]
    batch = PagedBatch(shapes, block_size, num_kv, head_dim, dtype, seed=block_size + group + head_dim)
    batch.write()
    heads = num_kv * group
    q = torch.randn(len(batch.slots), heads, head_dim, generator=batch.generator)
    out = torch.zeros_like(q)
    kernels.paged_attention(q, batch.k_cache, batch.v_cache, batch.plan(kernels, heads), head_dim ** -0.5, out)
    for start, (cached, new), k, v in zip(batch.starts, shapes, batch.keys, batch.values):
        expected = attention_reference(q[start:start + new], batch.rounded(k), batch.rounded(v))
        got = out[start:start + new].double()
        assert (got - expected).abs().max() / expected.abs().max() < 1e-5, f"segment at row {start}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["f32", "f16", "bf16"])
def test_attention_step_equals_rotary_cache_write_and_attention(kernels, dtype):
    """The fused step (rotary, cache write, prefill and decode attention in one call) on a batch of decodes,
    fresh prompts and chunks after cached prefixes: the cache holds torch's rounding of the rotated keys
    and of the values, bit for bit, and each row's attention is float64's over them."""
    from leanserve.engine.models.decoder import rotate

    heads, kv_heads, d = 6, 2, 32
    shapes = [(0, 1), (39, 1), (0, 50), (129, 1), (20, 13)]
    batch = PagedBatch(shapes, 16, kv_heads, d, dtype, seed=3)
    batch.write("cached")
    g = batch.generator
    rows = len(batch.slots)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g)
    freqs = torch.rand(rows, 1, d // 2, generator=g) * 10
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([-freqs.sin(), freqs.sin()], -1)
    out = kernels.attention_step(qkv, cos, sin, batch.k_cache, batch.v_cache, batch.plan(kernels, heads, tile=64),
                                 d ** -0.5)
    qk, v = qkv.split([(heads + kv_heads) * d, kv_heads * d], dim=-1)
    qk = rotate(qk.reshape(rows, heads + kv_heads, d), cos, sin)
    q, k = qk.split([heads, kv_heads], dim=1)
    slots = torch.tensor(batch.slots)
    flat_k = batch.k_cache.view(-1, kv_heads, d)
    flat_v = batch.v_cache.view(-1, kv_heads, d)
    torch.testing.assert_close(flat_k[slots].float(), k.to(dtype).float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(flat_v[slots], v.reshape(rows, kv_heads, d).to(dtype))
    for start, (cached, new), table in zip(batch.starts, shapes, batch.tables):
        positions = torch.arange(cached + new)
        seq_slots = torch.tensor(table)[positions // 16] * 16 + positions % 16
        expected = attention_reference(q[start:start + new], flat_k[seq_slots].float(), flat_v[seq_slots].float())
        got = out[start:start + new].view(new, heads, d).double()
        assert (got - expected).abs().max() / expected.abs().max() < 1e-5, f"sequence at row {start}"


# Windows shorter than the prompts and contexts, one inside a key block and one that straddles them;
# soft-cap 2.0 on scores that are often larger, so that it changes the result.
WINDOW_OPTIONS = [(5, None), (5, 2.0), (33, 2.0), (None, 2.0)]


@pytest.mark.parametrize("window,softcap", WINDOW_OPTIONS, ids=[f"w{w}-cap{c}" for w, c in WINDOW_OPTIONS])
@pytest.mark.parametrize("group,head_dim,tile", [(3, 64, 64), (2, 256, 128), (4, 128, 2)])
def test_lean_decode_with_window_and_softcap(kernels, window, softcap, group, head_dim, tile):
    """Contexts around the window (shorter, equal, one past) and far past it (100, 250); tiles of 2
    split a window into several; head_dim 256 (Gemma's). Scores scaled up so that the cap bites."""
    contexts = [1, 4, 5, 6, 100, 37, 250, 33, 34]
    batch = PagedBatch([(c - 1, 1) for c in contexts], 16, 2, head_dim, torch.float32, seed=group + head_dim)
    batch.write()
    q = torch.randn(len(contexts), 2 * group, head_dim, generator=batch.generator) * 2
    width = max(len(t) for t in batch.tables)
    tables = torch.tensor([t + [0] * (width - len(t)) for t in batch.tables])
    scale = head_dim ** -0.5
    options = AttentionOptions(scale, window, softcap)
    out = kernels.lean_attention_decode(q, batch.k_cache, batch.v_cache, tables, torch.tensor(contexts), tile, scale,
                                        softcap=softcap, window=window)
    for b, (k, v) in enumerate(zip(batch.keys, batch.values)):
        expected = attention_reference(q[b:b + 1], k, v, options)[0]
        assert relative_error(out[b], expected) < 1e-5, f"context {contexts[b]}"
        if contexts[b] > (window or 1):     # the options change this row's attention
            plain = attention_reference(q[b:b + 1], k, v, AttentionOptions(scale))[0]
            assert relative_error(out[b], plain) > 1e-2, f"context {contexts[b]}"


@pytest.mark.parametrize("window,softcap", WINDOW_OPTIONS, ids=[f"w{w}-cap{c}" for w, c in WINDOW_OPTIONS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("num_kv,group,head_dim", [(2, 3, 64), (1, 8, 128), (2, 2, 256)])
def test_prefill_attention_with_window_and_softcap(kernels, window, softcap, dtype, num_kv, group, head_dim):
    """40-token prompts, chunks after cached prefixes of 60 and 100 tokens, prompts shorter than the
    window, a decode row of 130: several items a segment, whose rows' windows start in different key blocks."""
    shapes = [(0, 40), (60, 40), (100, 3), (0, 4), (2, 2), (129, 1)]
    batch = PagedBatch(shapes, 16, num_kv, head_dim, dtype, seed=group + head_dim)
    batch.write()
    heads = num_kv * group
    q = torch.randn(len(batch.slots), heads, head_dim, generator=batch.generator) * 2
    out = torch.zeros_like(q)
    scale = head_dim ** -0.5
    options = AttentionOptions(scale, window, softcap)
    plan = batch.plan(kernels, heads, batch_invariant=True, windows=[window or 0])    # the decode row too
    kernels.paged_attention(q, batch.k_cache, batch.v_cache, plan, scale, out, softcap=softcap, window=window)
    for start, (cached, new), k, v in zip(batch.starts, shapes, batch.keys, batch.values):
        rows = slice(start, start + new)
        expected = attention_reference(q[rows], batch.rounded(k), batch.rounded(v), options)
        assert relative_error(out[rows], expected) < 1e-5, f"segment at row {start}"
        if cached + new > (window or 1):
            plain = attention_reference(q[rows], batch.rounded(k), batch.rounded(v), AttentionOptions(scale))
            assert relative_error(out[rows], plain) > 1e-2, f"segment at row {start}"


@pytest.mark.parametrize("window,softcap", [(None, None), (5, 2.0), (33, None), (None, 2.0)],
                         ids=["full", "w5-cap2", "w33", "cap2"])
@pytest.mark.parametrize("heads,num_kv,d,dtype", [(6, 2, 64, torch.float32), (14, 2, 64, torch.float16),
                                                  (4, 1, 256, torch.bfloat16)], ids=["g3", "g7-f16", "g4-d256-bf16"])
def test_attention_is_batch_invariant(kernels, window, softcap, heads, num_kv, d, dtype):
    """One sequence's 80 tokens prefilled whole, in two chunks, and token by token (decode rows, through
    invariant_decode) in batch-invariant plans, each time beside another prompt: every token's output
    the same bits each way, though its rows sit in other items that start at other key blocks."""
    total = 80
    batch = PagedBatch([(0, total), (0, 23)], 16, num_kv, d, dtype, seed=7)
    batch.write()
    table, other = batch.tables
    q = torch.randn(total, heads, d, generator=batch.generator)
    q_other = torch.randn(23, heads, d, generator=batch.generator)

    def run(pieces):
        """pieces: (cached, new) chunks of the sequence, in one step beside the other prompt."""
        starts, lens, contexts, tables, queries = [], [], [], [], []
        for cached, new in [*pieces, (0, 23)]:
            starts.append(sum(lens))
            lens.append(new)
            contexts.append(cached + new)
            queries.append(q[cached:cached + new] if len(tables) < len(pieces) else q_other)
            tables.append(table if len(tables) < len(pieces) else other)
        slots = torch.zeros(sum(lens), dtype=torch.long)              # unused: the cache holds every key
        plan = kernels.StepPlan(starts, lens, contexts, tables, slots, 16, heads, num_kv, 128, True, [window or 0])
        out = torch.zeros(sum(lens), heads, d)
        kernels.paged_attention(torch.cat(queries), batch.k_cache, batch.v_cache, plan, d ** -0.5, out,
                                softcap=softcap, window=window)
        return out[:sum(lens[:-1])]

    whole = run([(0, total)])
    options = AttentionOptions(d ** -0.5, window, softcap)
    expected = attention_reference(q, batch.rounded(batch.keys[0]), batch.rounded(batch.values[0]), options)
    assert relative_error(whole, expected) < 1e-5
    assert torch.equal(run([(0, 37), (37, total - 37)]), whole)
    assert torch.equal(run([(p, 1) for p in range(total)]), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("head_dim,window,softcap", [(32, None, None), (32, 5, 2.0), (256, 5, None), (80, 7, 2.0)])
def test_attention_step_with_bias_and_qk_norms(kernels, dtype, head_dim, window, softcap):
    """The fused step as Qwen2 (biases), Qwen3 and Gemma (per-head RMSNorm of q and k before the
    rotation) have it, with a window and soft-cap, on decodes of 100-token contexts and 40-token
    prompts: the cache holds the rounding of torch's keys, each row's attention is float64's over them."""
    from leanserve.engine.models.decoder import rotate

    heads, kv_heads, d, eps = 4, 2, head_dim, 1e-6
    shapes = [(0, 1), (99, 1), (0, 40), (129, 1), (20, 13)]
    batch = PagedBatch(shapes, 16, kv_heads, d, dtype, seed=head_dim)
    batch.write("cached")
    g = batch.generator
    rows, width = len(batch.slots), (heads + 2 * kv_heads) * d
    qkv = torch.randn(rows, width, generator=g)
    bias = torch.randn(width, generator=g)
    q_norm, k_norm = torch.rand(d, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5
    freqs = torch.rand(rows, 1, d // 2, generator=g) * 10
    cos, sin = torch.cat([freqs.cos()] * 2, -1), torch.cat([-freqs.sin(), freqs.sin()], -1)
    scale = 0.3 * d ** -0.5                 # not head_dim ** -0.5 (Gemma's query_pre_attn_scalar)
    out = kernels.attention_step(qkv, cos, sin, batch.k_cache, batch.v_cache,
                                 batch.plan(kernels, heads, tile=64, windows=[0, window or 0]), scale,
                                 softcap=softcap, window=window, qkv_bias=bias, q_norm=q_norm, k_norm=k_norm, eps=eps)
    qk, v = (qkv + bias).split([(heads + kv_heads) * d, kv_heads * d], dim=-1)
    qk = qk.reshape(rows, heads + kv_heads, d)
    normed = torch.cat([torch.nn.functional.rms_norm(qk[:, :heads], (d,), q_norm, eps),
                        torch.nn.functional.rms_norm(qk[:, heads:], (d,), k_norm, eps)], dim=1)
    q, k = rotate(normed, cos, sin).split([heads, kv_heads], dim=1)
    slots = torch.tensor(batch.slots)
    flat_k, flat_v = batch.k_cache.view(-1, kv_heads, d), batch.v_cache.view(-1, kv_heads, d)
    # Within a unit of the cache's last place: float32 norms that differ in their last bit may round apart.
    torch.testing.assert_close(flat_k[slots].float(), k.to(dtype).float(), rtol=max(1e-5, torch.finfo(dtype).eps),
                               atol=1e-5)
    assert torch.equal(flat_v[slots], v.reshape(rows, kv_heads, d).to(dtype))
    for start, (cached, new), table in zip(batch.starts, shapes, batch.tables):
        positions = torch.arange(cached + new)
        seq_slots = torch.tensor(table)[positions // 16] * 16 + positions % 16
        expected = attention_reference(q[start:start + new], flat_k[seq_slots].float(), flat_v[seq_slots].float(),
                                       AttentionOptions(scale, window, softcap))
        assert relative_error(out[start:start + new].view(new, heads, d), expected) < 1e-5, f"row {start}"


def test_plan_counts_tiles_and_items(kernels):
    """A decode row of 300 tokens in tiles of 128 is 3 tiles; a 50-token prompt with 3 query heads a KV
    head is 150 rows per KV head, cut into items of 3 x kLanes rows."""
    plan = kernels.StepPlan([0, 1], [1, 50], [300, 50], [list(range(19)), list(range(4))],
                            torch.zeros(51, dtype=torch.long), 16, 6, 2, 128)
    assert plan.num_tiles == 3
    assert plan.num_prefill_items == 2 * -(-150 // (3 * kernels.LANES))
    windowed = kernels.StepPlan([0, 1], [1, 50], [300, 50], [list(range(19)), list(range(4))],
                                torch.zeros(51, dtype=torch.long), 16, 6, 2, 128, False, [0, 5, 200])
    assert [windowed.num_tiles_of(w) for w in (0, 5, 200)] == [3, 1, 2]    # from the window's edge
    with pytest.raises(RuntimeError, match="planned without window 7"):
        windowed.num_tiles_of(7)
    invariant = kernels.StepPlan([0, 1], [1, 50], [300, 50], [list(range(19)), list(range(4))],
                                 torch.zeros(51, dtype=torch.long), 16, 6, 2, 128, True)
    assert (invariant.num_decode_rows, invariant.num_prefill_items) == (1, plan.num_prefill_items)
    with pytest.raises(RuntimeError, match="no lean attention tiles"):
        invariant.num_tiles_of(0)


def test_plan_rejects_a_block_table_short_of_the_context(kernels):
    with pytest.raises(RuntimeError, match="block table must cover"):
        kernels.StepPlan([0], [1], [40], [[0, 1]], torch.zeros(1, dtype=torch.long), 16, 2, 1, 128)
