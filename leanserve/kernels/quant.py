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
float32 weights and `state_dict()` saves them. int4's and group-wise int8's CPU path
is a native kernel where it runs (see QuantLinear); the other CPU fast paths use torch's
weight-only kernels, which run an order of magnitude faster on bfloat16
activations than on float32 ones, so activations are cast to bfloat16 for the
kernel and the result back to the caller's dtype; the kernels also want their
scales in bfloat16, so those round on the fast path only (int4's zeros do not:
see Int4Linear). Kernel
operands live in non-persistent buffers (`kernel_*`) built once at construction.

On other devices a class's `gpu_kernel(module, x)`, when set (the model runner sets
the Triton dequantizing matmuls on CUDA: `use_triton_kernels`), computes y;
otherwise the weight is dequantized.
"""
from __future__ import annotations

from typing import Callable, ClassVar

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leanserve.kernels.cpu_kernels import native_kernels

Q = gguf.GGMLQuantizationType
KERNEL_DTYPE = torch.bfloat16
GROUP_SIZES = (32, 64, 128)
LLM_INT8_THRESHOLD = 6.0
DENSE_ROWS = 24
CHANNEL_ROWS = 8


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0..15 -> uint8 [N, K // 2], low nibble first."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] values 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] as a contiguous bfloat16 [M, K] matrix for the CPU kernels."""
    return x.reshape(-1, k).to(KERNEL_DTYPE).contiguous()


def vnni_kernels(weight: torch.Tensor, group_size: int | None, *scales: torch.Tensor):
    """The native kernels, if they multiply by VNNI here and can take this weight: on the CPU, in
    groups of a multiple of 32 along K, with scales (and mins) whose values are exactly float16
    (GGUF's are)."""
    kernels = native_kernels()
    if (weight.device.type != "cpu" or group_size is None or group_size % 32 or kernels is None
            or not kernels.vnni_available()):
        return None
    return kernels if all(torch.equal(t.half().to(t.dtype), t) for t in scales) else None


