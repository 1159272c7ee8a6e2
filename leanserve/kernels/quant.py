"""Quantized linear layers: plain modules with buffers, quantized once at load.

y = x @ W^T with W [N, K] (N output channels, K input features) stored as

Int8Linear     int8 weights, per output channel or group-wise along K. `weight` int8 [N, K],
               `scales` [N] (per output channel) or [N, K // G], `mins` [N, K // G] or None:
               W[n, k] = weight[n, k] * scale (+ min). GGUF blocks of 5 to 8 bits as stored:
               Q8_0 (d * w), Q5_0 (d * (q - 16): weight q - 16), Q5_1 (d * q + m), Q5_K
               (d * sc * q - dmin * m per sub-block of 32), Q6_K (d * sc * (q - 32): weight
               q - 32, G = 16).
Int4Linear     int4 weight-only, group-wise along K (G = 32, 64 or 128).
               `qweight` uint8 [N, K // 2], two values 0..15 a byte, low nibble
               first (the Triton kernel's layout); `scales`, `mins` [N, K // G]:
               W[n, k] = q * scale + min  ==  (q - 8) * scale + zero, zero = min + 8 * scale.
               GGUF Q4_1 (d * q + m) is scale = d, min = m; Q4_0 (d * (q - 8)) is
               min = -8 * d: both stored as float16, exactly as in the file. Q4_K (d * sc * q -
               dmin * m per sub-block of 32) is G = 32 with float32 scales and mins.
LLMInt8Linear  LLM.int8(): int8 weight per output channel ("column-wise" of W^T),
               activations quantized row-wise to int8 at run time, int32
               accumulation (`torch._int_mm`); feature columns where any |x| >= 6
               go through a float matmul instead.

GGUF's K-quant sub-block scales d * sc and mins dmin * m (float16 times a 6-bit integer, up to
17 bits) are not float16 values but are float32 ones: those modules keep float32 scales and mins,
the others the file's float16. `gguf_linear` builds the module of a GGUF tensor, or of a fused
one (q/k/v, gate/up) from its parts' blocks, whose types may differ (`stack_rows`).

The buffers above are the stored format: `dequantize()` turns them into the exact
float32 weights and `state_dict()` saves them. On the CPU the native executor
(leanserve/engine/executor.py) multiplies int4 and int8 weights as stored, on integer
dot products; these modules' own forward is the plain torch reference and fallback, a
float matrix product with the exactly dequantized weight (made once, on first use).
On other devices a class's `gpu_kernel(module, x)`, when set (the model runner sets
the Triton dequantizing matmuls on CUDA: `use_triton_kernels`), computes y.
"""
from __future__ import annotations

