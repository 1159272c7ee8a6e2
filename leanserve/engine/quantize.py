"""Quantized weights for a loaded Llama: module swap at load, and offline checkpoints.

Modes (EngineConfig.quantization):
  "int8"      int8 weight-only per output channel: decoder linears and the LM head.
  "int4"      GGUF blocks as stored, others int4: decoder linears and the LM head whose GGUF
              blocks have a native kernel (GGUF_NATIVE: Q4_0, Q4_1, Q4_K as int4; Q5_0, Q5_1,
              Q5_K, Q6_K, Q8_0 as int8; no re-rounding) keep them; other decoder linears are
              quantized to int4 with `group_size`, another LM head to int8 per channel.
  "llm_int8"  LLM.int8() W8A8 with float outlier columns: decoder linears (the LM head
              stays float, as in bitsandbytes).
  "float"     no quantization: the float weights (dequantized, for a quantized file).
  None        the checkpoint's own choice (`default_quantization`).

The model is built and loaded in float first (load_weights fuses q/k/v and gate/up);
`quantize_model` then replaces its nn.Linear modules, building fused modules from the
parts' GGUF blocks stacked along N (parts of different types in one format that holds them
all: `stack_rows`), or from the float weights; the load log names the modules whose GGUF
types have no native kernel (Q2_K, Q3_K, IQ*, ...). `save_quantized` writes the swapped
modules' buffers to a HuggingFace-like directory that loads back without re-quantizing.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from leanserve.engine.config import ModelConfig
from leanserve.engine.engine_config import QUANTIZATION_CHOICES
from leanserve.engine.loader import Checkpoint, gguf_block_rows, load_checkpoint
from leanserve.engine.models.decoder import DecoderForCausalLM
from leanserve.kernels.quant import (
    GGUF_NATIVE,
    GROUP_SIZES,
    LLM_INT8_THRESHOLD,
    QUANT_LINEARS,
    Int4Linear,
    Int8Linear,
    LLMInt8Linear,
    QuantLinear,
    gguf_linear,
)

log = logging.getLogger("leanserve.engine")

Q = gguf.GGMLQuantizationType
MODES = ("int8", "int4", "llm_int8")
CHOICES = QUANTIZATION_CHOICES                 # MODES and "float"
METADATA_MODE = "leanserve.quantization"      # safetensors metadata of a quantized checkpoint
METADATA_MODULES = "leanserve.modules"        # JSON: module name -> format ("int8", "int4", "llm_int8")
METADATA_THRESHOLD = "leanserve.llm_int8_threshold"
METADATA_EMBEDDING = "leanserve.embedding_from"   # "lm_head": the tied embedding is the head's dequantized weight
_GGUF_FLOAT = frozenset({Q.F32, Q.F16, Q.BF16, Q.F64})     # float tensors: no blocks to keep
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def check_mode(quantization: str | None) -> None:
    if quantization is not None and quantization not in CHOICES:
        raise ValueError(f"quantization must be None or one of {list(CHOICES)}, got {quantization!r}")


@dataclass
class QuantizedWeights:
    """A quantized checkpoint's modules, as saved: HF module name -> module."""

    mode: str
    modules: dict[str, QuantLinear] = field(default_factory=dict)


# ------------------------------------------------------------------------------ choosing a mode


def default_quantization(checkpoint: Checkpoint) -> str:
    """What `quantization=None` loads: a quantized checkpoint as saved; a GGUF file whose decoder
    linears are all blocks with a native kernel (GGUF_NATIVE) as "int4", which takes them as stored
    (on the default model, Q4_1: about 10x faster decode at batch 1 than float32, perplexity -0.002%
    from float32's, since the CPU's kernel keeps the blocks' exact scales); anything else in float32."""
    if checkpoint.quantized is not None:
        return checkpoint.quantized.mode
    types = {t.tensor_type for name, t in checkpoint.gguf_tensors.items()
             if name.startswith("model.layers.") and name.endswith("_proj.weight")}
    return "int4" if types and types <= GGUF_NATIVE else "float"


