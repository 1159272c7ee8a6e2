"""Engine configuration, validated once."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
KV_CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
QUANTIZATION_CHOICES = ("int8", "int4", "llm_int8", "float")   # weight formats (leanserve.engine.quantize)


@dataclass
class EngineConfig:
    model: str = "smollm2"
    dtype: str = "float32"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None       # default: the model's context length
    kv_cache_tokens: int | None = None     # default: a share of available memory
    kv_cache_memory_fraction: float = 0.2
    block_size: int = 16
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    seed: int = 0
    device: str = "cpu"                    # "cuda" runs the model and cache on the GPU
    # "auto": the native executor where it runs, else the torch model (Triton attention on a GPU); "torch"
    # or "triton": the torch model with that attention (the reference; Triton runs interpreted on the CPU)
    attention_backend: str = "auto"
    quantization: str | None = None       # "int8", "int4", "llm_int8", "float"; None: the checkpoint's choice
    kv_cache_dtype: str = "auto"           # "float32", "float16", "bfloat16"; "auto": see kv_cache_torch_dtype
    # Every request's logits the same bits whatever else is in its steps (needs the native executor).
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens ({self.kv_cache_tokens}) must hold at least one block of {self.block_size}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ValueError(f"attention_backend must be 'auto', 'torch' or 'triton', got {self.attention_backend!r}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization must be None or one of {list(QUANTIZATION_CHOICES)}, "
                             f"got {self.quantization!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be 'auto' or one of {sorted(KV_CACHE_DTYPES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.kv_cache_dtype not in ("auto", self.dtype) and (self.device != "cpu" or self.attention_backend == "triton"):
            raise ValueError("a KV-cache dtype other than the model's needs the CPU (torch) attention backend")
        if not 0.0 < self.kv_cache_memory_fraction < 1.0:
            raise ValueError(f"kv_cache_memory_fraction must be in (0, 1), got {self.kv_cache_memory_fraction}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_cache_torch_dtype(self) -> torch.dtype:
        """"auto": float16 for a float32 model on the CPU attention backend (half the bytes each decode
        step reads, as llama.cpp's default f16 cache; attention still computes in float32), else the
        model's dtype."""
        if self.kv_cache_dtype != "auto":
            return KV_CACHE_DTYPES[self.kv_cache_dtype]
        if self.dtype == "float32" and self.device == "cpu" and self.attention_backend != "triton":
            return torch.float16
        return self.torch_dtype