import functools
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
    """int8 weights, per output channel (symmetric) or group-wise along K with optional mins (GGUF blocks)."""

    format = "int8"

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor | None = None) -> None:
        out_features, in_features = weight.shape
        super().__init__(out_features, in_features)
        if weight.dtype != torch.int8:
            raise ValueError(f"int8 weight must be torch.int8, got {weight.dtype}")
        if scales.dim() == 1:
            self.group_size = None
            if scales.shape != (out_features,):
                raise ValueError(f"per-channel scales must be [{out_features}], got {list(scales.shape)}")
            if mins is not None:
                raise ValueError("mins need group-wise scales")
        else:
            groups = scales.shape[1]
            if scales.shape[0] != out_features or groups == 0 or in_features % groups:
                raise ValueError(f"group scales {list(scales.shape)} do not fit "
                                 f"a [{out_features}, {in_features}] weight")
            if mins is not None and mins.shape != scales.shape:
                raise ValueError(f"mins {list(mins.shape)} do not match scales {list(scales.shape)}")
            self.group_size = in_features // groups
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("mins", None if mins is None else mins.contiguous())   # None: not in state_dict

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
        """GGUF block rows (uint8 [N, bytes a row]) of Q8_0, Q5_0, Q5_1, Q5_K or Q6_K, exactly as
        gguf.quants.dequantize reads them (the layouts are in the decoders below)."""
        decode = _INT8_DECODERS.get(qtype)
        if decode is None:
            raise ValueError(f"Int8Linear takes {', '.join(t.name for t in _INT8_DECODERS)} blocks, got {qtype.name}")
        n = rows.shape[0]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = np.ascontiguousarray(rows).reshape(n, in_features // block, size)
        weight, scales, mins = decode(blocks)
        return cls(_tensor(weight.reshape(n, in_features)), _tensor(scales.reshape(n, -1)),
                   None if mins is None else _tensor(mins.reshape(n, -1)))

    def _per_weight(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, None] if self.group_size is None else t.repeat_interleave(self.group_size, dim=1)

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        w = self.weight[rows].float() * self._per_weight(self.scales[rows].float())
        return w if self.mins is None else w + self._per_weight(self.mins[rows].float())

    def extra_repr(self) -> str:
        scales = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        return f"{super().extra_repr()}, {scales}{', with mins' if self.mins is not None else ''}"


# -------------------------------------------------------------------------------- GGUF blocks
# Each decoder takes uint8 blocks [N, blocks, bytes a block] and mirrors gguf-py's dequantize_blocks
# (gguf/quants.py): the same float32 products, so that the modules' dequantize() is its result.


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A tensor of its own memory (block rows may be read-only views of the memory-mapped file)."""
    return torch.from_numpy(np.array(a))


def _f16(field: np.ndarray) -> np.ndarray:
    """2-byte float16 fields [..., 2] -> float16 [...]."""
    return np.ascontiguousarray(field).view(np.float16)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., chunks, C] bytes -> [..., chunks, 2, C]: each chunk's low nibbles, then its high nibbles."""
    return np.stack([qs & 0x0F, qs >> 4], axis=-2)


def _bits(qh: np.ndarray, count: int, width: int = 1) -> np.ndarray:
    """[..., C] bytes -> [..., count, C]: field i is bits width*i.. of each byte."""
    shifts = (np.arange(count, dtype=np.uint8) * width)[:, None]
    return (qh[..., None, :] >> shifts) & ((1 << width) - 1)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes [..., 12] -> 6-bit sub-block scales and mins [..., 8]: bytes 0-3 hold
    scales 0-3 and bytes 4-7 mins 0-3 in their low 6 bits; scales and mins 4-7 are bytes 8-11's low
    and high nibbles, with 2 more bits each from the top of bytes 0-3 (scales) and 4-7 (mins)."""
    d, m, low = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([d & 0x3F, (low & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([m & 0x3F, (low >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return scales, mins


def _k_scale_products(blocks: np.ndarray, packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: float32 d * sc and -(dmin * m) [N, blocks, 8] (exact: 17 bits)."""
    sc, m = _k_scales_mins(packed)
    d, dmin = _f16(blocks[..., 0:2]).astype(np.float32), _f16(blocks[..., 2:4]).astype(np.float32)
    return d[..., None] * sc.astype(np.float32), -(dmin[..., None] * m.astype(np.float32))


def _q8_0(blocks):          # d f16, 32 int8
    return blocks[..., 2:].view(np.int8), _f16(blocks[..., 0:2]), None


def _q5_low_high(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1: element j's low 4 bits in qs (j < 16: byte j's low nibble, else byte j - 16's high
    one), its fifth in bit j of the little-endian uint32 qh."""
    low = _nibbles(qs).reshape(*qs.shape[:-1], 32)
    high = np.unpackbits(qh, axis=-1, bitorder="little")
    return low | (high << 4)


def _q5_0(blocks):          # d f16, qh 4, qs 16: d * (q - 16)
    q = _q5_low_high(blocks[..., 2:6], blocks[..., 6:22])
    return (q.astype(np.int8) - np.int8(16)), _f16(blocks[..., 0:2]), None


def _q5_1(blocks):          # d f16, m f16, qh 4, qs 16: d * q + m
    q = _q5_low_high(blocks[..., 4:8], blocks[..., 8:24])
    return q.astype(np.int8), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])


def _q5_k(blocks):
    """d f16, dmin f16, scales 12, qh 32, qs 128: sub-block s (of 8, 32 each) is qs[32 (s // 2) + i]'s
    low (s even) or high nibble, plus bit s of qh[i] as its fifth bit."""
    scales, mins = _k_scale_products(blocks, blocks[..., 4:16])
    low = _nibbles(blocks[..., 48:176].reshape(*blocks.shape[:-1], 4, 32)).reshape(*blocks.shape[:-1], 8, 32)
    q = low | (_bits(blocks[..., 16:48], 8) << 4)
    return q.astype(np.int8), scales, mins


def _q6_k(blocks):
    """ql 128, qh 64, scales 16 int8, d f16: each half of 128 holds 4 runs of 32, run r = the low
    (r < 2) or high nibbles of ql[64 half + 32 (r % 2) + i], plus bits 2r, 2r + 1 of qh[32 half + i]
    on top; d * sc * (q - 32) per sub-block of 16."""
    lead = blocks.shape[:-1]
    ql = _nibbles(blocks[..., 0:128].reshape(*lead, 2, 64)).reshape(*lead, 8, 32)
    qh = _bits(blocks[..., 128:192].reshape(*lead, 2, 32), 4, width=2).reshape(*lead, 8, 32)
    q = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
    sc = blocks[..., 192:208].view(np.int8).astype(np.float32)
    return q, _f16(blocks[..., 208:210]).astype(np.float32)[..., None] * sc, None


_INT8_DECODERS = {Q.Q8_0: _q8_0, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k}


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
        """GGUF Q4_0 / Q4_1 / Q4_K block rows (uint8 [N, bytes]) -> group 32, the file's values kept as stored.

        A Q4_0 / Q4_1 block holds float16 d (and m for Q4_1), then 16 bytes: element j in the low
        nibble of byte j, element j + 16 in its high nibble. A Q4_K super-block of 256 holds float16
        d and dmin, 12 bytes of 6-bit sub-block scales and mins, then 128 bytes: sub-block s (of 8, 32
        each) in the low (s even) or high nibbles of bytes 32 (s // 2) ..; scale d * sc, min -dmin * m."""
        if qtype not in (Q.Q4_0, Q.Q4_1, Q.Q4_K):
            raise ValueError(f"Int4Linear takes Q4_0, Q4_1 or Q4_K blocks, got {qtype.name}")
        n = rows.shape[0]
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        blocks = np.ascontiguousarray(rows).reshape(n, in_features // block, size)
        if qtype == Q.Q4_K:
            d, m = _k_scale_products(blocks, blocks[..., 4:16])
            q = _nibbles(blocks[..., 16:].reshape(n, -1, 4, 32))
        else:
            header = 2 if qtype == Q.Q4_0 else 4
            d = _f16(blocks[..., 0:2])
            if qtype == Q.Q4_1:
                m = _f16(blocks[..., 2:4])
            else:
                with np.errstate(over="raise"):
                    m = d * np.float16(-8)       # exact: a power-of-two multiple (raises if it overflows)
            q = _nibbles(blocks[..., header:])
        return cls(pack_int4(_tensor(q.reshape(n, in_features))), _tensor(d.reshape(n, -1)), _tensor(m.reshape(n, -1)))

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


# ------------------------------------------------------------------------------ GGUF modules

GGUF_INT4 = frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K})
GGUF_INT8 = frozenset(_INT8_DECODERS)
GGUF_NATIVE = GGUF_INT4 | GGUF_INT8           # the types `gguf_linear` takes as stored


def gguf_linear(parts: list[tuple[np.ndarray, Q]], in_features: int) -> QuantLinear:
    """The module of GGUF block rows, or of several tensors' rows stacked along N (a fused q/k/v or
    gate/up), each (rows, type) of GGUF_NATIVE."""
    return stack_rows([(Int4Linear if qtype in GGUF_INT4 else Int8Linear).from_gguf(rows, qtype, in_features)
                       for rows, qtype in parts])


def stack_rows(modules: list[QuantLinear]) -> QuantLinear:
    """Group-wise int4 / int8 modules over the same input stacked along N, in one format that holds
    every part exactly: int4 where all parts are int4 of one group size, else int8 (int4's q as
    weights, with their mins) in the smallest group size (a group's scale and min repeated over its
    sub-groups: the same products); float32 scales and mins where any part has them (float16 values
    are float32 ones)."""
    if len(modules) == 1:
        return modules[0]
    if not all(isinstance(m, Int4Linear | Int8Linear) and m.group_size is not None for m in modules) \
            or len({m.in_features for m in modules}) != 1:
        raise ValueError(f"cannot stack {[repr(m) for m in modules]}: group-wise int4 / int8 modules of one K only")
    dtype = functools.reduce(torch.promote_types, [t.dtype for m in modules for t in (m.scales, m.mins)
                                                   if t is not None])
    if all(isinstance(m, Int4Linear) for m in modules) and len({m.group_size for m in modules}) == 1:
        return Int4Linear(torch.cat([m.qweight for m in modules]), torch.cat([m.scales.to(dtype) for m in modules]),
                          torch.cat([m.mins.to(dtype) for m in modules]))
    group = min(m.group_size for m in modules)
    if any(m.group_size % group for m in modules):
        raise ValueError(f"cannot stack group sizes {[m.group_size for m in modules]}")
    weights, scales, mins = [], [], []
    for m in modules:
        repeat = m.group_size // group
        weights.append(unpack_int4(m.qweight).view(torch.int8) if isinstance(m, Int4Linear) else m.weight)
        scales.append(m.scales.to(dtype).repeat_interleave(repeat, dim=1))
        mins.append(torch.zeros_like(scales[-1]) if m.mins is None
                    else m.mins.to(dtype).repeat_interleave(repeat, dim=1))
    with_mins = any(m.mins is not None for m in modules)
    return Int8Linear(torch.cat(weights), torch.cat(scales), torch.cat(mins) if with_mins else None)


QUANT_LINEARS: dict[str, type[QuantLinear]] = {cls.format: cls for cls in (Int8Linear, Int4Linear, LLMInt8Linear)}
