"""The engine on a tiny random Llama: parity with transformers, batching invariance, stop rules, n, seeds;
the native executor against the torch model on every family."""
import pytest
import torch

from leanserve import LLM, SamplingParams
from leanserve.engine.engine_config import EngineConfig
from tests.conftest import LEVELS
from tests.tiny_models import FAMILY_CONFIGS, make_tiny_family_hf

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def random_prompts(count: int, seed: int = 0, max_len: int = 300) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 2, 17, max_len] + torch.randint(3, max_len, (count - 4,), generator=g).tolist()
    return [torch.randint(3, 49152, (n,), generator=g).tolist() for n in lengths[:count]]


def token_ids(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def tiny_llm(tiny_hf_dir):
    return LLM(str(tiny_hf_dir), kv_cache_tokens=8192)


@pytest.fixture(scope="module")
def tiny_reference(tiny_llm):
    prompts = random_prompts(10)
    return prompts, token_ids(tiny_llm.generate(prompts, GREEDY, use_tqdm=False))


def test_tiny_model_matches_transformers(tiny_hf_dir, tiny_reference):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()
    prompts, ours = tiny_reference
    for prompt, got in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist(), f"prompt of {len(prompt)} tokens"


def test_gguf_copy_of_tiny_model_generates_the_same(tiny_gguf_path, tiny_reference):
    prompts, expected = tiny_reference
    llm = LLM(str(tiny_gguf_path), kv_cache_tokens=8192)
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected


@pytest.mark.parametrize("backend", ["auto", "torch"], ids=["native-executor", "torch-model"])
def test_chunked_prefill_small_blocks_and_preemption_keep_outputs(tiny_hf_dir, tiny_reference, backend):
    """On both executors: steps whose chunks sample no row, prompts cut across blocks of 4, preemptions."""
    prompts, expected = tiny_reference
    # 320 cache tokens hold the longest request alone, far from all ten at once.
    llm = LLM(str(tiny_hf_dir), block_size=4, max_num_batched_tokens=40, kv_cache_tokens=320, max_num_seqs=6,
              attention_backend=backend)
    assert token_ids(llm.generate(prompts, GREEDY, use_tqdm=False)) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_bfloat16_logits_stay_close_to_float32(tiny_hf_dir, tiny_llm):
    bf16 = LLM(str(tiny_hf_dir), dtype="bfloat16", kv_cache_tokens=1024)
    prompt = random_prompts(4)[3]
    ask = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
    full = tiny_llm.generate([prompt], ask, use_tqdm=False)[0].outputs[0].logprobs[0]
    half = bf16.generate([prompt], ask, use_tqdm=False)[0].outputs[0].logprobs[0]
    assert abs(full.logprob - dict(half.top).get(full.token_id, -99.0)) < 0.1


def test_kv_cache_dtype_defaults_and_refusals(tiny_llm):
    assert tiny_llm.engine.runner.k_cache.dtype == torch.float16          # float32 model on the CPU
    assert EngineConfig(dtype="bfloat16").kv_cache_torch_dtype == torch.bfloat16
    assert EngineConfig(kv_cache_dtype="float32").kv_cache_torch_dtype == torch.float32
    assert EngineConfig(attention_backend="triton").kv_cache_torch_dtype == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype must be"):
        EngineConfig(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="CPU .torch. attention backend"):
        EngineConfig(kv_cache_dtype="float16", attention_backend="triton")


@pytest.fixture(scope="module")
def torch_reference_runs(tiny_hf_dir):
    """The torch model (attention_backend="torch": dequantized float32 weights, torch attention) on the tiny
    model and the default model, int4, with a float32 KV cache: what the native executor computes up to
    its 16-bit activations and its order of float32 sums."""
    prompts = random_prompts(5, max_len=200)
    runs = {}
    for model in ("tiny", "smollm2"):
        llm = LLM(str(tiny_hf_dir) if model == "tiny" else model, quantization="int4", kv_cache_tokens=4096,
                  kv_cache_dtype="float32", attention_backend="torch")
        assert llm.engine.kernels["executor"].startswith("torch")
        runs[model] = llm.generate(prompts, EXECUTOR_PARAMS, use_tqdm=False)
    return prompts, runs


EXECUTOR_PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=4)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_native_executor_matches_the_torch_model(tiny_hf_dir, torch_reference_runs, native_kernels_of, monkeypatch,
                                                 model, level):
    """Each ISA level's native executor (int4 blocks as stored, 16-bit activations, native attention)
    against the plain torch model on the exactly dequantized weights: greedy tokens equal, log-probs
    within 1e-2 (each linear is within ~1e-5 of float32; through the default model's 30 layers the
    hidden states drift by ~2e-4 relative, its logits by ~5e-3)."""
    native_kernels_of(level)
    monkeypatch.setenv("LEANSERVE_CPU_ISA", level)
    llm = LLM(str(tiny_hf_dir) if model == "tiny" else model, quantization="int4", kv_cache_tokens=4096,
              kv_cache_dtype="float32")
    assert llm.engine.kernels["executor"] == f"native ({level})"
    prompts, runs = torch_reference_runs
    native = llm.generate(prompts, EXECUTOR_PARAMS, use_tqdm=False)
    assert token_ids(native) == token_ids(runs[model])
    for ours, reference in zip(native, runs[model]):
        for got, expected in zip(ours.outputs[0].logprobs, reference.outputs[0].logprobs):
            assert got.logprob == pytest.approx(expected.logprob, abs=1e-2)
            assert dict(got.top) == pytest.approx(dict(expected.top), abs=1e-2)