def resolve_quantization(requested: str | None, checkpoint: Checkpoint) -> str:
    """The mode to load `checkpoint` with; ValueError for re-quantizing a quantized checkpoint."""
    check_mode(requested)
    if requested is None:
        return default_quantization(checkpoint)
    saved = checkpoint.quantized
    if saved is not None and requested not in ("float", saved.mode):
        raise ValueError(f"{checkpoint.path} is already quantized as {saved.mode!r}; load it with quantization=None "
                         f"(or 'float'), or quantize the original model to {requested!r}")
    return requested


# ------------------------------------------------------------------------------ the module swap


def _hf_module_name(name: str) -> str:
    """HF name of a model module or tensor: "layers.0.mlp.down_proj" -> "model.layers.0.mlp.down_proj"."""
    return name if name.split(".")[0] == "lm_head" else "model." + name


def _part_names(name: str, checkpoint: Checkpoint | None) -> list[str]:
    """HF weight names of the checkpoint tensors that make up module `name` (fused: several)."""
    if name == "lm_head":
        tied = checkpoint is not None and "lm_head.weight" not in checkpoint.weights \
            and "lm_head.weight" not in checkpoint.gguf_tensors
        return ["model.embed_tokens.weight" if tied else "lm_head.weight"]
    parent, leaf = name.rsplit(".", 1)
    return [f"model.{parent}.{part}.weight" for part in _FUSED.get(leaf, (leaf,))]


def _gguf_types(name: str, checkpoint: Checkpoint | None) -> list[Q] | None:
    """The GGUF types of module `name`'s parts, or None where it is not all in the GGUF file."""
    if checkpoint is None or not checkpoint.gguf_tensors:
        return None
    tensors = [checkpoint.gguf_tensors.get(part) for part in _part_names(name, checkpoint)]
    return None if any(t is None for t in tensors) else [t.tensor_type for t in tensors]


def _gguf_blocks(name: str, checkpoint: Checkpoint | None) -> list[tuple[np.ndarray, Q]] | None:
    """Module `name`'s parts as (GGUF block rows, type), where every part is blocks of GGUF_NATIVE."""
    types = _gguf_types(name, checkpoint)
    if types is None or not set(types) <= GGUF_NATIVE:
        return None
    tensors = {part: checkpoint.gguf_tensors[part] for part in _part_names(name, checkpoint)}
    return [(gguf_block_rows(part, t, checkpoint.config), t.tensor_type) for part, t in tensors.items()]


def _float_weight(name: str, linear: nn.Linear, checkpoint: Checkpoint | None) -> torch.Tensor:
    """The float32 weight, from the checkpoint (before any cast to the model dtype) where it has it."""
    if checkpoint is not None:
        parts = [checkpoint.weights.get(part) for part in _part_names(name, checkpoint)]
        if all(p is not None for p in parts):
            return torch.cat(parts).float()
    return linear.weight.float()


def _quantized_module(name: str, linear: nn.Linear, mode: str, checkpoint: Checkpoint | None,
                      group_size: int) -> QuantLinear | None:
    """Module `name` quantized for `mode`, or None where the mode keeps it float."""
    if checkpoint is not None and checkpoint.quantized is not None:
        return checkpoint.quantized.modules.get(_hf_module_name(name))
    head = name == "lm_head"
    if mode == "llm_int8":
        return None if head else LLMInt8Linear.from_float(_float_weight(name, linear, checkpoint))
    if mode == "int8":
        return Int8Linear.from_float(_float_weight(name, linear, checkpoint))
    blocks = _gguf_blocks(name, checkpoint)
    if blocks is not None:
        return gguf_linear(blocks, linear.in_features)
    if head:
        return Int8Linear.from_float(_float_weight(name, linear, checkpoint))
    if linear.in_features % group_size:
        log.warning("%s: in_features %d is not a multiple of group size %d; kept in float",
                    name, linear.in_features, group_size)
        return None
    return Int4Linear.from_float(_float_weight(name, linear, checkpoint), group_size)


