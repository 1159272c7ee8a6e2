"""Batch invariance (`deterministic=True`): a request's tokens and log-probabilities are the same bits whatever
else is in its steps: alone or in a crowd, prefilled in one piece or in chunks of any size, its prompt computed
or read from the prefix cache (down to a last chunk of one token), preempted and recomputed under a tight cache.
On the native executor with quantized weights (the default model's int4), tiny model and default model."""
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leanserve import LLM, SamplingParams

MAX_TOKENS = 12


def prompt_pool(seed: int = 0) -> list[list[int]]:
    """Prompts of 1 to 150 tokens, many sharing prefixes (some 16 k + 1 long, so that a prefix-cache hit
    leaves a single token to compute)."""
    rng = random.Random(seed)
    stems = [[rng.randrange(100, 40000) for _ in range(n)] for n in (32, 64, 96)]
    pool = [[rng.randrange(100, 40000) for _ in range(n)] for n in (1, 7, 40, 150)]
    for stem in stems:
        pool += [stem + [rng.randrange(100, 40000) for _ in range(extra)] for extra in (1, 17, 30)]
    return pool


POOL = prompt_pool()


def params(i: int) -> SamplingParams:
    """Greedy for even pool entries, seeded sampling for odd ones; log-probs of the top 3 for all."""
    if i % 2:
        return SamplingParams(temperature=1.0, top_p=0.9, seed=1000 + i, max_tokens=MAX_TOKENS, ignore_eos=True,
                              logprobs=3)
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=3)


def outputs(llm: LLM, indices: list[int]) -> list[tuple]:
    results = llm.generate([POOL[i] for i in indices], [params(i) for i in indices], use_tqdm=False)
    return [(tuple(r.outputs[0].token_ids), tuple(r.outputs[0].logprobs)) for r in results]


@pytest.fixture(scope="module")
def engines(tiny_hf_dir):
    """Per model: what each pool prompt gives alone (one sequence at a time, nothing cached before it)."""
    def make(model: str, **kwargs) -> LLM:
        return LLM(model, quantization="int4", deterministic=True, **kwargs)

    models = {"tiny": str(tiny_hf_dir), "smollm2": "smollm2"}
    alone = {}
    for name, model in models.items():
        reference = make(model, kv_cache_tokens=8192, max_num_seqs=1, enable_prefix_caching=False)
        assert reference.engine.kernels["executor"].startswith("native")
        alone[name] = [outputs(reference, [i])[0] for i in range(len(POOL))]
    return make, models, alone


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=st.sampled_from(["tiny", "smollm2"]),
       mix=st.lists(st.integers(0, len(POOL) - 1), min_size=1, max_size=10),
       warm=st.lists(st.integers(0, len(POOL) - 1), max_size=4),
       budget=st.sampled_from([3, 16, 33, 2048]),
       kv_tokens=st.sampled_from([192, 320, 8192]))
def test_same_bits_in_any_batch(engines, model, mix, warm, budget, kv_tokens):
    make, models, alone = engines
    llm = make(models[model], max_num_batched_tokens=budget, kv_cache_tokens=kv_tokens, max_num_seqs=8)
    if warm:
        outputs(llm, warm)                     # fills the prefix cache with these prompts' blocks
    got = outputs(llm, mix)
    for i, result in zip(mix, got):
        assert result == alone[model][i], f"pool prompt {i} ({len(POOL[i])} tokens) differs from its run alone"


def test_a_mix_that_preempts_still_matches(engines):
    """The property test's worst case, spelled out: a cache too small for all at once."""
    make, models, alone = engines
    llm = make(models["smollm2"], max_num_batched_tokens=64, kv_cache_tokens=256, max_num_seqs=8)
    mix = list(range(len(POOL)))
    assert outputs(llm, mix) == [alone["smollm2"][i] for i in mix]
    assert llm.engine.scheduler.num_preemptions > 0