def test_generate_takes_strings_and_ids_and_keeps_order(tiny_llm):
    text = "The quick brown fox"
    ids = tiny_llm.tokenizer.encode(text)
    outputs = tiny_llm.generate([ids, text, [5, 6, 7]], GREEDY, use_tqdm=False)
    assert outputs[0].prompt_token_ids == outputs[1].prompt_token_ids == ids
    assert outputs[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids
    assert outputs[1].prompt == text and outputs[2].prompt_token_ids == [5, 6, 7]
    single = tiny_llm.generate(text, GREEDY, use_tqdm=False)
    assert len(single) == 1 and single[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids


def test_max_tokens_ends_with_length(tiny_llm):
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    assert out.text == tiny_llm.tokenizer.decode(out.token_ids)


def test_stop_string_is_cut_from_text(tiny_llm):
    prompt = [11, 12, 13]
    free = tiny_llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    assert stop.strip(), free.text
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:free.text.index(stop)]
    kept = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop=stop,
                                                      include_stop_str_in_output=True, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    assert kept.text == free.text[:free.text.index(stop) + len(stop)]


def test_stop_token_ids_and_eos(tiny_llm):
    prompt = [21, 22, 23]
    free = tiny_llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    stop_token = free[4]
    first = free.index(stop_token)
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_token]),
                            use_tqdm=False)[0].outputs[0]
    assert out.token_ids == free[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_token

    engine = tiny_llm.engine
    saved = engine.tokenizer.eos_token_ids
    engine.tokenizer.eos_token_ids = frozenset({stop_token})   # make the model's 5th token its EOS
    try:
        stopped = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)
        ignored = tiny_llm.generate([prompt], GREEDY, use_tqdm=False)
        held = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, min_tokens=first + 3),
                                 use_tqdm=False)
    finally:
        engine.tokenizer.eos_token_ids = saved
    assert stopped[0].outputs[0].token_ids == free[:first + 1]
    assert stopped[0].outputs[0].finish_reason == "stop"
    assert ignored[0].outputs[0].token_ids == free
    held_ids = held[0].outputs[0].token_ids
    assert len(held_ids) >= first + 3 and stop_token not in held_ids[:first + 3]


