"""Quantized linear layers: plain modules with buffers, quantized once at load.

y = x @ W^T with W [N, K] (N output channels, K input features) stored as

Int8Linear     int8 weight-only, symmetric. `weight` int8 [N, K], `scales` [N]
               (per output channel) or [N, K // G] (group-wise, as GGUF Q8_0):
               W[n, k] = weight[n, k] * scale.
Int4Linear     int4 weight-only, group-wise along K (G = 32, 64 or 128).
               `qweight` uint8 [N, K // 2], two values 0..15 a byte, low nibble
               first (the Triton kernel's layout); `scales`, `mins` [N, K // G]:
               W[n, k] = q * scale + min  ==  (q - 8) * scale + zero, zero = min + 8 * scale.
               GGUF Q4_1 (d * q + m) is scale = d, min = m; Q4_0 (d * (q - 8)) is
               min = -8 * d: both stored as float16, exactly as in the file.
LLMInt8Linear  LLM.int8(): int8 weight per output channel ("column-wise" of W^T),
               activations quantized row-wise to int8 at run time, int32
               accumulation (`torch._int_mm`); feature columns where any |x| >= 6
               go through a float matmul instead.

The buffers above are the stored format: `dequantize()` turns them into the exact
float32 weights and `state_dict()` saves them. On the CPU the native executor
(leanserve/engine/executor.py) multiplies int4 and int8 weights as stored, on integer
dot products; these modules' own forward is the plain torch reference and fallback, a
float matrix product with the exactly dequantized weight (made once, on first use).
On other devices a class's `gpu_kernel(module, x)`, when set (the model runner sets
the Triton dequantizing matmuls on CUDA: `use_triton_kernels`), computes y.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

Q = gguf.GGMLQuantizationType
GROUP_SIZES = (32, 64, 128)
LLM_INT8_THRESHOLD = 6.0


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> uint8 [N, K // 2], low nibble first."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] values 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


class QuantLinear(nn.Module):
    """Shared shape, forward and repr of the quantized linears (no bias: Llama has none)."""

    format: ClassVar[str]
    gpu_kernel: ClassVar[Callable[[QuantLinear, torch.Tensor], torch.Tensor] | None] = None

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self._dequantized: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x.device.type != "cpu" and type(self).gpu_kernel is not None:
            y = type(self).gpu_kernel(self, x2)
        else:
            if self._dequantized is None or self._dequantized.dtype != x.dtype:
                self._dequantized = self.dequantize().to(x.dtype)
            y = F.linear(x2, self._dequantized)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The float32 weight [N, K] the stored buffers represent, exactly (or those output rows of it)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ------------------------------------------------------------------------------------------ int8


class Int8Linear(QuantLinear):
    """int8 weight-only, symmetric, per output channel (or group-wise along K, as GGUF Q8_0)."""

    format = "int8"

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        out_features, in_features = weight.shape
        super().__init__(out_features, in_features)
        if weight.dtype != torch.int8:
            raise ValueError(f"int8 weight must be torch.int8, got {weight.dtype}")
        if scales.dim() == 1:
            self.group_size = None
            if scales.shape != (out_features,):
                raise ValueError(f"per-channel scales must be [{out_features}], got {list(scales.shape)}")
        else:
            groups = scales.shape[1]
            if scales.shape[0] != out_features or groups == 0 or in_features % groups:
                raise ValueError(f"group scales {list(scales.shape)} do not fit "
                                 f"a [{out_features}, {in_features}] weight")
            self.group_size = in_features // groups
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.contiguous())

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int | None = None,
                   scale_dtype: torch.dtype = torch.float16) -> Int8Linear:
        """Round to nearest with scale = absmax / 127, per output channel or per group of K; scales are
        stored as float16 (as GGUF Q8_0 stores them, and as the native kernel takes them) and the weights
        rounded against them."""
        w = weight.detach().float()
        n, k = w.shape
        groups = w if group_size is None else w.view(n, k // _check_group(k, group_size), group_size)
        absmax = groups.abs().amax(dim=-1)
        scales = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax)).to(scale_dtype)
        q = torch.round(groups / scales.float()[..., None]).clamp(-127, 127).to(torch.int8).view(n, k)
        return cls(q, scales)

    @classmethod
    def from_gguf(cls, rows: np.ndarray, qtype: Q, in_features: int) -> Int8Linear:
        """GGUF Q8_0 block rows (uint8 [N, K / 32 * 34]: float16 d, then 32 int8) -> group 32, exact."""
        if qtype != Q.Q8_0:
            raise ValueError(f"Int8Linear takes Q8_0 blocks, got {qtype.name}")
        blocks = np.ascontiguousarray(rows).reshape(rows.shape[0], in_features // 32, 34)
        d = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0])
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(rows.shape[0], in_features)
        return cls(q, d)

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        scales = self.scales[rows].float()
        scales = scales[:, None] if self.group_size is None else scales.repeat_interleave(self.group_size, dim=1)
        return self.weight[rows].float() * scales

    def extra_repr(self) -> str:
        scales = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        return f"{super().extra_repr()}, {scales}"


# ------------------------------------------------------------------------------------------ int4


def _check_group(in_features: int, group_size: int) -> int:
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"in_features ({in_features}) is not a multiple of group_size ({group_size})")
    return group_size


class Int4Linear(QuantLinear):
    """int4 weight-only, group-wise along K: W = q * scale + min per group (q in 0..15)."""

    format = "int4"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> None:
        out_features, in_features = qweight.shape[0], 2 * qweight.shape[1]
        super().__init__(out_features, in_features)
        if qweight.dtype != torch.uint8:
            raise ValueError(f"packed int4 weight must be torch.uint8, got {qweight.dtype}")
        if scales.shape != mins.shape or scales.dim() != 2 or scales.shape[0] != out_features or not scales.shape[1]:
            raise ValueError(f"scales {list(scales.shape)} and mins {list(mins.shape)} do not fit "
                             f"a [{out_features}, {in_features}] weight")
        self.group_size = _check_group(in_features, in_features // scales.shape[1])
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("mins", mins.contiguous())

    def zeros(self) -> torch.Tensor:
        """float32 zero [N, K // G] of the (q - 8) * scale + zero form."""
        return self.mins.float() + 8 * self.scales.float()

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int = 32) -> Int4Linear:
        """Asymmetric min/max per group: min = the group's min, scale = (max - min) / 15, both stored as
        float16 (as GGUF Q4_1 stores them) and q rounded against the stored values."""
        w = weight.detach().float()
        n, k = w.shape
        groups = w.view(n, k // _check_group(k, group_size), group_size)
        low = groups.amin(dim=-1).half()
        scales = ((groups.amax(dim=-1) - low.float()) / 15).half()
        safe = torch.where(scales > 0, scales.float(), torch.ones_like(scales, dtype=torch.float32))
        q = torch.round((groups - low.float()[..., None]) / safe[..., None]).clamp(0, 15).view(n, k)
        return cls(pack_int4(q), scales, low)

    @classmethod
    def from_gguf(cls, rows: np.ndarray, qtype: Q, in_features: int) -> Int4Linear:
        """GGUF Q4_0 / Q4_1 block rows (uint8 [N, bytes]) -> group 32, the file's float16 d and m kept as stored.

        A block holds float16 d (and m for Q4_1), then 16 bytes: element j in the low
        nibble of byte j, element j + 16 in its high nibble."""
        header = {Q.Q4_0: 2, Q.Q4_1: 4}.get(qtype)
        if header is None:
            raise ValueError(f"Int4Linear takes Q4_0 or Q4_1 blocks, got {qtype.name}")
        n = rows.shape[0]
        blocks = np.ascontiguousarray(rows).reshape(n, in_features // 32, header + 16)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
        if qtype == Q.Q4_1:
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
        else:
            with np.errstate(over="raise"):
                m = d * np.float16(-8)       # exact: a power-of-two multiple (raises if it overflows)
        qs = torch.from_numpy(blocks[..., header:].copy())
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, in_features)
        return cls(pack_int4(q), torch.from_numpy(d), torch.from_numpy(m))

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        g = self.group_size
        q = unpack_int4(self.qweight[rows]).float()
        return q * self.scales[rows].float().repeat_interleave(g, dim=1) + self.mins[rows].float().repeat_interleave(g, dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"


# -------------------------------------------------------------------------------------- LLM.int8


class LLMInt8Linear(QuantLinear):
    """LLM.int8() (Dettmers et al., 2022): W8A8 with float outlier columns.

    Feature columns in which any activation of the batch has |x| >= threshold are
    multiplied in float32 with those columns of the dequantized weight; the rest is
    quantized row-wise (absmax / 127 per token) to int8 and multiplied with the int8
    weight in int32 (`torch._int_mm`), then scaled by the row and channel scales.
    """

    format = "llm_int8"

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD) -> None:
        out_features, in_features = weight.shape
        super().__init__(out_features, in_features)
        if weight.dtype != torch.int8 or scales.shape != (out_features,):
            raise ValueError(f"LLM.int8 needs an int8 weight and per-channel scales [{out_features}], "
                             f"got {weight.dtype} and {list(scales.shape)}")
        self.threshold = threshold
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("kernel_weight_t", self.weight.t().contiguous(), persistent=False)   # [K, N]

    @classmethod
    def from_float(cls, weight: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD) -> LLMInt8Linear:
        int8 = Int8Linear.from_float(weight, scale_dtype=torch.float32)
        return cls(int8.weight, int8.scales, threshold)

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return self.weight[rows].float() * self.scales[rows].float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        outliers = (x2.abs() >= self.threshold).any(dim=0).nonzero().squeeze(1)
        y = torch.zeros(x2.shape[0], self.out_features, device=x.device)
        if outliers.numel():
            weight_cols = self.weight[:, outliers].float() * self.scales.float()[:, None]
            y += x2[:, outliers] @ weight_cols.t()
            x2 = x2.index_fill(1, outliers, 0.0)
        absmax = x2.abs().amax(dim=1, keepdim=True)
        row_scales = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
        xq = torch.round(x2 / row_scales).to(torch.int8)
        rows = xq.shape[0]
        if xq.is_cuda and rows <= 16:                 # CUDA's _int_mm wants more than 16 rows
            xq = F.pad(xq, (0, 0, 0, 17 - rows))
        y += torch._int_mm(xq, self.kernel_weight_t)[:rows].float() * row_scales * self.scales.float()
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


def use_triton_kernels() -> None:
    """Route int4 and per-channel int8 linears off the CPU through the Triton dequantizing matmuls
    (group-wise int8, such as GGUF Q8_0, has no Triton kernel and keeps the dequantizing fallback)."""
    from leanserve.kernels.triton import int4_matmul, int8_matmul

    def int4(module: Int4Linear, x: torch.Tensor) -> torch.Tensor:
        return int4_matmul(x, module.qweight, module.scales, module.zeros(), module.group_size)

    def int8(module: Int8Linear, x: torch.Tensor) -> torch.Tensor:
        if module.group_size is not None:
            return F.linear(x, module.dequantize().to(x.dtype))
        return int8_matmul(x, module.weight, module.scales)

    Int4Linear.gpu_kernel, Int8Linear.gpu_kernel = int4, int8


QUANT_LINEARS: dict[str, type[QuantLinear]] = {cls.format: cls for cls in (Int8Linear, Int4Linear, LLMInt8Linear)}