class QuantLinear(nn.Module):
    """Shared shape, device dispatch and repr of the quantized linears (no bias: Llama has none).

    `vnni`: the CPU path is the native VNNI kernel (leanserve/kernels/cpu/vnni_linear.cpp) on the
    `kernel_packed` and `kernel_scales_mins` buffers, within ~1e-5 of float32 on the exact weights for
    every batch size; otherwise the class's `cpu_forward`.
    """

    format: ClassVar[str]
    gpu_kernel: ClassVar[Callable[[QuantLinear, torch.Tensor], torch.Tensor] | None] = None
    vnni = False

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features

    def use_vnni(self, packed: list[torch.Tensor]) -> None:
        self.vnni = True
        self.register_buffer("kernel_packed", packed[0], persistent=False)
        self.register_buffer("kernel_scales_mins", packed[1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
            y = (native_kernels().vnni_linear(x2, self.kernel_packed, self.kernel_scales_mins, self.group_size,
                                              self.out_features) if self.vnni else self.cpu_forward(x2))
            if y.dtype == x.dtype and x.dim() == 2:          # the decode path: no more ops than needed
                return y
        elif type(self).gpu_kernel is not None:
            y = type(self).gpu_kernel(self, x.reshape(-1, self.in_features))
        else:
            y = F.linear(x.reshape(-1, self.in_features), self.dequantize().to(x.dtype))
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """The float32 weight [N, K] the stored buffers represent, exactly (or those output rows of it)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


# ------------------------------------------------------------------------------------------ int8


class Int8Linear(QuantLinear):
    """int8 weight-only, symmetric, per output channel (or group-wise along K, as GGUF Q8_0).

    Per channel, the CPU path is `_weight_int8pack_mm`. Group-wise, it is the native VNNI
    kernel where it runs (see QuantLinear); torch has no group-wise kernel (one call per
    group is 4x slower than a bfloat16 matmul at batch 32), so otherwise the group-wise path
    multiplies by a bfloat16 copy of the dequantized weight made at load.
    """

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
        kernels = vnni_kernels(weight, self.group_size, scales)
        if kernels is not None:
            self.use_vnni(kernels.int8_vnni_pack(self.weight, self.scales))
        elif weight.device.type == "cpu":
            if self.group_size is None:
                self.register_buffer("kernel_scales", scales.to(KERNEL_DTYPE), persistent=False)
            else:
                self.register_buffer("kernel_weight", self.dequantize().to(KERNEL_DTYPE), persistent=False)
        self.register_buffer("kernel_channel_weight", None, persistent=False)    # see add_per_channel_kernel
        self.register_buffer("kernel_channel_scales", None, persistent=False)

    @classmethod
    def from_float(cls, weight: torch.Tensor, group_size: int | None = None) -> Int8Linear:
        """Round to nearest with scale = absmax / 127, per output channel or per group of K; group scales
        are stored as float16 (as GGUF Q8_0 stores them) and the weights rounded against them."""
        w = weight.detach().float()
        n, k = w.shape
        groups = w if group_size is None else w.view(n, k // _check_group(k, group_size), group_size)
        absmax = groups.abs().amax(dim=-1)
        scales = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
        if group_size is not None:
            scales = scales.half()
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

    def add_per_channel_kernel(self) -> None:
        """Group-wise scales only: also keep the weight requantized per output channel, which torch's
        int8 kernel multiplies for up to CHANNEL_ROWS rows in a third of the bfloat16 copy's time. Its
        rounding is not the stored weights' (half a step of absmax / 127 per channel): meant for an LM
        head, whose top logits are rescored with the exact rows (LlamaForCausalLM.compute_logits)."""
        channel = Int8Linear.from_float(self.dequantize())
        self.kernel_channel_weight = channel.weight
        self.kernel_channel_scales = channel.scales.to(KERNEL_DTYPE)

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        scales = self.scales[rows].float()
        scales = scales[:, None] if self.group_size is None else scales.repeat_interleave(self.group_size, dim=1)
        return self.weight[rows].float() * scales

    def cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group_size is None:
            return torch.ops.aten._weight_int8pack_mm(_rows(x, self.in_features), self.weight, self.kernel_scales)
        if self.kernel_channel_weight is not None and x.shape[0] <= CHANNEL_ROWS:
            return torch.ops.aten._weight_int8pack_mm(_rows(x, self.in_features), self.kernel_channel_weight,
                                                      self.kernel_channel_scales)
        return F.linear(_rows(x, self.in_features), self.kernel_weight)

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
    """int4 weight-only, group-wise along K: W = q * scale + min per group (q in 0..15).

    CPU path: the native VNNI kernel where it runs (see QuantLinear; its float16 scales and
    mins are exact for GGUF's and from_float's). Otherwise torch's kernels:
    `_weight_int4pack_mm_for_cpu` on its own packing of q computes (q - 8) * scale with
    bfloat16 scales and activations; the zero term (zero = min + 8 * scale, per group) is
    added in float32 as x's group sums times the zeros, since rounding the zeros to bfloat16
    biases whole groups (on the default model, 64 prompts: +0.45% perplexity against
    float32 with rounded zeros, -0.17% with exact ones). That is for up to DENSE_ROWS rows;
    more rows multiply a dense bfloat16 copy of (q - 8) * scale instead.
    """

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
        kernels = vnni_kernels(qweight, self.group_size, self.scales, self.mins)
        if kernels is not None:
            self.use_vnni(kernels.int4_vnni_pack(unpack_int4(self.qweight), self.scales, self.mins))
        elif qweight.device.type == "cpu":
            # The CPU kernel packs 16 output channels at a time: pad N with zero rows.
            pad = -out_features % 16
            q = F.pad(unpack_int4(self.qweight).to(torch.int32), (0, 0, 0, pad))
            self.register_buffer("kernel_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                                 persistent=False)
            # The kernel's zero term would round to bfloat16 with the activations: a bias on each whole
            # group. It gets zero there; y adds the exact zeros times x's group sums in float32 instead.
            scales = self.scales.t().to(KERNEL_DTYPE)
            scales_zeros = torch.stack([scales, torch.zeros_like(scales)], dim=-1)      # [K // G, N, 2]
            self.register_buffer("kernel_scales_zeros", F.pad(scales_zeros, (0, 0, 0, pad)), persistent=False)
            self.register_buffer("kernel_zeros", self.zeros().t().contiguous(), persistent=False)  # [K // G, N]
            # The same (q - 8) * scale as a dense bfloat16 matrix: torch's int4 kernel costs rows x weight
            # like a matrix-vector product, so past DENSE_ROWS rows a bfloat16 GEMM, reading 4x the bytes,
            # wins (in the default model's decode step: even at 24 rows, 1.2x at 64, 3x in prefill).
            self.register_buffer("kernel_dense", self.unshifted_weight().to(KERNEL_DTYPE), persistent=False)

    def zeros(self) -> torch.Tensor:
        """float32 zero [N, K // G] of the (q - 8) * scale + zero form."""
        return self.mins.float() + 8 * self.scales.float()

    def unshifted_weight(self) -> torch.Tensor:
        """(q - 8) * bfloat16(scale) in float32: the weight without its zero term, as the CPU kernel has it."""
        scales = self.scales.to(KERNEL_DTYPE).float().repeat_interleave(self.group_size, dim=1)
        return (unpack_int4(self.qweight).float() - 8) * scales

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

    def cpu_forward(self, x: torch.Tensor) -> torch.Tensor:
        a = _rows(x, self.in_features)
        if a.shape[0] > DENSE_ROWS:
            y = F.linear(a, self.kernel_dense)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.kernel_weight, self.group_size,
                                                           self.kernel_scales_zeros)
        group_sums = x.reshape(x.shape[0], -1, self.group_size).sum(-1, dtype=torch.float32)
        return torch.addmm(y[:, :self.out_features].float(), group_sums, self.kernel_zeros)

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
        int8 = Int8Linear.from_float(weight)
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
