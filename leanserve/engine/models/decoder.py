"""The decoder of every supported family over a flat token batch, driven by ModelConfig.

Reads like single-sequence code: `forward(input_ids[T], positions[T])`; batch structure and the
paged KV cache reach attention through the forward context. Q/K/V and gate/up projections are
fused into one matrix product each. A layer is Llama's (norm, attention, residual, norm, gated
MLP, residual) with the family's options switched on from the config: q/k/v biases (Qwen2),
per-head q/k norms (Qwen3, Gemma 3), norms of the attention's and the MLP's outputs (Gemma),
GeGLU, soft-capping, sliding windows and per-layer rotary bases (Gemma, Mistral).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from leanserve.engine.config import ModelConfig, Rope
from leanserve.kernels.attention import AttentionOptions, get_forward_context


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
        # Normalize in float32 whatever the model dtype, as HuggingFace's norms do.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rope_inverse_frequencies(rope: Rope, dim: int, long: bool = False) -> torch.Tensor:
    """HF's inverse frequencies of a rotary embedding (LongRoPE: its short factors, or with `long` its long ones)."""
    powers = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    inv_freq = 1.0 / powers
    scaling = rope.scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "longrope":
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float32)
        return 1.0 / (factors * powers)
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
    """cos and signed sin tables of one rotary embedding, by position.

    LongRoPE (Phi-3): positions below the original context use the short factors, later ones the
    long factors (HF switches a whole forward pass by its longest position; per position, a
    sequence's cached keys keep the rotation they were computed with), both scaled by the
    attention factor."""

    def __init__(self, rope: Rope, head_dim: int, max_positions: int) -> None:
        super().__init__()
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, rope_inverse_frequencies(rope, head_dim))
        scaling, factor = rope.scaling or {}, 1.0
        if scaling.get("rope_type") == "longrope":
            original = scaling["original_max_position_embeddings"]
            long = torch.outer(positions, rope_inverse_frequencies(rope, head_dim, long=True))
            freqs = torch.where(positions[:, None] >= original, long, freqs)
            factor = scaling.get("attention_factor") or _longrope_attention_factor(max_positions / original, original)
        # Full width, HF's rotate-half layout: x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1),
        # which is roll(x, D/2) * (-sin, sin).
        cos, sin = freqs.cos(), freqs.sin()
        if factor != 1.0:
            cos, sin = cos * factor, sin * factor
        self.register_buffer("cos", torch.cat([cos] * 2, dim=-1), persistent=False)   # [max_pos, D]
        self.register_buffer("sin", torch.cat([-sin, sin], dim=-1), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin [T, 1, D] of the batch's positions."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def _longrope_attention_factor(factor: float, original: int) -> float:
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


class Rotary(nn.Module):
    """The model's distinct rotary embeddings (config.ropes), gathered once per step for all layers."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.tables = nn.ModuleList(RotaryEmbedding(rope, config.head_dim, config.max_position_embeddings)
                                    for rope in config.ropes)

    def forward(self, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [table(positions) for table in self.tables]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [T, heads, D] (in float32, whatever x's dtype)."""
    x32 = x.float()
    return torch.addcmul(x32 * cos, x32.roll(x.shape[-1] // 2, -1), sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, backend) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        # The bias is the attention's, not the linear's: quantized linears have none.
        self.qkv_bias = (nn.Parameter(torch.zeros(self.q_size + 2 * self.kv_size), requires_grad=False)
                         if config.attention_bias else None)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.options = AttentionOptions(scale=config.scale, sliding_window=config.layers[layer].sliding_window,
                                        softcap=config.attn_logit_softcap)
        self.backend = backend
        self.k_cache = self.v_cache = torch.empty(0)   # set by the model runner

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # Queries and keys rotate together, as one [T, heads + kv heads, D] tensor.
        qk = qk.reshape(-1, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :self.num_heads]), self.k_norm(qk[:, self.num_heads:])], dim=1)
        q, k = rotate(qk, *rope).split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, get_forward_context(), self.options)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.activation = config.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        gate = F.silu(gate) if self.activation == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, backend) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = Attention(config, layer, backend)
        self.post_attention_layernorm = RMSNorm(hidden, eps)          # before the MLP
        self.attn_output_norm = RMSNorm(hidden, eps) if config.sandwich_norms else None
        self.mlp_output_norm = RMSNorm(hidden, eps) if config.sandwich_norms else None
        self.mlp = MLP(config)
        self.rope_index = config.ropes.index(config.layers[layer].rope)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None,
                ropes: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); their sum is the layer's output."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, ropes[self.rope_index])
        if self.attn_output_norm is not None:
            x = self.attn_output_norm(x)
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        if self.mlp_output_norm is not None:
            x = self.mlp_output_norm(x)
        return x, residual


class DecoderForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, backend) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = Rotary(config)
        self.layers = nn.ModuleList(DecoderLayer(config, i, backend) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.requires_grad_(False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.config.embedding_scale != 1.0:
            # As HF's Gemma: the scale as a float32 tensor, cast to the model's dtype.
            x = x * torch.tensor(self.config.embedding_scale).to(x.dtype)
        return x

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat token batch (before the final norm)."""
        x, residual = self.embed(input_ids), None
        ropes = self.rotary(positions)
        for layer in self.layers:
            x, residual = layer(x, residual, ropes)
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return softcap_logits(self.lm_head(self.norm(hidden)).float(), self.config.final_logit_softcap)

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy weights in (the loader's names: HF Llama's, plus self_attn.{q,k,v}_proj.bias, self_attn.{q,k}_norm,
        attn_output_norm, mlp_output_norm), fusing q/k/v and gate/up; tie the head if the file has none."""
        cfg = self.config
        fused = dict(weights)
        for i in range(cfg.num_hidden_layers):
            p = f"model.layers.{i}."
            fused[p + "self_attn.qkv_proj.weight"] = torch.cat(
                [fused.pop(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
            fused[p + "mlp.gate_up_proj.weight"] = torch.cat(
                [fused.pop(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")])
            if cfg.attention_bias:
                fused[p + "self_attn.qkv_bias"] = torch.cat([fused.pop(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
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


def softcap_logits(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) where the model soft-caps its logits (Gemma 2), as HF computes it."""
    return logits if cap is None else torch.tanh(logits / cap) * cap
