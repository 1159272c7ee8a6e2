"""Torch attention backend on a paged cache against a float64 per-sequence reference (the native
kernels' tests: test_native_kernels.py)."""
import pytest
import torch

from leanserve.kernels.attention import AttentionOptions, TorchAttentionBackend
from tests.attention_cases import HEAD_DIM, MIXED_SHAPES, OPTION_CASES, ragged_batch, relative_error


@pytest.mark.parametrize("cache_dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("block_size,num_kv,group,tile", [(16, 3, 3, 128), (4, 2, 1, 8), (8, 1, 8, 16), (8, 2, 5, 16)])
def test_mixed_batch_matches_reference(block_size, num_kv, group, tile, cache_dtype, tolerance):
    """float32 queries over a float32 or float16 cache (the reference: float64 on unrounded keys)."""
    # (cached tokens before this step, new tokens): fresh prompts, a chunk after a prefix, decodes.
    shapes = [(0, 37), (0, 1), (20, 9), (5, 1), (63, 1), (1, 1), (130, 1), (0, 3)]
    batch = ragged_batch(shapes, block_size, num_kv, group, 32, num_blocks=200, cache_dtype=cache_dtype)
    md = batch.metadata()
    backend = TorchAttentionBackend(tile_size=tile)
    backend.prepare(md)
    out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, md)
    for i in range(len(shapes)):
        assert relative_error(out[batch.rows(i)], batch.expected(i)) < tolerance, f"sequence {i} {shapes[i]}"
    # Every new token's keys and values landed in its own slot.
    flat_k = batch.k_cache.view(-1, num_kv, 32)
    assert torch.equal(flat_k[torch.tensor(batch.slots)], batch.k.to(cache_dtype))


DECODE_ONLY = [(99, 1), (4, 1), (0, 1), (40, 1), (7, 1)]


@pytest.mark.parametrize("shapes", [MIXED_SHAPES, DECODE_ONLY], ids=["mixed", "decode_only"])
@pytest.mark.parametrize("block_size,num_kv,group,tile", [(8, 2, 3, 16), (4, 1, 4, 8), (16, 3, 1, 128)])
@pytest.mark.parametrize("case", OPTION_CASES)
def test_options_match_reference(case, block_size, num_kv, group, tile, shapes):
    """Scale, soft-cap and sliding window on prefill segments, chunks and decode tiles (tile 128: one
    tile a decode sequence, nothing to merge); and each option changes the result."""
    options = OPTION_CASES[case]
    batch = ragged_batch(shapes, block_size, num_kv, group, HEAD_DIM)
    md = batch.metadata()
    backend = TorchAttentionBackend(tile_size=tile)
    backend.prepare(md)
    out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, md, options)
    changed = 0.0
    for i in range(len(shapes)):
        got = out[batch.rows(i)]
        assert relative_error(got, batch.expected(i, options)) < 1e-5, f"sequence {i} {shapes[i]}"
        changed = max(changed, relative_error(got, batch.expected(i)))
    assert changed > 1e-3, "the options made no difference: the test would not see them ignored"


def test_default_options_are_the_plain_attention():
    batch = ragged_batch(MIXED_SHAPES, 8, 2, 3, HEAD_DIM)
    outs = []
    for options in (None, AttentionOptions(scale=HEAD_DIM ** -0.5), AttentionOptions(HEAD_DIM ** -0.5, 1000)):
        md = batch.metadata()
        backend = TorchAttentionBackend(tile_size=16)
        backend.prepare(md)
        outs.append(backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, md, options))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])   # a window longer than every context
    for i in range(len(MIXED_SHAPES)):
        assert relative_error(outs[0][batch.rows(i)], batch.expected(i)) < 1e-5


def test_layers_with_different_options_share_one_prepare():
    """Gemma 3's pattern in one step: windowed and global layers, one `prepare`, one plan per window."""
    batch = ragged_batch(MIXED_SHAPES, 8, 2, 3, HEAD_DIM)
    md = batch.metadata()
    backend = TorchAttentionBackend(tile_size=16)
    backend.prepare(md)
    layers = [OPTION_CASES["window5"], OPTION_CASES["window5_softcap2"], OPTION_CASES["softcap2"],
              OPTION_CASES["window24"], AttentionOptions(scale=HEAD_DIM ** -0.5, sliding_window=1000),
              OPTION_CASES["window5"]]
    plans = {}
    for options in layers:
        out = backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, md, options)
        for i in range(len(MIXED_SHAPES)):
            assert relative_error(out[batch.rows(i)], batch.expected(i, options)) < 1e-5, (options, i)
        plans.setdefault(options.sliding_window, md.plans.get(options.sliding_window))
    # Window 1000 is longer than every context: it shares the whole-context plan.
    assert set(md.plans) == {5, None, 24}
    assert md.plans[5] is plans[5] and md.plans[24] is plans[24]      # built once, reused by later layers
    backend.prepare(md)                                                 # the next step starts afresh
    assert set(md.plans) == {None} and md.plans[None] is not plans[None]


def test_windowed_plan_reads_only_the_window():
    block_size, tile, window = 8, 16, 5
    batch = ragged_batch(MIXED_SHAPES, block_size, 2, 3, HEAD_DIM)
    md = batch.metadata()
    backend = TorchAttentionBackend(tile_size=tile)
    backend.prepare(md)
    backend.forward(batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, md,
                    AttentionOptions(scale=0.2, sliding_window=window))
    whole, windowed = backend._plan(md, None), md.plans[window]
    decode_ctx = torch.tensor([c + n for c, n in MIXED_SHAPES if n == 1 and c > 0])
    # Decode: tiles of 2 blocks from the block holding position ctx - window; none wholly before it.
    key_start = (decode_ctx - window).clamp(min=0)
    blocks = (decode_ctx + block_size - 1) // block_size - key_start // block_size
    assert windowed.decode.tile_seq.bincount().tolist() == ((blocks + 1) // 2).tolist()
    assert whole.decode.tile_seq.bincount().tolist() == (((decode_ctx + 7) // 8 + 1) // 2).tolist()
    assert windowed.decode.tile_seq.numel() < whole.decode.tile_seq.numel()
    visible = (windowed.decode.tile_mask == 0).sum(-1).view(-1)
    assert visible.min() >= 1                                         # every tile holds a key the token sees
    assert torch.zeros(len(decode_ctx), dtype=torch.long).index_add_(
        0, windowed.decode.tile_seq, visible).tolist() == decode_ctx.clamp(max=window).tolist()
    # Prefill: keys from the first row's window edge on.
    for seg in windowed.prefill:
        cached, new = next(s for s, start in zip(MIXED_SHAPES, batch.starts) if start == seg.start)
        assert seg.key_start == max(0, cached - window + 1)
        if cached:
            assert seg.slots.numel() == cached + new - seg.key_start
        if seg.mask is None:                                          # a fresh prompt the window doesn't cut
            assert cached == 0 and new <= window
            continue
        assert seg.mask.shape == (new, cached + new - seg.key_start)
        assert (seg.mask.sum(-1) == torch.clamp(torch.arange(cached + 1, cached + new + 1), max=window)).all()


@pytest.mark.parametrize("kwargs", [{"scale": 0.0}, {"scale": 1.0, "sliding_window": 0},
                                    {"scale": 1.0, "softcap": -1.0}, {"scale": 1.0, "sliding_window": 2.5}])
def test_options_are_validated(kwargs):
    with pytest.raises(ValueError):
        AttentionOptions(**kwargs)
