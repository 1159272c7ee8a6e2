"""Model config and checkpoint loading (GGUF and HuggingFace directories)."""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from leanserve.engine.config import ModelConfig
from leanserve.engine.loader import (
    Checkpoint,
    ModelLoadError,
    dequantize_gguf_tensor,
    gguf_config,
    gguf_weight_tensors,
    llama3_rope_factors,
    load_checkpoint,
    open_gguf,
    resolve_model_path,
    unpermute_rotary_rows,
)
from tests.tiny_models import TINY_DIMS, default_gguf_reader, llama_cpp_permute, make_tiny_llama_gguf

Q = gguf.GGMLQuantizationType

SMALL_CONFIG = dict(architecture="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
                    tie_word_embeddings=False)


@pytest.fixture(scope="module")
def tiny_hf(tiny_hf_dir: Path) -> Checkpoint:
    return load_checkpoint(str(tiny_hf_dir))


@pytest.fixture(scope="module")
def default_checkpoint(default_gguf_path: Path) -> Checkpoint:
    return load_checkpoint("smollm2")


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's permutation, built from the permutation itself (not the loader's code)."""
    order = llama_cpp_permute(np.arange(w.shape[0]), n_head)
    restored = np.empty_like(w)
    restored[order] = w
    return restored


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("change, message", [
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(num_hidden_layers=-1), "num_hidden_layers must be a positive integer"),
    (dict(num_key_value_heads=3), r"num_key_value_heads \(3\) must divide num_attention_heads \(4\)"),
    (dict(head_dim=15), "head_dim must be even"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps must be positive"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "unsupported rope_scaling type 'yarn'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks"),
])
def test_config_validation(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**SMALL_CONFIG, **change})


def test_config_from_hf_dicts() -> None:
    hf = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "max_position_embeddings": 256}
    assert ModelConfig.from_hf_config(hf) == ModelConfig(**SMALL_CONFIG)
    legacy = {**hf, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert ModelConfig.from_hf_config(legacy).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    # transformers 5 nests theta and scaling under rope_parameters.
    v5 = {k: v for k, v in hf.items() if k != "rope_theta"} | {"rope_parameters": {"rope_theta": 5e5, **llama3}}
    assert (ModelConfig.from_hf_config(v5).rope_theta, ModelConfig.from_hf_config(v5).rope_scaling) == (5e5, llama3)
    default_rope = {**hf, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    assert ModelConfig.from_hf_config(default_rope).rope_scaling is None
    with pytest.raises(ValueError, match="model_type 'bert'"):
        ModelConfig.from_hf_config({**hf, "model_type": "bert"})
    assert ModelConfig.from_hf_config({**hf, "attention_bias": True}).attention_bias
    with pytest.raises(ValueError, match="mlp_bias"):
        ModelConfig.from_hf_config({**hf, "mlp_bias": True})
    with pytest.raises(ValueError, match="partial rotary"):
        ModelConfig.from_hf_config({**hf, "model_type": "phi3", "partial_rotary_factor": 0.75})


# ------------------------------------------------------------------------ tiny models


def test_hf_dir_loads(tiny_hf: Checkpoint, tiny_hf_dir: Path) -> None:
    config = tiny_hf.config
    expected = {**TINY_DIMS, "architecture": "llama", "head_dim": 16, "rope_scaling": None, "tie_word_embeddings": False}
    assert {key: value for key, value in asdict(config).items() if key in expected} == expected
    assert not (config.attention_bias or config.qk_norm or config.sandwich_norms)
    assert "lm_head.weight" in tiny_hf.weights
    assert len(tiny_hf.weights) == 3 + 9 * config.num_hidden_layers
    assert all(w.dtype == torch.float32 for w in tiny_hf.weights.values())
    assert tiny_hf.weights["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert tiny_hf.path == tiny_hf_dir


def test_f32_gguf_equals_hf_weights_exactly(tiny_gguf_path: Path, tiny_hf: Checkpoint) -> None:
    # Exact equality of Q and K proves the rotary row permutation is undone.
    loaded = load_checkpoint(str(tiny_gguf_path))
    assert loaded.config == tiny_hf.config
    assert loaded.weights.keys() == tiny_hf.weights.keys()
    for name, weight in tiny_hf.weights.items():
        assert torch.equal(loaded.weights[name], weight), name
    assert loaded.tokenizer.encode("Hi 🙂") == tiny_hf.tokenizer.encode("Hi 🙂")


def test_f16_gguf_equals_hf_weights_rounded(tmp_path: Path, tiny_hf_dir: Path, tiny_hf: Checkpoint) -> None:
    loaded = load_checkpoint(str(make_tiny_llama_gguf(tmp_path / "tiny-f16.gguf", tiny_hf_dir, Q.F16)))
    for name, weight in tiny_hf.weights.items():
        expected = weight if weight.ndim == 1 else weight.half().float()  # llama.cpp keeps norms in F32
        assert torch.equal(loaded.weights[name], expected), name


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda q: q.name)
def test_quantized_gguf_equals_dequantized_blocks(tmp_path: Path, tiny_hf_dir: Path, tiny_hf: Checkpoint,
                                                   qtype: Q) -> None:
    # load_checkpoint minus the tokenizer (covered above and by the real, quantized default model).
    path = make_tiny_llama_gguf(tmp_path / f"tiny-{qtype.name}.gguf", tiny_hf_dir, qtype, tokenizer=False)
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    tensors = gguf_weight_tensors(reader, config, path)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, weight in tiny_hf.weights.items():
        loaded = dequantize_gguf_tensor(name, tensors[name], config)
        if weight.ndim == 1:
            assert torch.equal(loaded, weight), name
            continue
        w = weight.numpy()
        n_head = next((n for proj, n in heads.items() if proj in name), None)
        stored = gguf.quants.quantize(w if n_head is None else llama_cpp_permute(w, n_head), qtype)
        expected = gguf.quants.dequantize(stored, qtype)
        expected = expected if n_head is None else unpermute(expected, n_head)
        assert np.array_equal(loaded.numpy(), expected), name
        assert np.abs(expected - w).max() < 0.05  # and the quantized values are close to the originals

    # Raw blocks for quantized kernels: un-permuting whole block rows gives the blocks of HF's layout.
    hf_k = tiny_hf.weights["model.layers.1.self_attn.k_proj.weight"].numpy()
    raw_k = tensors["model.layers.1.self_attn.k_proj.weight"].data
    assert np.array_equal(unpermute_rotary_rows(raw_k, config.num_key_value_heads), gguf.quants.quantize(hf_k, qtype))


# ----------------------------------------------------------------------- default model


def test_default_model_loads(default_checkpoint: Checkpoint, default_gguf_path: Path) -> None:
    config = default_checkpoint.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert (config.head_dim, config.intermediate_size, config.max_position_embeddings) == (64, 1536, 8192)
    assert (config.rope_theta, config.rms_norm_eps, config.rope_scaling) == (100000.0, 1e-5, None)
    assert config.tie_word_embeddings and "lm_head.weight" not in default_checkpoint.weights
    assert default_checkpoint.path == default_gguf_path
    assert resolve_model_path("SmolLM2-135M-Instruct") == default_gguf_path


def test_default_model_qk_equal_transformers_gguf_loader(default_checkpoint: Checkpoint) -> None:
    # transformers' GGUF loader for Llama: dequantize, then LlamaTensorProcessor un-permutes Q/K.
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    processor = gguf_utils.LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    tensors = {t.name: t for t in default_gguf_reader().tensors}
    for gguf_name, hf_name in [("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                               ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight")]:
        t = tensors[gguf_name]
        theirs = processor.process(gguf.quants.dequantize(t.data, t.tensor_type), gguf_name).weights
        assert np.array_equal(default_checkpoint.weights[hf_name].numpy(), theirs), hf_name


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path: Path) -> None:
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    transformers = pytest.importorskip("transformers")
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf_config = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64,
                                         rope_parameters={"rope_theta": 500000.0, **scaling})
    inv_freq, _ = rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    base_inv_freq = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    factors = (base_inv_freq / inv_freq.double()).numpy()
    np.testing.assert_allclose(llama3_rope_factors(scaling, 64, 500000.0), factors, rtol=1e-5)

    path = tmp_path / "llama3.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in [(writer.add_block_count, 1), (writer.add_context_length, 131072),
                       (writer.add_embedding_length, 2048), (writer.add_feed_forward_length, 8192),
                       (writer.add_head_count, 32), (writer.add_head_count_kv, 8), (writer.add_vocab_size, 128),
                       (writer.add_rope_freq_base, 500000.0), (writer.add_rope_dimension_count, 64)]:
        add(value)
    writer.add_tensor("rope_freqs.weight", factors.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_config(open_gguf(path), path).rope_scaling == scaling


# ---------------------------------------------------------------------------- errors


def test_nonexistent_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(ModelLoadError, match=f"{missing}: no such file or directory"):
        load_checkpoint(str(missing))


def test_neither_gguf_nor_hf_dir(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match=r"weights\.bin: neither a \.gguf file nor"):
        load_checkpoint(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match="config.json"):
        load_checkpoint(str(tmp_path))


def test_truncated_gguf(tmp_path: Path, tiny_gguf_path: Path) -> None:
    data = tiny_gguf_path.read_bytes()
    for size in (len(data) - 100, 64):  # inside the last tensor's data, inside the header
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(ModelLoadError, match=rf"{cut}: not a readable GGUF file \(corrupt or truncated"):
            load_checkpoint(str(cut))


def test_unknown_gguf_architecture(tmp_path: Path, tiny_hf_dir: Path) -> None:
    path = make_tiny_llama_gguf(tmp_path / "gpt2.gguf", tiny_hf_dir, arch="gpt2", tokenizer=False)
    with pytest.raises(ModelLoadError, match=rf"{path}: unsupported architecture 'gpt2'"):
        load_checkpoint(str(path))


def test_unknown_hf_architecture(tmp_path: Path, tiny_hf_dir: Path) -> None:
    model_dir = copy_hf_dir(tiny_hf_dir, tmp_path / "bert", model_type="bert")
    with pytest.raises(ModelLoadError, match=rf"{model_dir / 'config.json'}: unsupported architecture"):
        load_checkpoint(str(model_dir))


def test_missing_gguf_tensor(tmp_path: Path, tiny_hf_dir: Path) -> None:
    path = make_tiny_llama_gguf(tmp_path / "missing.gguf", tiny_hf_dir, drop_tensors=("blk.1.ffn_up.weight",),
                                tokenizer=False)
    with pytest.raises(ModelLoadError,
                       match=rf"{path}: missing tensor blk\.1\.ffn_up\.weight \(model\.layers\.1\.mlp\.up_proj"):
        load_checkpoint(str(path))


def test_missing_hf_tensor(tmp_path: Path, tiny_hf_dir: Path) -> None:
    # Claiming tied embeddings is fine (lm_head is ignored); claiming a third layer is not.
    model_dir = copy_hf_dir(tiny_hf_dir, tmp_path / "three_layers", num_hidden_layers=3)
    with pytest.raises(ModelLoadError, match=rf"{model_dir}: missing tensor model\.layers\.2\.self_attn\.q_proj"):
        load_checkpoint(str(model_dir))


def test_shape_mismatch(tmp_path: Path, tiny_hf_dir: Path) -> None:
    model_dir = copy_hf_dir(tiny_hf_dir, tmp_path / "wide", intermediate_size=96)
    with pytest.raises(ModelLoadError, match=rf"{model_dir}: tensor model\.layers\.0\.mlp\.gate_proj\.weight "
                                             r"has shape \[128, 64\], expected \[96, 64\]"):
        load_checkpoint(str(model_dir))


def copy_hf_dir(source: Path, target: Path, **config_changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    return target
