"""Model hyper-parameters, one dataclass for every supported architecture and checkpoint format.

A decoder layer of every supported family is the same skeleton (RMSNorm, rotary attention with
GQA, a gated MLP, residual adds); `ModelConfig` says which of its options a family switches on
(biases, norms, activation, soft-capping, scales) and `layers` what differs from layer to layer
(sliding window, rotary base). That one description drives the torch model and the native executor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
    rope_theta: float                     # the global (full-attention) layers' rotary embedding;
    rope_scaling: dict | None             # `layers` holds each layer's own
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
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        for name in ("attn_logit_softcap", "final_logit_softcap", "attention_scale"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, got {value!r}")
        if self.attention_scale is None:
            self.attention_scale = self.head_dim ** -0.5
        if not self.layers:
            self.layers = (LayerSpec(Rope(self.rope_theta, self.rope_scaling)),) * self.num_hidden_layers
        self.layers = tuple(self.layers)
        if len(self.layers) != self.num_hidden_layers:
            raise ValueError(f"{len(self.layers)} layer specs for {self.num_hidden_layers} layers")
        for rope in self.ropes:
            _check_rope(rope, self.head_dim)
        for spec in self.layers:
            if spec.sliding_window is not None and (not isinstance(spec.sliding_window, int) or spec.sliding_window <= 0):
                raise ValueError(f"sliding_window must be a positive integer or None, got {spec.sliding_window!r}")

    @property
    def scale(self) -> float:
        """The attention's score scale."""
        return self.attention_scale

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
        """Build from a HuggingFace `config.json` dict (transformers 4 or 5 layout) of a supported family."""
        model_type = hf.get("model_type")
        if model_type not in HF_FAMILIES:
            raise ValueError(f"unsupported architecture: model_type {model_type!r} (architectures "
                             f"{hf.get('architectures')}); supported: {sorted(HF_FAMILIES)}")
        if hf.get("mlp_bias"):
            raise ValueError(f"unsupported {model_type} variant: mlp_bias is true")
        if hf.get("attention_bias") and model_type not in ("llama", "qwen2"):
            raise ValueError(f"unsupported {model_type} variant: attention_bias is true")
        if (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError(f"unsupported {model_type} variant: partial rotary embeddings (partial_rotary_factor)")
        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"num_attention_heads ({heads}) must divide hidden_size ({hidden})")
            head_dim = hidden // heads
        gemma = model_type in ("gemma2", "gemma3_text")
        layer_types = _hf_layer_types(hf, model_type)
        ropes = {kind: _hf_rope(hf, kind, model_type) for kind in set(layer_types)}
        window = hf.get("sliding_window")
        layers = tuple(LayerSpec(ropes[kind], window if kind == "sliding_attention" else None) for kind in layer_types)
        full = ropes.get("full_attention", layers[0].rope)
        activation = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        return cls(
            architecture=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=full.theta,
            rope_scaling=full.scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            attention_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            sandwich_norms=gemma,
            hidden_act=_HF_ACTIVATIONS.get(activation, activation),
            embedding_scale=hidden ** 0.5 if gemma else 1.0,
            attention_scale=hf["query_pre_attn_scalar"] ** -0.5 if gemma else None,
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            layers=layers,
        )


# model_type -> what it is; gemma3 is Gemma 3's multimodal wrapper, whose text model is gemma3_text.
HF_FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma 2",
               "gemma3_text": "Gemma 3", "phi3": "Phi-3"}
_HF_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh"}


def _hf_layer_types(hf: dict[str, Any], model_type: str) -> list[str]:
    """"full_attention" or "sliding_attention" for each layer, as transformers derives them."""
    n = hf["num_hidden_layers"]
    if hf.get("layer_types"):
        types = list(hf["layer_types"])
        if len(types) != n or not set(types) <= {"full_attention", "sliding_attention"}:
            raise ValueError(f"layer_types must name full_attention or sliding_attention for each of {n} layers")
        return types if hf.get("sliding_window") else ["full_attention"] * n
    if not hf.get("sliding_window"):
        return ["full_attention"] * n
    if model_type == "gemma2":
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if model_type == "gemma3_text":
        pattern = hf.get("sliding_window_pattern", 6)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if model_type in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window"):
            return ["full_attention"] * n
        first = hf.get("max_window_layers", n)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    return ["sliding_attention"] * n      # Mistral, Phi-3: every layer


def _hf_rope(hf: dict[str, Any], layer_type: str, model_type: str) -> Rope:
    """The rotary embedding of one layer type: transformers 5's rope_parameters (per layer type where the
    model has two), or the older top-level rope_theta, rope_scaling and Gemma 3's rope_local_base_freq."""
    parameters = hf.get("rope_parameters") or {}
    if layer_type in parameters:
        parameters = parameters[layer_type]
    if parameters:
        theta, scaling = parameters.get("rope_theta", 10000.0), parameters
    elif model_type == "gemma3_text" and layer_type == "sliding_attention":
        theta, scaling = hf.get("rope_local_base_freq", 10000.0), None
    else:
        theta, scaling = hf.get("rope_theta", 10000.0), hf.get("rope_scaling")
    scaling = _normalize_rope_scaling(scaling)
    if scaling is not None and scaling["rope_type"] == "longrope":
        # Phi-3 keeps the original context beside the scaling; the factor is the context's growth.
        scaling.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    return Rope(float(theta), scaling)


def _check_rope(rope: Rope, head_dim: int) -> None:
    if not rope.theta > 0:
        raise ValueError(f"rope_theta must be positive, got {rope.theta}")
    if rope.scaling is None:
        return
    rope_type = rope.scaling.get("rope_type")
    if rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: {sorted(ROPE_SCALING_KEYS)}")
    missing = [k for k in ROPE_SCALING_KEYS[rope_type] if rope.scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")
    if not rope.scaling.get("factor", 1.0) > 0:
        raise ValueError(f"rope_scaling factor must be positive, got {rope.scaling['factor']}")
    for key in ("short_factor", "long_factor"):
        if key in rope.scaling and len(rope.scaling[key]) != head_dim // 2:
            raise ValueError(f"rope_scaling {key} must have head_dim / 2 = {head_dim // 2} entries")


def _normalize_rope_scaling(rope_scaling: dict | None) -> dict | None:
    """Older configs spell `rope_type` as `type`; "default" means no scaling."""
    scaling = {k: v for k, v in (rope_scaling or {}).items() if k not in ("rope_theta", "partial_rotary_factor")}
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    for key in ("short_factor", "long_factor"):      # used as float32, as GGUF stores them
        if key in scaling:
            scaling[key] = [float(np.float32(x)) for x in scaling[key]]
    return None if not scaling or scaling.get("rope_type") == "default" else scaling
