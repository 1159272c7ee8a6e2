"""How a step's layers run, chosen once at load.

NativeExecutor: the C++ executor (leanserve/kernels/cpu/executor.h) with the model's weights and KV
caches bound once; each step is planned once (its lean-attention tiles and prefill items) and all
decoder layers run in one call. Each layer is described to it once, from the torch model's own
modules: the family's optional parts (biases, q/k norms, output norms) are tensors or None, its
window and rotary table are numbers. Linears multiply int4 and int8 weights as stored, on integer
dot products, or float32 weights with torch's GEMM.

TorchExecutor: the plain torch model with an attention backend (torch on the CPU, Triton on a GPU):
the reference the native executor is tested against, and the fallback where it cannot run (no C++
compiler, a GPU, bfloat16 activations, LLM.int8 linears).
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from leanserve.engine.models.decoder import DecoderForCausalLM
from leanserve.kernels.attention import AttentionBackend, AttentionMetadata, forward_context
from leanserve.kernels.cpu_kernels import native_kernels
from leanserve.kernels.quant import Int4Linear, Int8Linear, QuantLinear, unpack_int4


class Executor(Protocol):
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat token batch (before the final norm); writes its keys and
        values into the KV cache."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, vocab] of hidden states [B, hidden]."""

    def describe(self) -> dict[str, str]:
        """What runs each operation, for the load log, /metrics and `leanserve env`."""


class TorchExecutor:
    def __init__(self, model: DecoderForCausalLM, backend: AttentionBackend, reason: str) -> None:
        self.model, self.backend, self.reason = model, backend, reason

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        self.backend.prepare(md)
        with forward_context(md):
            return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden)

    def describe(self) -> dict[str, str]:
        formats = sorted({getattr(m, "format", "float") for m in self.model.modules()
                          if isinstance(m, nn.Linear | QuantLinear)})
        dtype = str(self.model.embed_tokens.weight.dtype).removeprefix("torch.")
        linear = ", ".join(f"{f} (dequantized to {dtype})" if f in ("int4", "int8") else f for f in formats)
        return {"executor": f"torch ({self.reason})", "linear": f"torch: {linear}",
                "attention": type(self.backend).__name__}


def _weight(norm: nn.Module | None) -> torch.Tensor | None:
    return None if norm is None else norm.weight


def native_linear(module: nn.Module, kernels):
    """The executor's linear for a model module, or a string saying why the executor cannot take it.
    Scales and mins go to the kernel as the values they are (it packs float16 where they all are
    float16 values, else float32: linear.h)."""
    if isinstance(module, Int4Linear | Int8Linear):
        if any(t is not None and t.dtype not in (torch.float16, torch.bfloat16, torch.float32)
               for t in (module.scales, module.mins)):
            return f"{module.format} {module}: scales or mins of type {module.scales.dtype} (float16 or float32 only)"
    if isinstance(module, Int4Linear):
        return kernels.Linear.quantized(*kernels.pack_int4(unpack_int4(module.qweight), module.scales, module.mins),
                                        module.group_size, module.out_features)
    if isinstance(module, Int8Linear):
        group = module.group_size or module.in_features           # per channel: one group of all of K
        scales = module.scales if module.group_size else module.scales[:, None]
        if not (group == 16 or group % 32 == 0):
            return f"int8 {module}: groups of {group} (the kernel takes 16 or a multiple of 32)"
        return kernels.Linear.quantized(*kernels.pack_int8(module.weight, scales, module.mins), group,
                                        module.out_features)
    if type(module) is nn.Linear and module.weight.dtype == torch.float32:
        return kernels.Linear.dense(module.weight)
    return f"{type(module).__name__} ({getattr(module, 'format', module.weight.dtype)}) has no native kernel"


class NativeExecutor:
    def __init__(self, model: DecoderForCausalLM, kernels, layers: list, lm_head, tile_size: int,
                 batch_invariant: bool) -> None:
        cfg = model.config
        self.model, self.kernels, self.batch_invariant = model, kernels, batch_invariant
        self.native = kernels.Executor(layers, lm_head, model.norm.weight, cfg.num_attention_heads,
                                       cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps, tile_size,
                                       batch_invariant, scale=cfg.scale, attn_softcap=cfg.attn_logit_softcap,
                                       activation=cfg.hidden_act, final_softcap=cfg.final_logit_softcap)

    @classmethod
    def build(cls, model: DecoderForCausalLM, tile_size: int = 128, batch_invariant: bool = False) -> NativeExecutor | str:
        """The executor for `model` (its caches set), or a string saying why there is none. batch_invariant:
        every token through the prefill attention kernel, so that its logits are the same bits in any batch."""
        if model.embed_tokens.weight.device.type != "cpu" or model.embed_tokens.weight.dtype != torch.float32:
            return "the native executor runs float32 activations on the CPU"
        kernels = native_kernels()
        if kernels is None:
            return "no native CPU kernels (LEANSERVE_NATIVE_KERNELS=0, or no C++ compiler)"
        if model.config.head_dim % 16:
            return f"head_dim {model.config.head_dim} is not a multiple of 16"
        layers = []
        for layer in model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = [native_linear(m, kernels) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if reason := next((x for x in linears if isinstance(x, str)), None):
                return reason
            layers.append(kernels.DecoderLayer(
                layer.input_layernorm.weight, layer.post_attention_layernorm.weight, *linears, attn.k_cache,
                attn.v_cache, attn_output_norm=_weight(layer.attn_output_norm),
                mlp_output_norm=_weight(layer.mlp_output_norm), qkv_bias=attn.qkv_bias, q_norm=_weight(attn.q_norm),
                k_norm=_weight(attn.k_norm), window=attn.options.sliding_window, rope=layer.rope_index))
        lm_head = native_linear(model.lm_head, kernels)
        if isinstance(lm_head, str):
            return "LM head: " + lm_head
        return cls(model, kernels, layers, lm_head, tile_size, batch_invariant)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        plan = self.native.plan(md.query_starts, md.query_lens, md.context_lens, md.block_tables, md.slot_mapping)
        return self.native.forward(self.model.embed(input_ids), self.model.rotary(positions), plan)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.native.logits(hidden)

    def describe(self) -> dict[str, str]:
        isa = self.kernels.ISA
        attention = ("flash attention's arithmetic for every token (batch-invariant)" if self.batch_invariant
                     else "lean attention (decode), flash attention (prefill)")
        return {"executor": f"native ({isa})",
                "linear": f"native {isa}: int4/int8 blocks as stored, 16-bit activations",
                "attention": f"native {isa}: {attention} on the paged cache"}

    @property
    def dense_linears(self) -> int:
        """float32 linears (torch's matmul, whose sums may be ordered by the batch's size)."""
        return sum(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in self.model.modules())
