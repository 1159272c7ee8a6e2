"""Triton kernels under the CPU interpreter against float64 torch references, on small ragged batches."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")    # before the kernels are defined: triton.jit reads it then

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from leanserve.kernels.attention import AttentionOptions, TorchAttentionBackend  # noqa: E402
from leanserve.kernels.triton import (dequantize_int4, int4_matmul, int8_matmul, lean_attention_decode,  # noqa: E402
                                      merge_lean_partials, pack_int4, plan_lean_tiles, prefill_attention,
                                      quantize_int4, quantize_int8, unpack_int4)
from leanserve.kernels.triton import lean_attention as lean_module  # noqa: E402
from leanserve.kernels.triton_backend import TritonAttentionBackend  # noqa: E402
from tests.attention_cases import (HEAD_DIM, MIXED_SHAPES, OPTION_CASES, attention_reference,  # noqa: E402
                                   ragged_batch, relative_error)

if not type(lean_module._lean_decode_kernel).__name__.startswith("Interpreted"):
    pytest.skip("Triton kernels were defined before TRITON_INTERPRET=1 was set (compiled mode, no GPU here)",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference(q, keys, values, scale=None):
    """q [n, H, D] are the last n of keys' m positions; causal softmax attention in float64."""
    return attention_reference(q, keys, values, None if scale is None else AttentionOptions(scale))


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

