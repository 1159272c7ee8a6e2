"""Llama-family decoder over a flat token batch.

Reads like single-sequence code: `forward(input_ids[T], positions[T])`; batch
structure and the paged KV cache reach attention through the forward context.
Q/K/V and gate/up projections are fused into one matrix product each.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from leanserve.engine.config import ModelConfig
from leanserve.kernels.attention import get_forward_context


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(x + residual), x + residual): a layer's residual add and the next norm."""
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalize in float32 whatever the model dtype, as HuggingFace's LlamaRMSNorm does.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope scaling type {kind!r}")


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inverse_frequencies(config))
        # Full width, HF's rotate-half layout: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1),
        # which is roll(x, D/2) * (-sin, sin).
        self.register_buffer("cos", torch.cat([freqs.cos()] * 2, dim=-1), persistent=False)   # [max_pos, D]
        self.register_buffer("sin", torch.cat([-freqs.sin(), freqs.sin()], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, 1, D] of the batch's positions, gathered once per step for all layers."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [T, heads, D] (in float32, whatever x's dtype)."""
    x32 = x.float()
    return torch.addcmul(x32 * cos, x32.roll(x.shape[-1] // 2, -1), sin).to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, backend) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.backend = backend
        self.k_cache = self.v_cache = torch.empty(0)   # set by the model runner

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # Queries and keys rotate together, as one [T, heads + kv heads, D] tensor.
        qk = rotate(qk.reshape(-1, self.num_heads + self.num_kv_heads, self.head_dim), *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, get_forward_context())
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); their sum is the layer's output."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, rope), residual)
        return self.mlp(x), residual


class DecoderForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backend) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, backend) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat token batch (before the final norm)."""
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary(positions)
        for layer in self.layers:
            x, residual = layer(x, residual, rope)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden)).float()

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy HuggingFace-named weights in, fusing q/k/v and gate/up; tie the head if the file has none."""
        cfg = self.config
        fused = dict(weights)
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            fused[p + "self_attn.qkv_proj.weight"] = torch.cat(
                [fused.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            fused[p + "mlp.gate_up_proj.weight"] = torch.cat(
                [fused.pop(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")])
        if "lm_head.weight" not in fused:
            fused["lm_head.weight"] = fused["model.embed_tokens.weight"]
        for name, param in self.named_parameters():
            source = fused[name if name.startswith("lm_head.") else "model." + name]
            if source.shape != param.shape:
                raise ValueError(f"weight {name}: expected shape {tuple(param.shape)}, found {tuple(source.shape)}")
            # A fresh copy: torch aligns its allocations to 64 bytes, which GEMV needs to run at speed.
            param.data = source.to(param.dtype, copy=True).contiguous()
        if cfg.tie_word_embeddings or "lm_head.weight" not in weights:
            self.lm_head.weight = self.embed_tokens.weight
