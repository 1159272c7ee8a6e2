"""Model hyper-parameters, one dataclass for every supported architecture and checkpoint format.

A decoder layer of every supported family is the same skeleton (RMSNorm, rotary attention with
GQA, a gated MLP, residual adds); `ModelConfig` says which of its options a family switches on
(biases, norms, activation, soft-capping, scales) and `layers` what differs from layer to layer
(sliding window, rotary base). That one description drives the torch model and the native executor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# RoPE scaling variants the model code implements, with the keys each needs
# (HuggingFace's `rope_scaling` format).
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
ACTIVATIONS = ("silu", "gelu_tanh")      # the gated MLP's: SwiGLU, or GeGLU with tanh-approximated GELU


@dataclass(frozen=True)
class Rope:
    """A rotary embedding: base and scaling (HF `rope_scaling` dict, None for none)."""

    theta: float
    scaling: dict | None = None

    def __hash__(self) -> int:
        return hash((self.theta, repr(self.scaling)))


@dataclass(frozen=True)
class LayerSpec:
    """What may differ between decoder layers: the attention window and the rotary embedding."""

    rope: Rope
    sliding_window: int | None = None    # attends to the last `sliding_window` positions, its own included

# HF config fields that mean "not plain Llama": the loader has no tensors for these.
_UNSUPPORTED_HF_FLAGS = ("attention_bias", "mlp_bias")


@dataclass
class ModelConfig:
    """A decoder-only transformer: RMSNorm, rotary attention with GQA, a gated MLP; the family's options.

    Norm weights are taken as the multipliers they are: Gemma's (1 + w) is folded in at load."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False          # q/k/v projections with biases (Qwen2)
    qk_norm: bool = False                 # RMSNorm over each head of q and k before rotary (Qwen3, Gemma 3)
    sandwich_norms: bool = False          # RMSNorm of the attention's and the MLP's outputs too (Gemma 2, 3)
    hidden_act: str = "silu"
    embedding_scale: float = 1.0          # Gemma: sqrt(hidden_size)
    attention_scale: float | None = None  # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    attn_logit_softcap: float | None = None   # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None
    layers: tuple[LayerSpec, ...] = field(default=())   # () : every layer global, rope_theta / rope_scaling

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type not in ROPE_SCALING_KEYS:
                raise ValueError(f"unsupported rope_scaling type {rope_type!r}; "
                                 f"supported: {sorted(ROPE_SCALING_KEYS)}")
            missing = [k for k in ROPE_SCALING_KEYS[rope_type] if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")
            if not self.rope_scaling.get("factor", 1.0) > 0:
                raise ValueError(f"rope_scaling factor must be positive, got {self.rope_scaling['factor']}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        for name in ("attn_logit_softcap", "final_logit_softcap", "attention_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        if not self.layers:
            self.layers = (LayerSpec(Rope(self.rope_theta, self.rope_scaling)),) * self.num_hidden_layers
        self.layers = tuple(self.layers)
        if len(self.layers) != self.num_hidden_layers:
            raise ValueError(f"{len(self.layers)} layer specs for {self.num_hidden_layers} layers")
        for spec in self.layers:
            if spec.sliding_window is not None and (not isinstance(spec.sliding_window, int) or spec.sliding_window <= 0):
                raise ValueError(f"sliding_window must be a positive integer or None, got {spec.sliding_window!r}")

    @property
    def scale(self) -> float:
        """The attention's score scale."""
        return self.attention_scale if self.attention_scale is not None else self.head_dim ** -0.5

    @property
    def ropes(self) -> list[Rope]:
        """The distinct rotary embeddings of the layers, in order of first use."""
        return list(dict.fromkeys(spec.rope for spec in self.layers))

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a HuggingFace `config.json` dict of a Llama-family model."""
        model_type = hf.get("model_type")
        # Mistral without a sliding window is Llama with other defaults; anything else
        # (qwen2's biases, gemma's norms, ...) needs model code we do not have.
        if not (model_type == "llama" or (model_type == "mistral" and hf.get("sliding_window") is None)):
            raise ValueError(f"unsupported architecture: model_type {model_type!r} "
                             f"(architectures {hf.get('architectures')}); only Llama-family models load")
        for flag in _UNSUPPORTED_HF_FLAGS:
            if hf.get(flag):
                raise ValueError(f"unsupported Llama variant: {flag} is true")
        # transformers 5 writes rope settings into `rope_parameters`, older versions at top level.
        rope_parameters = hf.get("rope_parameters") or {}
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"num_attention_heads ({heads}) must divide hidden_size ({hidden})")
            head_dim = hidden // heads
        return cls(
            architecture="llama",
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(hf.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))),
            rope_scaling=_normalize_rope_scaling(hf.get("rope_scaling") or rope_parameters),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )


def _normalize_rope_scaling(rope_scaling: dict | None) -> dict | None:
    """Older configs spell `rope_type` as `type`; "default" means no scaling."""
    scaling = {k: v for k, v in (rope_scaling or {}).items() if k != "rope_theta"}
    if "rope_type" not in scaling and "type" in scaling:
        scaling["rope_type"] = scaling.pop("type")
    return None if not scaling or scaling.get("rope_type") == "default" else scaling