def _check_plan(context_lens, num_kv, tile, workers, window=None):
    plan = plan_lean_tiles(context_lens, num_kv, tile, workers, window)
    seg = plan.segments.long()
    # A windowed plan covers only each context's last `window` tokens.
    starts = [0 if window is None else max(0, c - window) for c in context_lens]
    # Tiles of each worker: ranges equal up to one, contiguous, in order, covering every tile.
    bounds = plan.worker_tiles
    sizes = bounds[1:] - bounds[:-1]
    total = sum(-(-(c - s) // tile) for c, s in zip(context_lens, starts)) * num_kv
    assert bounds[0] == 0 and bounds[-1] == total
    assert int(sizes.max()) - int(sizes.min()) <= 1
    seg_tiles = (seg[:, 3] - seg[:, 2] + tile - 1) // tile
    for w in range(workers):
        lo, hi = int(plan.worker_ptr[w]), int(plan.worker_ptr[w + 1])
        assert int(seg_tiles[lo:hi].sum()) == int(sizes[w])
    # Every unit's tokens covered exactly once, in order, by its own slots; segments start on tile boundaries.
    for seq, (ctx, start) in enumerate(zip(context_lens, starts)):
        for head in range(num_kv):
            u = seq * num_kv + head
            lo, hi = int(plan.unit_ptr[u]), int(plan.unit_ptr[u + 1])
            mine = seg[lo:hi]
            assert (mine[:, 0] == seq).all() and (mine[:, 1] == head).all()
            assert int(mine[0, 2]) == start and int(mine[-1, 3]) == ctx
            assert torch.equal(mine[1:, 2], mine[:-1, 3])
            assert ((mine[:, 2] - start) % tile == 0).all() and (mine[:, 3] > mine[:, 2]).all()
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
            for window in (1, 5, 40):
                _check_plan(contexts, num_kv, tile, workers, window)


def test_windowed_plan_tiles_only_the_window():
    plan = _check_plan([5, 40, 100], num_kv=1, tile=16, workers=2, window=20)
    assert plan.window == 20
    # Tiles from each window's edge: 1, 2 and 2 of them; 5 tiles over 2 workers: 2 and 3.
    assert plan.segments.tolist() == [[0, 0, 0, 5], [1, 0, 20, 36],       # worker 0
                                      [1, 0, 36, 40], [2, 0, 80, 100]]    # worker 1


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


# ---------------------------------------------------------------- per-layer options

KERNEL_OPTIONS = ["scale", "window5", "window24", "softcap50", "softcap2", "window5_softcap2", "window1"]


def _assert_options_matter(outs, expecteds, defaults):
    """Matches the reference under the options, and differs from plain attention: the test sees them."""
    changed = 0.0
    for i, (got, expected, default) in enumerate(zip(outs, expecteds, defaults)):
        assert relative_error(got, expected) < 1e-5, f"sequence {i}"
        changed = max(changed, relative_error(got, default))
    assert changed > 1e-3


@pytest.mark.parametrize("case", KERNEL_OPTIONS)
@pytest.mark.parametrize("block_size,num_kv,group,tile,workers", [(16, 2, 3, 16, 5), (8, 1, 4, 32, 3)])
def test_lean_decode_options(case, block_size, num_kv, group, tile, workers):
    options = OPTION_CASES[case]
    k_cache, v_cache, tables, _, keys, values = paged_cache(DECODE_CONTEXTS, block_size, num_kv, HEAD_DIM,
                                                            torch.float32)
    q = torch.randn(len(DECODE_CONTEXTS), num_kv * group, HEAD_DIM)
    out = lean_attention_decode(q, k_cache, v_cache, tables, torch.tensor(DECODE_CONTEXTS, dtype=torch.int32),
                                options.scale, window=options.sliding_window, softcap=options.softcap,
                                num_workers=workers, tile_size=tile)
    _assert_options_matter(
        out, [attention_reference(q[i:i + 1], keys[i], values[i], options)[0] for i in range(len(q))],
        [attention_reference(q[i:i + 1], keys[i], values[i])[0] for i in range(len(q))])


def test_lean_decode_rejects_a_plan_for_another_window():
    k_cache, v_cache, tables, _, _, _ = paged_cache([10, 20], 16, 1, HEAD_DIM, torch.float32)
    plan = plan_lean_tiles([10, 20], 1, 16, 2, window=8)
    with pytest.raises(ValueError, match="window"):
        lean_attention_decode(torch.randn(2, 1, HEAD_DIM), k_cache, v_cache, tables,
                              torch.tensor([10, 20], dtype=torch.int32), plan=plan)


@pytest.mark.parametrize("case", KERNEL_OPTIONS)
@pytest.mark.parametrize("block_size,num_kv,group,block_m", [
    (16, 2, 3, 16),
    (8, 1, 4, 64),     # query blocks taller than key tiles: rows whose window starts past the first tile
])
def test_prefill_options(case, block_size, num_kv, group, block_m):
    options = OPTION_CASES[case]
    q, k_cache, v_cache, tables, starts, q_lens, contexts, keys, values = _prefill_batch(
        PREFILL_SHAPES, block_size, num_kv, group, HEAD_DIM, torch.float32)
    out = prefill_attention(q, k_cache, v_cache, tables, starts, q_lens, contexts, options.scale,
                            window=options.sliding_window, softcap=options.softcap, block_m=block_m)
    rows = [slice(s, s + n) for s, n in zip(starts.tolist(), q_lens.tolist())]
    _assert_options_matter([out[r] for r in rows],
                           [attention_reference(q[r], keys[i], values[i], options) for i, r in enumerate(rows)],
                           [attention_reference(q[r], keys[i], values[i]) for i, r in enumerate(rows)])


def test_options_in_bfloat16():
    options = OPTION_CASES["window5_softcap2"]
    contexts = [3, 50, 1, 77]
    k_cache, v_cache, tables, _, keys, values = paged_cache(contexts, 16, 2, 64, torch.bfloat16)
    q = torch.randn(len(contexts), 6, 64).bfloat16()
    out = lean_attention_decode(q, k_cache, v_cache, tables, torch.tensor(contexts, dtype=torch.int32),
                                options.scale, window=5, softcap=2.0, num_workers=3, tile_size=32)
    for i in range(len(contexts)):
        assert relative_error(out[i], attention_reference(q[i:i + 1], keys[i], values[i], options)[0]) < 2e-2
    q, k_cache, v_cache, tables, starts, q_lens, contexts, keys, values = _prefill_batch(
        [(0, 19), (40, 5)], 16, 2, 2, 64, torch.bfloat16)
    out = prefill_attention(q, k_cache, v_cache, tables, starts, q_lens, contexts, options.scale,
                            window=5, softcap=2.0)
    for i, (s, n) in enumerate(zip(starts.tolist(), q_lens.tolist())):
        assert relative_error(out[s:s + n], attention_reference(q[s:s + n], keys[i], values[i], options)) < 2e-2


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
    # (cached tokens before this step, new tokens): fresh prompts, a chunk after a prefix, decodes.
    shapes = [(0, 37), (0, 1), (20, 9), (5, 1), (63, 1), (1, 1), (130, 1), (0, 3)]
    batch = ragged_batch(shapes, block_size, num_kv, group, 64, num_blocks=60)
    outs = []
    for backend in (TorchAttentionBackend(tile_size=32),
                    TritonAttentionBackend(num_workers=5, tile_size=32,
                                           num_kv_heads=num_kv if num_kv_heads_given else None)):
        md = batch.metadata()
        backend.prepare(md)
        kc, vc = batch.k_cache.clone(), batch.v_cache.clone()
        outs.append(backend.forward(batch.q, batch.k, batch.v, kc, vc, md))
        assert torch.equal(kc.view(-1, num_kv, 64)[torch.tensor(batch.slots)], batch.k)   # new K/V in their slots
    torch_out, triton_out = outs
    for i in range(len(shapes)):
        rows = batch.rows(i)
        assert relative_error(triton_out[rows], batch.expected(i)) < 1e-5, f"sequence {i} {shapes[i]}"
        assert relative_error(triton_out[rows], torch_out[rows].double()) < 1e-5


def test_backends_under_per_layer_options():
    """Layers of one step with different options (Gemma 3's windowed and global layers, Gemma 2's
    soft-cap) after one `prepare`: both backends match the reference; one stream-K plan per window."""
    batch = ragged_batch(MIXED_SHAPES, 8, 2, 3, HEAD_DIM)
    layers = [OPTION_CASES["window5_softcap2"], OPTION_CASES["softcap50"], OPTION_CASES["window24"],
              AttentionOptions(scale=HEAD_DIM ** -0.5, sliding_window=1000), OPTION_CASES["window5_softcap2"]]
    for backend in (TorchAttentionBackend(tile_size=16),
                    TritonAttentionBackend(num_workers=4, tile_size=16, num_kv_heads=2)):
        md = batch.metadata()
        backend.prepare(md)
        for options in layers:
            out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, md, options)
            for i in range(len(MIXED_SHAPES)):
                assert relative_error(out[batch.rows(i)], batch.expected(i, options)) < 1e-5, (backend, options, i)
    # Window 1000 outlasts every context: it runs on the whole-context plan built in prepare.
    assert set(md.triton_decode.plans) == {(2, None), (2, 5), (2, 24)}


def test_engine_with_the_triton_backend_generates_what_the_torch_backend_does(tiny_hf_dir):
    from leanserve import LLM, SamplingParams

    prompts = [[5, 6, 7], list(range(100, 160)), [42]]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_hf_dir), kv_cache_tokens=1024, attention_backend=backend, max_num_batched_tokens=32)
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs["triton"] == outputs["torch"]
