"""Triton kernels under the CPU interpreter against float64 torch references, on small ragged batches."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")    # before the kernels are defined: triton.jit reads it then

import math  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from leanserve.kernels.attention import AttentionMetadata, TorchAttentionBackend  # noqa: E402
from leanserve.kernels.triton import (dequantize_int4, int4_matmul, int8_matmul, lean_attention_decode,  # noqa: E402
                                      merge_lean_partials, pack_int4, plan_lean_tiles, prefill_attention,
                                      quantize_int4, quantize_int8, unpack_int4)
from leanserve.kernels.triton import lean_attention as lean_module  # noqa: E402
from leanserve.kernels.triton_backend import TritonAttentionBackend  # noqa: E402

if not type(lean_module._lean_decode_kernel).__name__.startswith("Interpreted"):
    pytest.skip("Triton kernels were defined before TRITON_INTERPRET=1 was set (compiled mode, no GPU here)",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference(q, keys, values, scale=None):
    """q [n, H, D] are the last n of keys' m positions; causal softmax attention in float64."""
    n, num_heads, d = q.shape
    m, num_kv = keys.shape[:2]
    group = num_heads // num_kv
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scale = 1 / math.sqrt(d) if scale is None else scale
    scores = torch.einsum("nhd,mhd->hnm", q.double(), k) * scale
    visible = torch.arange(m)[None, :] <= torch.arange(m - n, m)[:, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v)


def relative_error(got, expected):
    return ((got.double() - expected).abs().max() / expected.abs().max()).item()


