"""Quantized linears (int8, int4, LLM.int8), GGUF blocks taken exactly, the module swap,
offline quantized checkpoints, and the perplexity bench on the tiny model."""
from __future__ import annotations

import json
import math
from argparse import Namespace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from leanserve import LLM, SamplingParams
from leanserve.bench import perplexity
from leanserve.engine.engine_config import EngineConfig
from leanserve.engine.loader import (
    Checkpoint,
    dequantize_gguf_tensor,
    gguf_block_rows,
    gguf_config,
    gguf_weight_tensors,
    load_checkpoint,
    open_gguf,
)
from leanserve.engine.models.decoder import DecoderForCausalLM
from leanserve.engine.quantize import default_quantization, quantize_model, resolve_quantization, save_quantized
from leanserve.engine.executor import native_linear
from leanserve.kernels.cpu_kernels import native_kernels
from leanserve.kernels.quant import Int4Linear, Int8Linear, LLMInt8Linear, QuantLinear, pack_int4, unpack_int4
from tests.tiny_models import default_gguf_reader, llama_cpp_permute, make_tiny_llama_gguf

Q = gguf.GGMLQuantizationType
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[5, 17, 300, 4000, 12], list(range(100, 160)), [7]]


def weights(n: int = 96, k: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def activations(m: int = 7, k: int = 256, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed))


