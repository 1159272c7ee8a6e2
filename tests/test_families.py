"""Every supported family against HuggingFace transformers on the same random weights (float32).

Each family's tiny model has its special features switched on (tests/tiny_models.py FAMILY_CONFIGS):
sliding windows shorter than the prompts, soft-caps that change results, q/k norms, biases, Gemma's
four norms and GeGLU, LongRoPE. It is loaded from its HF directory and from the GGUF file llama.cpp's
converter would write, and run on each executor this machine has.
"""
import pytest
import torch

from leanserve import LLM, SamplingParams
from tests.test_parity_hf import hf_greedy
from tests.tiny_models import FAMILY_CONFIGS, make_tiny_family_gguf, make_tiny_family_hf

transformers = pytest.importorskip("transformers")

PROMPT_LENGTHS = (5, 23, 50)      # Phi-3's stay below its original context (64) with the new tokens
NEW_TOKENS = 12
EXECUTORS = ("auto", "torch")     # auto: the native executor where it runs (else the torch model)


@pytest.fixture(scope="module", params=list(FAMILY_CONFIGS))
def family(request, tmp_path_factory):
    directory = make_tiny_family_hf(tmp_path_factory.mktemp(request.param) / "hf", request.param)
    gguf_path = make_tiny_family_gguf(directory.parent / "model.gguf", directory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    return {"name": request.param, "hf": directory, "gguf": gguf_path, "model": model, "prompts": prompts,
            "greedy": [hf_greedy(model, ids, NEW_TOKENS) for ids in prompts]}


def _llm(path, executor: str) -> LLM:
    return LLM(str(path), dtype="float32", quantization="float", kv_cache_dtype="float32", kv_cache_tokens=4096,
               block_size=16, attention_backend=executor)


@pytest.mark.parametrize("source", ["hf", "gguf"])
@pytest.mark.parametrize("executor", EXECUTORS)
def test_first_step_logits_match_transformers(family, source, executor):
    llm = _llm(family[source], executor)
    engine = llm.engine
    for i, ids in enumerate(family["prompts"]):
        engine.add_request(f"logits-{i}", ids, SamplingParams(max_tokens=1))
    ours = engine.runner.execute(engine.scheduler.schedule())
    for i, ids in enumerate(family["prompts"]):
        engine.abort_request(f"logits-{i}")
        with torch.inference_mode():
            expected = family["model"](torch.tensor([ids])).logits[0, -1].float()
        error = (ours[i] - expected).abs().max() / expected.abs().max()
        assert error < 1e-4, f"{family['name']} prompt {i} ({len(ids)} tokens): relative error {error:.2e}"


@pytest.mark.parametrize("source", ["hf", "gguf"])
@pytest.mark.parametrize("executor", EXECUTORS)
def test_greedy_equals_transformers_batched_and_alone(family, source, executor):
    llm = _llm(family[source], executor)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    batched = llm.generate(family["prompts"], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == family["greedy"]
    for ids, expected in zip(family["prompts"], family["greedy"]):
        assert llm.generate([ids], params, use_tqdm=False)[0].outputs[0].token_ids == expected


def test_the_families_features_are_on(family):
    """The tiny models exercise what makes each family differ from Llama (else the tests above prove less)."""
    config = LLM(str(family["hf"]), quantization="float", kv_cache_tokens=256).engine.model_config
    name = family["name"]
    windows = [spec.sliding_window for spec in config.layers]
    expected = {
        "mistral": dict(windows=[7, 7]),
        "qwen2": dict(attention_bias=True, tie_word_embeddings=True),
        "qwen3": dict(qk_norm=True, head_dim=32),
        "gemma2": dict(windows=[6, None, 6, None], sandwich_norms=True, hidden_act="gelu_tanh",
                       attn_logit_softcap=2.0, final_logit_softcap=5.0),
        "gemma3": dict(windows=[6] * 5 + [None], sandwich_norms=True, qk_norm=True, hidden_act="gelu_tanh",
                       num_ropes=2),
        "phi3": dict(rope_type="longrope"),
    }[name]
    assert expected.pop("windows", windows) == windows
    assert expected.pop("num_ropes", len(config.ropes)) == len(config.ropes)
    if "rope_type" in expected:
        assert config.rope_scaling["rope_type"] == expected.pop("rope_type")
    for key, value in expected.items():
        assert getattr(config, key) == value, key