def test_seeded_sampling_ignores_the_rest_of_the_batch_and_n_gives_distinct_samples(tiny_llm):
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=123, ignore_eos=True)
    prompt = [31, 32, 33]
    alone = token_ids(tiny_llm.generate([prompt], params, use_tqdm=False))[0]
    others = [SamplingParams(temperature=0.8, max_tokens=10, ignore_eos=True)] * 3
    batch = tiny_llm.generate([[1, 2], prompt, [3, 4, 5], [6] * 40], [others[0], params, *others[1:]],
                              use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, max_tokens=8, seed=124, ignore_eos=True)
    assert token_ids(tiny_llm.generate([prompt], other_seed, use_tqdm=False))[0] != alone

    n3 = SamplingParams(n=3, temperature=1.0, max_tokens=8, seed=7, ignore_eos=True)
    first = tiny_llm.generate([prompt], n3, use_tqdm=False)[0]
    again = tiny_llm.generate([prompt], n3, use_tqdm=False)[0]
    samples = [o.token_ids for o in first.outputs]
    assert [o.index for o in first.outputs] == [0, 1, 2] and len({tuple(s) for s in samples}) == 3
    assert samples == [o.token_ids for o in again.outputs]


def test_logprobs_come_with_top_alternatives(tiny_llm):
    out = tiny_llm.generate([[41, 42]], SamplingParams(temperature=0, max_tokens=4, logprobs=3),
                            use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and lp.rank == 1 and len(lp.top) == 3
        assert lp.top[0] == (token, pytest.approx(lp.logprob)) and lp.logprob <= 0
    assert tiny_llm.generate([[41, 42]], GREEDY, use_tqdm=False)[0].outputs[0].logprobs is None


def test_invalid_requests_raise_clear_errors(tiny_llm):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny_llm.generate([[5] * 100], SamplingParams(max_tokens=5000), use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        tiny_llm.generate([[5]], [GREEDY, GREEDY], use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not tiny_llm.engine.has_unfinished_requests()


def test_chat_applies_the_template(tiny_llm):
    conversation = [{"role": "user", "content": "Hi there"}]
    out = tiny_llm.chat(conversation, GREEDY, use_tqdm=False)[0]
    rendered = tiny_llm.tokenizer.apply_chat_template(conversation)
    assert rendered.endswith("<|im_start|>assistant\n") and "Hi there" in rendered
    assert out.prompt_token_ids == tiny_llm.tokenizer.encode(rendered, add_special_tokens=False)


# ---- the full scheduler on the model: prefix cache, preemption, priorities, continuous batching ----

def test_shared_prefix_is_computed_once_and_outputs_do_not_change(tiny_hf_dir):
    prefix = torch.randint(3, 49152, (1000,), generator=torch.Generator().manual_seed(5)).tolist()
    first, second = prefix + [101, 102, 103], prefix + [201, 202, 203, 204, 205]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    cached = LLM(str(tiny_hf_dir), kv_cache_tokens=4096)
    engine = cached.engine
    out_first = cached.generate([first], params, use_tqdm=False)[0].outputs[0].token_ids
    before = engine.scheduler.num_computed_tokens
    out_second = cached.generate([second], params, use_tqdm=False)[0].outputs[0].token_ids
    computed = engine.scheduler.num_computed_tokens - before
    hits = engine.block_manager.prefix_cache_hits
    assert hits == 1000 // 16 * 16                            # every full block of the shared prefix
    assert computed == len(second) - hits + params.max_tokens - 1
    uncached = LLM(str(tiny_hf_dir), kv_cache_tokens=4096, enable_prefix_caching=False)
    assert token_ids(uncached.generate([first, second], params, use_tqdm=False)) == [out_first, out_second]
    assert uncached.engine.block_manager.prefix_cache_hits == 0


def test_prefix_cache_eviction_under_pressure_keeps_outputs(tiny_hf_dir):
    g = torch.Generator().manual_seed(9)
    stems = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (120, 200, 64)]
    prompts = [stems[i % 3] + torch.randint(3, 49152, (5 + i,), generator=g).tolist() for i in range(18)]
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    expected = token_ids(LLM(str(tiny_hf_dir), kv_cache_tokens=8192, enable_prefix_caching=False)
                         .generate(prompts, params, use_tqdm=False))
    small = LLM(str(tiny_hf_dir), kv_cache_tokens=640, max_num_seqs=3, max_num_batched_tokens=96)
    got = []
    for i in range(0, len(prompts), 6):                       # waves: later waves hit what survived
        got += token_ids(small.generate(prompts[i:i + 6], params, use_tqdm=False))
    assert got == expected
    bm = small.engine.block_manager
    assert bm.prefix_cache_hits > 0 and bm.num_free_blocks == bm.num_blocks


def test_32_requests_in_a_cache_far_too_small_all_finish_as_with_a_large_one(tiny_hf_dir):
    prompts = random_prompts(32, seed=3, max_len=200)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    expected = token_ids(LLM(str(tiny_hf_dir), kv_cache_tokens=16384).generate(prompts, params, use_tqdm=False))
    small = LLM(str(tiny_hf_dir), kv_cache_tokens=240, block_size=8)
    assert token_ids(small.generate(prompts, params, use_tqdm=False)) == expected
    assert small.engine.scheduler.num_preemptions > 0


def test_continuous_batching_with_staggered_arrivals_equals_each_request_alone(tiny_hf_dir, tiny_llm):
    prompts = random_prompts(64, seed=11, max_len=400)
    g = torch.Generator().manual_seed(12)
    budgets = torch.randint(1, 24, (64,), generator=g).tolist()
    alone = [token_ids(tiny_llm.generate([p], SamplingParams(temperature=0, max_tokens=b, ignore_eos=True),
                                         use_tqdm=False))[0] for p, b in zip(prompts, budgets)]
    engine = LLM(str(tiny_hf_dir), kv_cache_tokens=4096, max_num_seqs=16, max_num_batched_tokens=256).engine
    results, next_prompt = {}, 0
    while len(results) < 64:
        for _ in range(3):                                     # three arrivals between steps
            if next_prompt < 64:
                engine.add_request(str(next_prompt), prompts[next_prompt],
                                   SamplingParams(temperature=0, max_tokens=budgets[next_prompt], ignore_eos=True))
                next_prompt += 1
        for out in engine.step():
            if out.finished:
                results[int(out.request_id)] = out.outputs[0].token_ids
        engine.scheduler.check_invariants()
    assert [results[i] for i in range(64)] == alone


def test_priority_and_abort_through_the_engine(tiny_hf_dir):
    llm = LLM(str(tiny_hf_dir), kv_cache_tokens=2048, max_num_seqs=1)
    finished = []
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for name, priority in [("low", 5), ("normal", 0), ("urgent", -3), ("dropped", 0)]:
        engine.add_request(name, [7, 8, 9], params, priority=priority)
    engine.abort_request("dropped")
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
        engine.scheduler.check_invariants()
    assert finished == ["urgent", "normal", "low"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_broken_invariant_is_logged_with_what_it_involves_when_the_engine_goes_idle(tiny_hf_dir, caplog):
    llm = LLM(str(tiny_hf_dir), kv_cache_tokens=2048)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    with caplog.at_level("ERROR", logger="leanserve.engine"):
        llm.generate([[7, 8, 9]], params, use_tqdm=False)
        assert not caplog.records                          # a sound engine goes idle in silence
        engine.add_request("leaky", [7, 8, 9], params)
        engine.step()
        leaked = engine.scheduler.requests["leaky"].block_table[0]
        engine.block_manager.ref_counts[leaked] += 1       # a reference no block table holds
        while engine.has_unfinished_requests():
            engine.step()
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert f"block {leaked} has 1 references but is held by []" in caplog.records[0].getMessage()
    assert llm.generate([[5, 6]], params, use_tqdm=False)[0].outputs[0].token_ids   # serving goes on


def test_reports_carry_deltas_that_add_up_to_the_final_output(tiny_llm):
    # Each report carries what changed since the last (so its cost does not grow with the output); the
    # whole text, token ids and log-probs come once, in the final report, equal to the deltas joined.
    engine = tiny_llm.engine
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=12, logprobs=2, stop=[" the"])
    engine.add_request("deltas", [5, 6, 7, 8], params)
    texts, tokens, logprobs, reports = ["", ""], [[], []], [[], []], []
    while engine.has_unfinished_requests():
        for report in engine.step():
            reports.append(report)
            for o in report.outputs:
                texts[o.index] += o.text_delta
                tokens[o.index] += o.token_ids_delta
                logprobs[o.index] += o.logprobs_delta
    assert len(reports) > 2 and reports[-1].finished and not any(r.finished for r in reports[:-1])
    assert all(o.text == "" and o.token_ids == [] and o.logprobs is None for r in reports[:-1] for o in r.outputs)
    for o in reports[-1].outputs:
        assert o.text == texts[o.index] and o.token_ids == tokens[o.index] and o.logprobs == logprobs[o.index]
        assert len(o.token_ids) == len(o.logprobs) > 0


# ---- every family on the native executor, against the torch model on the same weights ----

FAMILY_OPTIONS = dict(dtype="float32", quantization="float", kv_cache_dtype="float32", kv_cache_tokens=4096)
FAMILY_PARAMS = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=4)


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def family_reference(request, tmp_path_factory, default_gguf_path):
    """A tiny random model of each family (tests/tiny_models.py: windows of 6 or 7, soft-caps that change
    results, q/k norms, biases, Gemma's four norms and GeGLU, head_dim unlike hidden / heads, LongRoPE)
    on the torch model: its first step's logits and greedy runs on prompts of 1 to 90 tokens, which
    prefill and decode within the windows and far past them."""
    pytest.importorskip("transformers")
    directory = make_tiny_family_hf(tmp_path_factory.mktemp(request.param), request.param)
    prompts = random_prompts(5, seed=5, max_len=90)
    llm = LLM(str(directory), **FAMILY_OPTIONS, attention_backend="torch")
    return directory, prompts, first_step_logits(llm, prompts), llm.generate(prompts, FAMILY_PARAMS, use_tqdm=False)


def first_step_logits(llm, prompts) -> torch.Tensor:
    engine = llm.engine
    for i, ids in enumerate(prompts):
        engine.add_request(f"first-{i}", ids, SamplingParams(max_tokens=1))
    logits = engine.runner.execute(engine.scheduler.schedule())
    for i in range(len(prompts)):
        engine.abort_request(f"first-{i}")
    return logits


@pytest.mark.parametrize("deterministic", [False, True], ids=["lean-decode", "batch-invariant"])
def test_native_executor_runs_every_family_as_the_torch_model(family_reference, deterministic):
    """The native executor from the same layer description: the first step's logits close, then greedy
    tokens equal and log-probs close, with prompts chunked into 32-token steps beside decodes (each
    chunk's window reaching back into the cache), through lean decode or, batch-invariant, all of it
    through the prefill kernel."""
    directory, prompts, logits, expected = family_reference
    llm = LLM(str(directory), **FAMILY_OPTIONS, deterministic=deterministic)
    assert llm.engine.kernels["executor"].startswith("native"), llm.engine.kernels["executor"]
    ours = first_step_logits(llm, prompts)
    assert ((ours - logits).abs().max() / logits.abs().max()).item() < 1e-5
    chunked = LLM(str(directory), **FAMILY_OPTIONS, deterministic=deterministic, max_num_batched_tokens=32)
    got = chunked.generate(prompts, FAMILY_PARAMS, use_tqdm=False)
    assert token_ids(got) == token_ids(expected)
    for mine, reference in zip(got, expected):
        for step, (a, b) in enumerate(zip(mine.outputs[0].logprobs, reference.outputs[0].logprobs)):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4), f"step {step}"
            assert dict(a.top) == pytest.approx(dict(b.top), abs=1e-4), f"step {step}"