def quantize_model(model: DecoderForCausalLM, mode: str, checkpoint: Checkpoint | None = None,
                   group_size: int = 32, device: str | torch.device = "cpu") -> dict[str, str]:
    """Replace the loaded float model's decoder linears (and LM head, per mode) in place.

    `checkpoint` supplies the float32 weights, the GGUF blocks or a quantized checkpoint's
    modules; without it modules quantize `linear.weight`. Returns HF module name -> format.
    """
    check_mode(mode)
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    formats: dict[str, str] = {}
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and (name.startswith("layers.") or name == "lm_head")]
    if mode in ("int4", "float"):             # the modes that would take GGUF blocks as stored
        _log_gguf_types_without_kernels([name for name, _ in targets], checkpoint, mode)
    if mode == "float":
        return formats
    for name, linear in targets:
        quantized = _quantized_module(name, linear, mode, checkpoint, group_size)
        if quantized is None:
            continue
        if (quantized.out_features, quantized.in_features) != tuple(linear.weight.shape):
            raise ValueError(f"{name}: quantized weight is {quantized.out_features}x{quantized.in_features}, "
                             f"the model wants {tuple(linear.weight.shape)}")
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, quantized.to(device))
        formats[_hf_module_name(name)] = quantized.format
    log.info("quantized %d modules (%s)", len(formats),
             ", ".join(f"{n} {fmt}" for fmt, n in sorted(Counter(formats.values()).items())))
    return formats


def _log_gguf_types_without_kernels(names: list[str], checkpoint: Checkpoint | None, mode: str) -> None:
    """Name the quantized GGUF modules that cannot be taken as stored, for a part of a type without a
    native kernel (Q2_K, Q3_K, IQ*, ...; or a float part beside blocks), and how they load."""
    without = {}
    for name in names:
        types = _gguf_types(name, checkpoint) or []
        if types and not set(types) <= GGUF_NATIVE and not set(types) <= _GGUF_FLOAT:
            without[_hf_module_name(name)] = "+".join(t.name for t in types)
    if without:
        how = ("loaded dequantized (float)" if mode == "float"
               else "quantized from their dequantized weights (int4; the LM head int8)")
        log.warning("%d modules have GGUF types without a native kernel, %s: %s", len(without), how,
                    ", ".join(f"{module} {types}" for module, types in without.items()))


# ------------------------------------------------------------------------------ offline checkpoints


def saved_quantization(file: Path) -> str | None:
    """The mode a safetensors file was quantized with by `save_quantized`, else None."""
    try:
        with safe_open(file, framework="pt") as f:
            return (f.metadata() or {}).get(METADATA_MODE)
    except Exception:  # noqa: BLE001 - unreadable: the plain loader reports it
        return None


def read_quantized(files: list[Path], config: ModelConfig) -> tuple[dict[str, torch.Tensor], QuantizedWeights]:
    """A saved quantized checkpoint: float32 weights under HF names (quantized modules dequantized
    and split into their parts, for load_weights) and the quantized modules, built from their buffers."""
    tensors, metadata = {}, {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            metadata.update(f.metadata() or {})
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    mode = metadata[METADATA_MODE]
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r} in the safetensors metadata")
    formats = json.loads(metadata.get(METADATA_MODULES, "{}"))
    quantized = QuantizedWeights(mode)
    for module, fmt in formats.items():
        if fmt not in QUANT_LINEARS:
            raise ValueError(f"module {module}: unknown quantized format {fmt!r}")
        buffers = {name[len(module) + 1:]: tensors.pop(name) for name in list(tensors) if name.startswith(module + ".")}
        options = {}
        if fmt == "llm_int8":
            options["threshold"] = float(metadata.get(METADATA_THRESHOLD, LLM_INT8_THRESHOLD))
        try:
            quantized.modules[module] = QUANT_LINEARS[fmt](**buffers, **options)
        except TypeError as e:
            raise ValueError(f"module {module}: buffers {sorted(buffers)} do not make a {fmt} module") from e
    weights = {name: t.float() for name, t in tensors.items()}
    for module_name, module in quantized.modules.items():
        weight = module.dequantize()
        parent, _, leaf = module_name.rpartition(".")
        if leaf in _FUSED:
            sizes = ([config.q_size, config.kv_size, config.kv_size] if leaf == "qkv_proj"
                     else [config.intermediate_size] * 2)
            for part, chunk in zip(_FUSED[leaf], weight.split(sizes)):
                weights[f"{parent}.{part}.weight"] = chunk.contiguous()
        elif module_name != "lm_head" or not config.tie_word_embeddings:
            weights[module_name + ".weight"] = weight
        if module_name == "lm_head" and metadata.get(METADATA_EMBEDDING) == "lm_head":
            weights["model.embed_tokens.weight"] = weight
    return weights, quantized