def paged_cache(context_lens, block_size, num_kv, d, dtype, spare_blocks=3, seed=0):
    """A cache holding each sequence's keys and values in shuffled blocks; returns the cache, the padded
    int32 block table and each sequence's keys and values in order."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(needed) + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, num_kv, d, generator=g).to(dtype)
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(n)] for n in needed]
    width = max(needed)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    keys, values = [], []
    for c, t in zip(context_lens, tables):
        pos = torch.arange(c)
        slots = torch.tensor(t)[pos // block_size] * block_size + pos % block_size
        keys.append(k_cache.view(-1, num_kv, d)[slots])
        values.append(v_cache.view(-1, num_kv, d)[slots])
    return k_cache, v_cache, block_tables, tables, keys, values


# ---------------------------------------------------------------- stream-K planner

def _check_plan(context_lens, num_kv, tile, workers):
    plan = plan_lean_tiles(context_lens, num_kv, tile, workers)
    seg = plan.segments.long()
    # Tiles of each worker: ranges equal up to one, contiguous, in order, covering every tile.
    bounds = plan.worker_tiles
    sizes = bounds[1:] - bounds[:-1]
    total = sum(-(-c // tile) for c in context_lens) * num_kv
    assert bounds[0] == 0 and bounds[-1] == total
    assert int(sizes.max()) - int(sizes.min()) <= 1
    seg_tiles = (seg[:, 3] - seg[:, 2] + tile - 1) // tile
    for w in range(workers):
        lo, hi = int(plan.worker_ptr[w]), int(plan.worker_ptr[w + 1])
        assert int(seg_tiles[lo:hi].sum()) == int(sizes[w])
    # Every unit's tokens covered exactly once, in order, by its own slots; segments start on tile boundaries.
    for seq, ctx in enumerate(context_lens):
        for head in range(num_kv):
            u = seq * num_kv + head
            lo, hi = int(plan.unit_ptr[u]), int(plan.unit_ptr[u + 1])
            mine = seg[lo:hi]
            assert (mine[:, 0] == seq).all() and (mine[:, 1] == head).all()
            assert int(mine[0, 2]) == 0 and int(mine[-1, 3]) == ctx
            assert torch.equal(mine[1:, 2], mine[:-1, 3])
            assert (mine[:, 2] % tile == 0).all() and (mine[:, 3] > mine[:, 2]).all()
    assert int(plan.unit_ptr[-1]) == plan.num_segments == int(plan.worker_ptr[-1])
    return plan


def test_planner_splits_at_head_boundaries():
    # Units (seq, head) have 1, 1, 3, 3 tiles; 8 tiles over 5 workers: 1, 2, 1, 2, 2.
    plan = _check_plan([5, 40], num_kv=2, tile=16, workers=5)
    assert plan.segments.tolist() == [
        [0, 0, 0, 5],                    # worker 0
        [0, 1, 0, 5], [1, 0, 0, 16],     # worker 1: end of one head, start of the next
        [1, 0, 16, 32],                  # worker 2
        [1, 0, 32, 40], [1, 1, 0, 16],   # worker 3
        [1, 1, 16, 40],                  # worker 4
    ]
    assert plan.worker_ptr.tolist() == [0, 1, 3, 4, 6, 7]
    assert plan.unit_ptr.tolist() == [0, 1, 2, 5, 7]


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 13, 100])
def test_planner_covers_every_tile_once(workers):
    rng = random.Random(workers)
    for _ in range(5):
        contexts = [rng.choice([1, 2, 15, 16, 17, 31, 64, 100, 257]) for _ in range(rng.randint(1, 6))]
        for num_kv, tile in [(1, 16), (3, 32), (2, 64)]:
            plan = _check_plan(contexts, num_kv, tile, workers)
            if workers > plan.worker_tiles[-1]:               # more workers than tiles: some own nothing
                assert (plan.worker_ptr[1:] == plan.worker_ptr[:-1]).any()


# ---------------------------------------------------------------- lean decode

DECODE_CONTEXTS = [1, 7, 16, 33, 100, 2]    # one token, odd lengths, one spanning many blocks


@pytest.mark.parametrize("block_size,num_kv,group,d,tile,workers", [
    (16, 2, 1, 64, 16, 1),
    (16, 3, 3, 64, 32, 7),
    (32, 1, 8, 128, 32, 3),
    (16, 2, 8, 64, 64, 5),
    (32, 3, 1, 128, 64, 1000),     # more workers than tiles
    (16, 1, 3, 48, 16, 4),         # head dim not a power of two
])
def test_lean_decode_float32(block_size, num_kv, group, d, tile, workers):
    k_cache, v_cache, tables, _, keys, values = paged_cache(DECODE_CONTEXTS, block_size, num_kv, d, torch.float32)
    q = torch.randn(len(DECODE_CONTEXTS), num_kv * group, d)
    ctx = torch.tensor(DECODE_CONTEXTS, dtype=torch.int32)
    out = lean_attention_decode(q, k_cache, v_cache, tables, ctx, num_workers=workers, tile_size=tile)
    for i in range(len(DECODE_CONTEXTS)):
        expected = reference(q[i:i + 1], keys[i], values[i])[0]
        assert relative_error(out[i], expected) < 1e-5, f"sequence {i} (context {DECODE_CONTEXTS[i]})"


def test_lean_decode_bfloat16_and_scale():
    contexts = [3, 50, 1, 77]
    k_cache, v_cache, tables, _, keys, values = paged_cache(contexts, 16, 2, 64, torch.bfloat16)
    q = torch.randn(len(contexts), 6, 64).bfloat16()
    out = lean_attention_decode(q, k_cache, v_cache, tables, torch.tensor(contexts, dtype=torch.int32), 0.3,
                                num_workers=3, tile_size=32)
    assert out.dtype == torch.bfloat16
    for i in range(len(contexts)):
        expected = reference(q[i:i + 1], keys[i], values[i], scale=0.3)[0]
        assert relative_error(out[i], expected) < 2e-2


def test_merge_gives_empty_segments_no_weight():
    group, d = 2, 16
    lse = torch.tensor([[0.5, -1.0], [float("-inf"), float("-inf")], [2.0, 0.0],     # unit 0: one empty segment
                        [float("-inf"), float("-inf")]])                             # unit 1: nothing at all
    o = torch.randn(4, group, d)
    o[1] = o[3] = 0
    out = torch.full((2, group, d), 9.0)
    merge_lean_partials(o, lse, torch.tensor([0, 3, 4], dtype=torch.int32), out)
    weight = torch.softmax(lse[[0, 2]].double(), dim=0)                                # exp(lse_j - L)
    expected = (weight[..., None] * o[[0, 2]].double()).sum(0)
    assert relative_error(out[0], expected) < 1e-6
    assert (out[1] == 0).all()


# ---------------------------------------------------------------- varlen prefill

# (tokens already cached, new tokens): fresh prompts, prompts after a prefix hit, chunk continuations.
PREFILL_SHAPES = [(0, 37), (20, 9), (0, 2), (5, 2), (64, 33), (16, 16)]


def _prefill_batch(shapes, block_size, num_kv, group, d, dtype):
    contexts = [c + n for c, n in shapes]
    k_cache, v_cache, tables, _, keys, values = paged_cache(contexts, block_size, num_kv, d, dtype, seed=1)
    q_lens = [n for _, n in shapes]
    starts = [sum(q_lens[:i]) for i in range(len(shapes))]
    q = torch.randn(sum(q_lens), num_kv * group, d).to(dtype)
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32)   # noqa: E731
    return q, k_cache, v_cache, tables, as_int(starts), as_int(q_lens), as_int(contexts), keys, values


@pytest.mark.parametrize("block_size,num_kv,group,d,block_m", [
    (16, 2, 3, 64, 16),
    (32, 1, 8, 128, 32),
    (16, 3, 1, 64, 32),
])
def test_prefill_float32(block_size, num_kv, group, d, block_m):
    q, k_cache, v_cache, tables, starts, q_lens, contexts, keys, values = _prefill_batch(
        PREFILL_SHAPES, block_size, num_kv, group, d, torch.float32)
    out = prefill_attention(q, k_cache, v_cache, tables, starts, q_lens, contexts, block_m=block_m)
    for i, (s, n) in enumerate(zip(starts.tolist(), q_lens.tolist())):
        expected = reference(q[s:s + n], keys[i], values[i])
        assert relative_error(out[s:s + n], expected) < 1e-5, f"sequence {i} {PREFILL_SHAPES[i]}"


def test_prefill_bfloat16_leaves_other_rows_alone():
    shapes = [(0, 19), (40, 5)]
    q, k_cache, v_cache, tables, starts, q_lens, contexts, keys, values = _prefill_batch(
        shapes, 16, 2, 2, 64, torch.bfloat16)
    # Sequences need not be contiguous in the flat batch: put a foreign row between them.
    q = torch.cat([q[:19], torch.randn(1, 4, 64).bfloat16(), q[19:]])
    starts = torch.tensor([0, 20], dtype=torch.int32)
    out = torch.full_like(q, 7.0)
    prefill_attention(q, k_cache, v_cache, tables, starts, q_lens, contexts, out=out)
    assert (out[19] == 7.0).all()
    for i, (s, n) in enumerate(zip(starts.tolist(), q_lens.tolist())):
        assert relative_error(out[s:s + n], reference(q[s:s + n], keys[i], values[i])) < 2e-2


# ---------------------------------------------------------------- dequantizing matmuls

def test_int4_packing_format():
    q = torch.tensor([[1, 2, 15, 0], [8, 9, 3, 4]], dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.tolist() == [[0x21, 0x0F], [0x98, 0x43]]           # low nibble first
    assert torch.equal(unpack_int4(packed), q)
    scales = torch.tensor([[0.5, 2.0], [1.0, 0.25]])
    zeros = torch.tensor([[1.0, 0.0], [-1.0, 3.0]])
    w = dequantize_int4(packed, scales, zeros, group_size=2)
    assert w.tolist() == [[(1 - 8) * 0.5 + 1, (2 - 8) * 0.5 + 1, (15 - 8) * 2.0, (0 - 8) * 2.0],
                          [(8 - 8) * 1.0 - 1, (9 - 8) * 1.0 - 1, (3 - 8) * 0.25 + 3, (4 - 8) * 0.25 + 3]]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("m", [1, 37])
def test_int8_matmul(dtype, tol, m):
    n, k = 80, 200                          # neither a multiple of the tile: masked edges
    w_q, scales = quantize_int8(torch.randn(n, k))
    x = torch.randn(m, k).to(dtype)
    y = int8_matmul(x, w_q, scales)
    assert y.shape == (m, n) and y.dtype == dtype
    expected = x.double() @ (w_q.double() * scales.double()[:, None]).T
    assert relative_error(y, expected) < tol


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_int4_matmul(group, dtype, tol):
    n, k = 72, 256
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    packed = pack_int4(q)
    scales = torch.rand(n, k // group) * 0.1 + 0.01
    zeros = torch.randn(n, k // group) * 0.1
    x = torch.randn(2, 3, k).to(dtype)                              # leading dims are flattened
    y = int4_matmul(x, packed, scales, zeros, group)
    assert y.shape == (2, 3, n) and y.dtype == dtype
    expected = x.double() @ dequantize_int4(packed, scales, zeros, group).double().T
    assert relative_error(y, expected) < tol


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_quantized_modules_route_through_triton_off_the_cpu(fmt):
    """What a quantized module runs on a GPU: its stored buffers, as they are, through the Triton matmul."""
    from leanserve.kernels.quant import Int4Linear, Int8Linear, use_triton_kernels

    use_triton_kernels()
    w = torch.randn(48, 128)
    module = Int4Linear.from_float(w, group_size=32) if fmt == "int4" else Int8Linear.from_float(w)
    x = torch.randn(5, 128)
    y = type(module).gpu_kernel(module, x)
    assert relative_error(y, x.double() @ module.dequantize().double().T) < 1e-5


def test_quantize_int4_round_trip():
    w = torch.randn(16, 128)
    packed, scales, zeros = quantize_int4(w, 32)
    err = (dequantize_int4(packed, scales, zeros, 32) - w).abs()
    assert (err <= scales.repeat_interleave(32, 1) / 2 + 1e-6).all()


# ---------------------------------------------------------------- backend end to end

@pytest.mark.parametrize("block_size,num_kv,group,num_kv_heads_given", [(16, 3, 3, True), (32, 2, 1, False)])
def test_backend_matches_torch_backend(block_size, num_kv, group, num_kv_heads_given):
    torch.manual_seed(0)
    d, num_blocks = 64, 60
    # (cached tokens before this step, new tokens): fresh prompts, a chunk after a prefix, decodes.
    shapes = [(0, 37), (0, 1), (20, 9), (5, 1), (63, 1), (1, 1), (130, 1), (0, 3)]
    free = torch.randperm(num_blocks).tolist()
    k_cache = torch.zeros(num_blocks, block_size, num_kv, d)
    v_cache = torch.zeros_like(k_cache)
    tables, full_k, full_v = [], [], []
    for cached, new in shapes:
        total = cached + new
        tables.append([free.pop() for _ in range(-(-total // block_size))])
        full_k.append(torch.randn(total, num_kv, d))
        full_v.append(torch.randn(total, num_kv, d))
        for p in range(cached):                       # earlier steps already wrote the prefix
            k_cache[tables[-1][p // block_size], p % block_size] = full_k[-1][p]
            v_cache[tables[-1][p // block_size], p % block_size] = full_v[-1][p]
    q_parts, k_parts, v_parts, slots, starts = [], [], [], [], []
    for (cached, new), table, fk, fv in zip(shapes, tables, full_k, full_v):
        starts.append(sum(p.shape[0] for p in q_parts))
        q_parts.append(torch.randn(new, num_kv * group, d))
        k_parts.append(fk[cached:])
        v_parts.append(fv[cached:])
        slots += [table[p // block_size] * block_size + p % block_size for p in range(cached, cached + new)]
    q, k, v = torch.cat(q_parts), torch.cat(k_parts), torch.cat(v_parts)

    def metadata():
        return AttentionMetadata(torch.tensor(slots), starts, [n for _, n in shapes], [c + n for c, n in shapes],
                                 tables, block_size)

    outs = []
    for backend in (TorchAttentionBackend(tile_size=32),
                    TritonAttentionBackend(num_workers=5, tile_size=32,
                                           num_kv_heads=num_kv if num_kv_heads_given else None)):
        md = metadata()
        backend.prepare(md)
        kc, vc = k_cache.clone(), v_cache.clone()
        outs.append(backend.forward(q, k, v, kc, vc, md))
        assert torch.equal(kc.view(-1, num_kv, d)[torch.tensor(slots)], k)     # new K/V landed in their slots
    torch_out, triton_out = outs
    for i, (qp, fk, fv) in enumerate(zip(q_parts, full_k, full_v)):
        rows = slice(starts[i], starts[i] + qp.shape[0])
        expected = reference(qp, fk, fv)
        assert relative_error(triton_out[rows], expected) < 1e-5, f"sequence {i} {shapes[i]}"
        assert relative_error(triton_out[rows], torch_out[rows].double()) < 1e-5



def test_engine_with_the_triton_backend_generates_what_the_torch_backend_does(tiny_hf_dir):
    from leanserve import LLM, SamplingParams

    prompts = [[5, 6, 7], list(range(100, 160)), [42]]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_hf_dir), kv_cache_tokens=1024, attention_backend=backend, max_num_batched_tokens=32)
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs["triton"] == outputs["torch"]
