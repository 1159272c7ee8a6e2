"""The default model against HuggingFace transformers on the same GGUF file (float32, greedy)."""
import importlib
import inspect

import pytest
import torch

from leanserve import LLM, SamplingParams
from leanserve.engine.loader import resolve_model_path
from tests.conftest import LEVELS

NEW_TOKENS = 32


def conversations() -> list[list[dict]]:
    """Eight chat prompts from about 20 to over 1,000 tokens, built from standard-library prose."""
    def doc(module: str, words: int) -> str:
        text = " ".join(inspect.getdoc(importlib.import_module(module)).split())
        return " ".join(text.split()[:words])

    prompts = [
        "Write a haiku about the sea.",
        "Summarize in one sentence: " + doc("json", 60),
        "Explain this to a beginner: " + doc("argparse", 30) + " " + doc("itertools", 80),
        "List three ideas from this text: " + doc("collections", 110) + " " + doc("heapq", 60),
        "Rewrite the following more concisely.\n\n" + doc("doctest", 190),
        "What does this describe?\n\n" + doc("csv", 200) + "\n\n" + doc("socket", 200),
        "Summarize the following documentation.\n\n" + doc("re", 700) + " " + doc("pydoc", 250)
        + " " + doc("unittest", 200),
    ]
    short = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    return [short] + [[{"role": "user", "content": p}] for p in prompts]


@pytest.fixture(scope="module")
def llm():
    # float32 weights (the Q4 file dequantized) and KV cache, as transformers runs them.
    return LLM("smollm2", dtype="float32", quantization="float", kv_cache_dtype="float32", kv_cache_tokens=16384,
               max_num_batched_tokens=2048)


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    path = resolve_model_path("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def prompt_ids(llm):
    ids = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(c), add_special_tokens=False)
           for c in conversations()]
    lengths = sorted(len(i) for i in ids)
    assert lengths[0] <= 25 and lengths[-1] > 1000, lengths
    return ids


def hf_greedy(model, ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """Plain greedy decoding with transformers' KV cache; runs past EOS like ignore_eos."""
    tokens = []
    with torch.inference_mode():
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(new_tokens):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = model(torch.tensor([tokens[-1:]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens


@pytest.fixture(scope="module")
def hf_tokens(hf_model, prompt_ids):
    return [hf_greedy(hf_model, ids) for ids in prompt_ids]


def test_batched_chat_equals_transformers_greedy(llm, hf_tokens, prompt_ids):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.chat(conversations(), params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outputs] == prompt_ids
    for ids, output, expected in zip(prompt_ids, outputs, hf_tokens):
        assert output.outputs[0].token_ids == expected, f"prompt of {len(ids)} tokens"
        assert output.outputs[0].finish_reason == "length"


def test_float16_kv_cache_keeps_transformers_greedy(hf_tokens, prompt_ids):
    """The CPU default for a float32 model caches keys and values in float16 (about 3.3 digits)."""
    llm = LLM("smollm2", dtype="float32", quantization="float", kv_cache_tokens=16384, max_num_batched_tokens=2048)
    assert llm.engine.runner.k_cache.dtype == torch.float16
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompt_ids, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == hf_tokens


def test_each_prompt_alone_equals_the_batch(llm, prompt_ids):
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    batched = llm.generate(prompt_ids, params, use_tqdm=False)
    for ids, together in zip(prompt_ids, batched):
        alone = llm.generate([ids], params, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == together.outputs[0].token_ids


def test_first_step_logits_match_transformers(llm, hf_model, prompt_ids):
    engine = llm.engine
    for i, ids in enumerate(prompt_ids[:4]):
        engine.add_request(f"logits-{i}", ids, SamplingParams(max_tokens=1))
    batch = engine.scheduler.schedule()
    ours = engine.runner.execute(batch)
    for i in range(4):
        engine.abort_request(f"logits-{i}")
    for i, ids in enumerate(prompt_ids[:4]):
        with torch.inference_mode():
            expected = hf_model(torch.tensor([ids])).logits[0, -1].float()
        error = (ours[i] - expected).abs().max() / expected.abs().max()
        assert error < 1e-4, f"prompt {i}: relative error {error:.2e}"


@pytest.mark.parametrize("level", LEVELS)
def test_default_int4_equals_transformers_greedy(hf_tokens, prompt_ids, native_kernels_of, monkeypatch, level):
    """What `make serve` runs: the Q4_1 blocks as stored on each ISA level's native executor, float16 KV cache."""
    native_kernels_of(level)
    monkeypatch.setenv("LEANSERVE_CPU_ISA", level)
    llm = LLM("smollm2", kv_cache_tokens=16384, max_num_batched_tokens=2048)
    assert llm.engine.quantization == "int4" and llm.engine.kernels["executor"] == f"native ({level})"
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompt_ids, params, use_tqdm=False)
    for ids, output, expected in zip(prompt_ids, outputs, hf_tokens):
        assert output.outputs[0].token_ids == expected, f"prompt of {len(ids)} tokens"


def test_torch_fallback_equals_transformers_greedy(hf_tokens, prompt_ids, monkeypatch):
    """Without the native kernels (LEANSERVE_NATIVE_KERNELS=0, or no C++ compiler) the default model runs
    on the torch model: int4 dequantized exactly to float32, float16 KV cache."""
    monkeypatch.setenv("LEANSERVE_NATIVE_KERNELS", "0")
    llm = LLM("smollm2", kv_cache_tokens=16384, max_num_batched_tokens=2048)
    assert llm.engine.kernels["executor"].startswith("torch")
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompt_ids, params, use_tqdm=False)
    for ids, output, expected in zip(prompt_ids, outputs, hf_tokens):
        assert output.outputs[0].token_ids == expected, f"prompt of {len(ids)} tokens"