def hf_config(config: ModelConfig) -> dict:
    """A HuggingFace `config.json` dict that `ModelConfig.from_hf_config` reads back to `config`."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim, "rms_norm_eps": config.rms_norm_eps, "rope_theta": config.rope_theta,
            "rope_scaling": config.rope_scaling, "max_position_embeddings": config.max_position_embeddings,
            "tie_word_embeddings": config.tie_word_embeddings, "torch_dtype": "float32"}


def save_quantized(model: str, out: str | Path, mode: str, group_size: int = 32,
                   threshold: float = LLM_INT8_THRESHOLD) -> dict[str, str]:
    """Quantize `model` (alias, GGUF file or HF directory) as at load time and write `out`:
    config.json, tokenizer files and model.safetensors (quantized buffers, float norms and
    embedding, metadata naming the format). Returns HF module name -> format."""
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {list(MODES)}, got {mode!r}")
    checkpoint = load_checkpoint(model)
    if checkpoint.config.architecture != "llama":
        # hf_config writes a Llama config.json; the other families' options would be lost.
        raise ValueError(f"{checkpoint.path}: leanserve quantize writes Llama-family checkpoints; serve this "
                         f"{checkpoint.config.architecture} model directly (a GGUF file's blocks run as stored)")
    if checkpoint.quantized is not None:
        raise ValueError(f"{checkpoint.path} is already quantized ({checkpoint.quantized.mode})")
    float_model = DecoderForCausalLM(checkpoint.config, backend=None)
    float_model.load_weights(checkpoint.weights)
    formats = quantize_model(float_model, mode, checkpoint, group_size)
    if mode == "llm_int8":
        for module in float_model.modules():
            if isinstance(module, LLMInt8Linear):
                module.threshold = threshold
    tensors = {_hf_module_name(name): p.contiguous() for name, p in float_model.named_parameters()}
    for name, module in float_model.named_modules():
        if isinstance(module, QuantLinear):
            tensors.update({f"{_hf_module_name(name)}.{buffer}": t for buffer, t in module.state_dict().items()})
    metadata = {"format": "pt", METADATA_MODE: mode, METADATA_MODULES: json.dumps(formats),
                METADATA_THRESHOLD: str(threshold)}
    head = float_model.lm_head
    if (checkpoint.config.tie_word_embeddings and isinstance(head, QuantLinear)
            and torch.equal(head.dequantize(), float_model.embed_tokens.weight.float())):
        # A tied embedding the quantized head holds exactly (GGUF Q8_0): stored once.
        del tensors["model.embed_tokens.weight"]
        metadata[METADATA_EMBEDDING] = "lm_head"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata=metadata)
    config = {**hf_config(checkpoint.config),
              "quantization_config": {"quant_method": "leanserve", "mode": mode, "group_size": group_size}}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _save_tokenizer(checkpoint, out)
    return formats


def _save_tokenizer(checkpoint: Checkpoint, out: Path) -> None:
    tokenizer = checkpoint.tokenizer
    tokenizer.backend.save(str(out / "tokenizer.json"))
    token = tokenizer.backend.id_to_token
    tokenizer_config = {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
                        "pad_token": token(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else None,
                        "add_bos_token": tokenizer.add_bos_token, "chat_template": tokenizer.chat_template,
                        "model_max_length": checkpoint.config.max_position_embeddings}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    eos += sorted(tokenizer.eos_token_ids - set(eos))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": tokenizer.bos_token_id,
                                                            "eos_token_id": eos}, indent=2))