def unpermute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation, built from the permutation itself."""
    order = llama_cpp_permute(np.arange(rows.shape[0]), n_head)
    restored = np.empty_like(rows)
    restored[order] = rows
    return restored


# ------------------------------------------------------------------------------ the modules


@pytest.mark.parametrize("make", [
    lambda w: Int8Linear.from_float(w),
    lambda w: Int8Linear.from_float(w, group_size=32),
    lambda w: Int4Linear.from_float(w, group_size=32),
    lambda w: Int4Linear.from_float(w, group_size=64),
    lambda w: Int4Linear.from_float(w, group_size=128),
], ids=["int8", "int8-g32", "int4-g32", "int4-g64", "int4-g128"])
def test_weight_only_torch_path_is_the_float_product(make) -> None:
    """The modules' own forward (the torch model's, where the native executor does not run) multiplies
    by the exactly dequantized weight in the activations' dtype: float32 is float32's product."""
    module = make(weights())
    x = activations()
    y = module(x)
    assert y.dtype == torch.float32 and y.shape == (7, 96)
    assert torch.equal(y, x @ module.dequantize().t())
    # Any leading shape, and bfloat16 activations in and out.
    assert torch.equal(module(x.view(7, 1, 256)).view(7, 96), y)
    assert module(x.bfloat16()).dtype == torch.bfloat16


def test_int8_round_trip_error_is_at_most_half_a_step() -> None:
    w = weights()
    for group_size in (None, 32):
        module = Int8Linear.from_float(w, group_size)
        step = module.dequantize() - w
        scales = module.scales.float() if group_size is None else module.scales.float().repeat_interleave(32, 1)
        scales = scales[:, None] if group_size is None else scales
        assert (step.abs() <= scales / 2 + 1e-7).all()
        assert module.weight.abs().max() == 127       # absmax maps onto the largest code


def test_linears_the_native_executor_cannot_take_say_why(tiny_hf_dir: Path) -> None:
    """Group-wise int8 in groups of 25 (neither 16 nor a multiple of the kernels' 32), float64 scales, and
    LLM.int8: the executor names the reason, and a model with such linears runs on the torch model. float32
    scales that are not float16 values run natively (packed as float32, as the K-quants' are)."""
    kernels = native_kernels()
    if kernels is None:
        pytest.skip("no native kernels here")
    w = torch.randint(-127, 128, (16, 100), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert "groups of 25" in native_linear(Int8Linear(w, torch.rand(16, 4).half()), kernels)
    assert "float16 or float32 only" in native_linear(Int8Linear(w[:, :64], torch.rand(16, 2, dtype=torch.float64)),
                                                      kernels)
    float32_scales = Int8Linear(w[:, :64], torch.rand(16, 2) / 3)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    exact = x.double() @ float32_scales.dequantize().double().t()
    assert (native_linear(float32_scales, kernels)(x).double() - exact).norm() <= 1e-4 * exact.norm()
    assert "has no native kernel" in native_linear(LLMInt8Linear.from_float(weights()), kernels)
    llm = LLM(str(tiny_hf_dir), quantization="llm_int8", kv_cache_tokens=1024)
    assert llm.engine.kernels["executor"].startswith("torch (LLMInt8Linear")
    assert len(llm.generate([PROMPTS[0]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8


def test_int4_round_trip_error_is_at_most_half_a_step() -> None:
    w = weights()
    module = Int4Linear.from_float(w, group_size=64)
    error = (module.dequantize() - w).abs()
    assert (error <= module.scales.repeat_interleave(64, 1) / 2 + 1e-6).all()
    assert module.qweight.shape == (96, 128) and module.scales.shape == (96, 4)
    # The group's extremes are codes 0 and 15.
    q = unpack_int4(module.qweight).view(96, 4, 64)
    assert (q.amin(-1) == 0).all() and (q.amax(-1) == 15).all()


def test_constant_and_zero_groups_quantize_exactly() -> None:
    w = torch.zeros(4, 64)
    w[1] = 0.25
    w[2, :32] = -3.0
    for module in (Int8Linear.from_float(w, scale_dtype=torch.float32), Int4Linear.from_float(w, 32),
                   LLMInt8Linear.from_float(w)):
        assert torch.equal(module.dequantize(), w), type(module).__name__
        assert torch.isfinite(module(torch.ones(2, 64))).all()


def test_int4_packing_is_low_nibble_first() -> None:
    q = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_int4(q)
    assert torch.equal(packed[:, 0] & 0xF, q[:, 0]) and torch.equal(packed[:, 0] >> 4, q[:, 1])
    assert torch.equal(unpack_int4(packed), q)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="group_size must be one of"):
        Int4Linear.from_float(weights(), group_size=48)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        Int4Linear.from_float(weights(k=96), group_size=64)
    with pytest.raises(ValueError, match="torch.int8"):
        Int8Linear(torch.zeros(4, 32), torch.ones(4))


def test_llm_int8_matches_float_reference() -> None:
    module = LLMInt8Linear.from_float(weights())
    x = activations() * 0.5                          # below the threshold: all int8
    reference = x @ module.dequantize().t()
    assert (module(x) - reference).abs().max() <= 2e-2 * reference.abs().max()


def test_llm_int8_outlier_columns_are_computed_in_float() -> None:
    module = LLMInt8Linear.from_float(weights())
    x = activations() * 0.1
    x[3, 10] = 60.0                                   # one outlier feature (|x| >= 6) in one token
    x[:, 200] = -8.0                                  # and one in every token
    reference = x @ module.dequantize().t()
    error = (module(x) - reference).abs().max() / reference.abs().max()
    assert error < 2e-3
    # Quantizing the outliers too (threshold ignored) drowns the other features of their tokens.
    module.threshold = math.inf
    ignored = (module(x) - reference).abs().max() / reference.abs().max()
    assert ignored > 10 * error


def test_int_mm_runs_on_this_cpu_build() -> None:
    a = torch.randint(-127, 128, (1, 64), dtype=torch.int8)
    b = torch.randint(-127, 128, (64, 32), dtype=torch.int8)
    assert torch.equal(torch._int_mm(a, b), a.int() @ b.int())


# ------------------------------------------------------------------------------ GGUF blocks


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_blocks_are_taken_exactly(qtype: Q) -> None:
    w = weights(64, 128).numpy()
    w[0, :32] = 0.0                                   # an all-zero block
    rows = gguf.quants.quantize(w, qtype)
    module = (Int8Linear if qtype == Q.Q8_0 else Int4Linear).from_gguf(rows, qtype, 128)
    assert module.group_size == 32 and module.scales.dtype == torch.float16
    assert np.array_equal(module.dequantize().numpy(), gguf.quants.dequantize(rows, qtype))


def _tiny_gguf_checkpoint(path: Path) -> Checkpoint:
    """A tokenizer-less tiny GGUF loaded as the loader does (weights dequantized, tensors as stored)."""
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    tensors = gguf_weight_tensors(reader, config, path)
    weights = {name: dequantize_gguf_tensor(name, t, config) for name, t in tensors.items()}
    return Checkpoint(path, config, weights, tokenizer=None, gguf_tensors=tensors)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_quantized_modules_of_a_gguf_file_equal_its_blocks(tmp_path: Path, tiny_hf_dir: Path, qtype: Q) -> None:
    path = make_tiny_llama_gguf(tmp_path / f"tiny-{qtype.name}.gguf", tiny_hf_dir, qtype, tokenizer=False)
    checkpoint = _tiny_gguf_checkpoint(path)
    config = checkpoint.config
    assert default_quantization(checkpoint) == "int4"          # every type here has a native kernel
    model = DecoderForCausalLM(config, backend=None)
    model.load_weights(checkpoint.weights)
    formats = quantize_model(model, "int4", checkpoint)
    assert len(formats) == 4 * config.num_hidden_layers + 1

    file = {t.name: t for t in gguf.GGUFReader(path).tensors}

    def expected(gguf_name: str, n_head: int | None = None) -> np.ndarray:
        t = file[gguf_name]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        return unpermute(values, n_head) if n_head else values

    head = model.lm_head
    assert isinstance(head, Int8Linear if qtype == Q.Q8_0 else Int4Linear)
    assert np.array_equal(head.dequantize().numpy(), expected("output.weight"))
    for i, layer in enumerate(model.layers):
        b = f"blk.{i}."
        parts = {
            layer.self_attn.qkv_proj: [expected(b + "attn_q.weight", config.num_attention_heads),
                                       expected(b + "attn_k.weight", config.num_key_value_heads),
                                       expected(b + "attn_v.weight")],
            layer.self_attn.o_proj: [expected(b + "attn_output.weight")],
            layer.mlp.gate_up_proj: [expected(b + "ffn_gate.weight"), expected(b + "ffn_up.weight")],
            layer.mlp.down_proj: [expected(b + "ffn_down.weight")],
        }
        for module, blocks in parts.items():
            assert isinstance(module, Int8Linear if qtype == Q.Q8_0 else Int4Linear) and module.group_size == 32
            assert np.array_equal(module.dequantize().numpy(), np.concatenate(blocks))


def test_quantized_head_logits_are_exact(tmp_path: Path, tiny_hf_dir: Path) -> None:
    """A Q8_0 LM head taken as stored: the torch model's logits are float32's on its exact weight; the
    native executor's are within its 16-bit activations of them, with the same top candidates."""
    path = make_tiny_llama_gguf(tmp_path / "tiny-q8_0.gguf", tiny_hf_dir, Q.Q8_0, tokenizer=False)
    checkpoint = _tiny_gguf_checkpoint(path)
    model = DecoderForCausalLM(checkpoint.config, backend=None)
    model.load_weights(checkpoint.weights)
    quantize_model(model, "int4", checkpoint)
    assert isinstance(model.lm_head, Int8Linear) and model.lm_head.group_size == 32
    hidden = torch.randn(3, checkpoint.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    exact = model.norm(hidden) @ model.lm_head.dequantize().t()          # float32, the head's exact weight
    torch.testing.assert_close(model.compute_logits(hidden), exact, rtol=1e-6, atol=1e-6)
    kernels = native_kernels()
    if kernels is None:
        pytest.skip("no native kernels here")
    head = native_linear(model.lm_head, kernels)
    logits = head(kernels.rms_norm(hidden, model.norm.weight, checkpoint.config.rms_norm_eps))
    torch.testing.assert_close(logits, exact, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits.topk(8).indices, exact.topk(8).indices)


def test_block_rows_are_unpermuted_like_the_float_tensor(tmp_path: Path, tiny_hf_dir: Path) -> None:
    path = make_tiny_llama_gguf(tmp_path / "tiny-q4_0.gguf", tiny_hf_dir, Q.Q4_0, tokenizer=False)
    checkpoint = _tiny_gguf_checkpoint(path)
    name = "model.layers.1.self_attn.k_proj.weight"
    rows = gguf_block_rows(name, checkpoint.gguf_tensors[name], checkpoint.config)
    assert np.array_equal(gguf.quants.dequantize(rows, Q.Q4_0), checkpoint.weights[name].numpy())


def test_default_model_int4_and_embedding_blocks_are_exact(default_gguf_path: Path) -> None:
    reader = default_gguf_reader()
    config = gguf_config(reader, default_gguf_path)
    tensors = gguf_weight_tensors(reader, config, default_gguf_path)
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"]
    rows = np.concatenate([gguf_block_rows(n, tensors[n], config) for n in names])
    qkv = Int4Linear.from_gguf(rows, tensors[names[0]].tensor_type, config.hidden_size)
    expected = np.concatenate([dequantize_gguf_tensor(n, tensors[n], config).numpy() for n in names])
    assert np.array_equal(qkv.dequantize().numpy(), expected)
    embedding = tensors["model.embed_tokens.weight"]
    assert embedding.tensor_type == Q.Q8_0
    head = Int8Linear.from_gguf(np.asarray(embedding.data), Q.Q8_0, config.hidden_size)
    assert np.array_equal(head.dequantize().numpy(), gguf.quants.dequantize(embedding.data, Q.Q8_0))


# ------------------------------------------------------------------------------ the engine


def token_ids(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("mode, kinds", [
    ("int8", {Int8Linear}), ("int4", {Int4Linear, Int8Linear}), ("llm_int8", {LLMInt8Linear})])
def test_llm_generates_with_quantized_weights(tiny_hf_dir: Path, mode: str, kinds: set) -> None:
    llm = LLM(str(tiny_hf_dir), quantization=mode, kv_cache_tokens=1024)
    model = llm.engine.runner.model
    assert llm.engine.quantization == mode
    assert not any(isinstance(m, torch.nn.Linear) for m in model.layers.modules())
    assert {type(m) for m in model.modules() if isinstance(m, QuantLinear)} == kinds
    assert isinstance(model.lm_head, torch.nn.Linear) == (mode == "llm_int8")
    outputs = token_ids(llm)
    assert [len(o) for o in outputs] == [8, 8, 8]


def test_float_files_default_to_float_and_bad_modes_are_refused(tiny_hf_dir: Path) -> None:
    llm = LLM(str(tiny_hf_dir), kv_cache_tokens=1024)
    assert llm.engine.quantization == "float"
    assert not any(isinstance(m, QuantLinear) for m in llm.engine.runner.model.modules())
    with pytest.raises(ValueError, match="quantization must be None or one of"):
        EngineConfig(model=str(tiny_hf_dir), quantization="int3")


@pytest.mark.parametrize("mode", ["int8", "int4", "llm_int8"])
def test_offline_checkpoint_equals_load_time_quantization(tmp_path: Path, tiny_hf_dir: Path, mode: str) -> None:
    out = tmp_path / f"tiny-{mode}"
    save_quantized(str(tiny_hf_dir), out, mode)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                               "tokenizer_config.json"}
    saved = load_checkpoint(str(out))
    assert saved.quantized.mode == mode and default_quantization(saved) == mode
    with pytest.raises(ValueError, match="already quantized"):
        resolve_quantization("int8" if mode != "int8" else "int4", saved)
    reloaded = LLM(str(out), kv_cache_tokens=1024)
    at_load = LLM(str(tiny_hf_dir), quantization=mode, kv_cache_tokens=1024)
    ours, theirs = reloaded.engine.runner.model.state_dict(), at_load.engine.runner.model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert token_ids(reloaded) == token_ids(at_load)


def test_offline_checkpoint_of_a_q4_gguf_keeps_blocks_and_tokenizer(tmp_path: Path, tiny_hf_dir: Path) -> None:
    path = make_tiny_llama_gguf(tmp_path / "tiny-q4_1.gguf", tiny_hf_dir, Q.Q4_1)
    out = tmp_path / "tiny-q4_1-int4"
    save_quantized(str(path), out, "int4", group_size=128)   # Q4_1 blocks stay group 32, as stored
    assert json.loads((out / "config.json").read_text())["quantization_config"]["mode"] == "int4"
    from_gguf = LLM(str(path), kv_cache_tokens=1024, quantization="int4")
    from_dir = LLM(str(out), kv_cache_tokens=1024)             # loads as saved
    assert from_gguf.engine.quantization == from_dir.engine.quantization == "int4"
    assert from_dir.engine.runner.model.layers[0].mlp.down_proj.group_size == 32
    chat = [{"role": "user", "content": "Hi there"}]
    assert from_dir.tokenizer.apply_chat_template(chat) == from_gguf.tokenizer.apply_chat_template(chat)
    assert from_dir.tokenizer.eos_token_ids == from_gguf.tokenizer.eos_token_ids
    assert token_ids(from_dir) == token_ids(from_gguf)


# ------------------------------------------------------------------------------ the bench


def test_perplexity_bench_on_the_tiny_model(tmp_path: Path, tiny_hf_dir: Path, capsys) -> None:
    workload = tmp_path / "chat.jsonl"
    workload.write_text("\n".join(json.dumps({"id": str(i), "messages": [{"role": "user", "content": text}],
                                              "max_tokens": 4})
                                  for i, text in enumerate(["Hello there, how are you?", "Name three colours."])))
    args = Namespace(model=str(tiny_hf_dir), modes="int4,float,int8", workload=str(workload),
                     num_prompts=2, step_batches="1,2", context=16, kv_cache_dtype="auto", repeats=1, no_perplexity=False,
                     output=str(tmp_path / "out.json"))
    assert perplexity.run(args) == 0
    results = {r["mode"]: r for r in json.loads((tmp_path / "out.json").read_text())["results"]}
    assert list(results) == ["float", "int4", "int8"]
    assert all(r["perplexity"] > 1 and set(r["step_ms"]) == {"1", "2"} for r in results.values())
    # A random model's text is near uniform over the 49,152-token vocabulary.
    assert 1e4 < results["float"]["perplexity"] < 1e5
    assert 0 <= results["int4"]["kl_vs_float"] < 0.05
    assert "float" in capsys.readouterr().out


def test_sequence_log_probs_equal_the_engine_logits(tiny_hf_dir: Path) -> None:
    llm = LLM(str(tiny_hf_dir), kv_cache_tokens=1024)
    engine = llm.engine
    prompt = PROMPTS[1]
    log_probs, _ = perplexity.sequence_log_probs(engine.runner, prompt + [9])
    engine.add_request("x", prompt, SamplingParams(max_tokens=1))
    logits = engine.runner.execute(engine.scheduler.schedule())
    engine.abort_request("x")
    torch.testing.assert_close(log_probs[-1], torch.log_softmax(logits[0], -1), rtol=1e-5, atol=1e-5)
