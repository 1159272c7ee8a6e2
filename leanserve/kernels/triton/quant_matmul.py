"""Dequantizing matmuls in Triton: y = x @ W^T with W stored in int8 or int4.

Formats (weight W is [N, K], N output channels, K input features):

int8 weight-only, per output channel (symmetric)
    w_q    int8 [N, K]
    scales float [N]                       W[n, k] = w_q[n, k] * scales[n]

int4 weight-only, group-wise along K (asymmetric)
    packed uint8 [N, K // 2]: byte j of row n holds q[n, 2j] in its low nibble and
           q[n, 2j + 1] in its high nibble (low nibble first), q in 0 .. 15
    scales, zeros float [N, K // G], G the group size (32, 64 or 128; K % G == 0)
                                           W[n, k] = (q[n, k] - 8) * scales[n, k // G] + zeros[n, k // G]
    GGUF Q4_0 (d * (q - 8)) is zeros = 0; Q4_1 (d * q + m) is zeros = m + 8 * d.

x is float32, float16 or bfloat16 [..., K]; products accumulate in float32 and y
comes back in x's dtype. Weights are dequantized tile by tile in registers, never
materialised. Under Triton's interpreter (CPU tensors) tiles are multiplied in
float32, since the interpreter cannot do bfloat16 arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from leanserve.kernels.triton.lean_attention import compute_dtype, dot_precision


# ---- torch reference helpers: packing, quantizing, dequantizing ----

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] values 0 .. 15 -> uint8 [N, K // 2], low nibble first."""
    if q.shape[-1] % 2:
        raise ValueError(f"K ({q.shape[-1]}) must be even to pack two 4-bit values per byte")
    q = q.to(torch.uint8)
    return (q[..., 0::2] & 0xF) | ((q[..., 1::2] & 0xF) << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> uint8 [N, K] values 0 .. 15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 W [N, K] = (q - 8) * scale + zero, per group of `group_size` along K."""
    q = unpack_int4(packed).float()
    scale = scales.float().repeat_interleave(group_size, dim=-1)
    zero = zeros.float().repeat_interleave(group_size, dim=-1)
    return (q - 8) * scale + zero


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (w_q int8 [N, K], scales float32 [N])."""
    scales = w.float().abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w.float() / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 (min/max per group): (packed, scales, zeros), float32 scales and zeros."""
    n, k = w.shape
    groups = w.float().view(n, k // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).clamp(min=1e-12)
    q = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).view(n, k)
    return pack_int4(q.to(torch.uint8)), scales, low + 8 * scales


# ---- kernels ----

@triton.jit
def _int8_matmul_kernel(
    X, W, Scales, Y, M, N, K,
    stride_xm, stride_wn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(W + offs_n[None, :] * stride_wn + kk[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0)
        # int8 values are exact in bf16/fp16 and fp32: the scale is applied once, after the K sum.
        acc += tl.dot(x.to(DTYPE), w.to(DTYPE), input_precision=PRECISION)
    scale = tl.load(Scales + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = acc * scale[None, :]
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _int4_matmul_kernel(
    X, W, Scales, Zeros, Y, M, N, K,
    stride_xm, stride_wn, stride_sn, stride_ym,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # Nibble of each k within its byte: 0 (low) for even k, 4 (high) for odd k.
    shift = (offs_k % 2) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        # Each byte is loaded for both of its k (the second load hits cache); [BLOCK_K, BLOCK_N].
        packed = tl.load(W + offs_n[None, :] * stride_wn + (kk // 2)[:, None],
                         mask=mask_k[:, None] & mask_n[None, :], other=0).to(tl.int32)
        q = (packed >> shift[:, None]) & 0xF
        # BLOCK_K divides GROUP, so the whole K tile lies in one group: one scale and zero per column.
        group = k0 // GROUP
        scale = tl.load(Scales + offs_n * stride_sn + group, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(Zeros + offs_n * stride_sn + group, mask=mask_n, other=0.0).to(tl.float32)
        w = (q.to(tl.float32) - 8.0) * scale[None, :] + zero[None, :]
        acc += tl.dot(x.to(DTYPE), w.to(DTYPE), input_precision=PRECISION)
    tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _block_m(m: int) -> int:
    # Decode batches are a few rows: don't multiply a 64-row tile of padding.
    return max(16, min(64, triton.next_power_of_2(m)))


def int8_matmul(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """y [..., N] = x [..., K] @ (w_q int8 [N, K] * scales [N, None])^T."""
    k = x.shape[-1]
    n = w_q.shape[0]
    if w_q.dtype != torch.int8 or w_q.shape[1] != k or scales.shape != (n,):
        raise ValueError(f"want int8 weights [N, {k}] and scales [N]; got {w_q.dtype} {tuple(w_q.shape)}, "
                         f"scales {tuple(scales.shape)}")
    x2 = x.reshape(-1, k).contiguous()
    w_q, scales = w_q.contiguous(), scales.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    dtype = compute_dtype(x2)
    block_m, block_n, block_k = _block_m(m), 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int8_matmul_kernel[grid](x2, w_q, scales, y, m, n, k, x2.stride(0), w_q.stride(0), y.stride(0),
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                              DTYPE=dtype, PRECISION=dot_precision(dtype))
    return y.view(*x.shape[:-1], n)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                group_size: int) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequantize_int4(packed, scales, zeros, group_size)^T (format in the module doc)."""
    k = x.shape[-1]
    n = packed.shape[0]
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"group_size ({group_size}) must be a power of two >= 16")
    if k % group_size:
        raise ValueError(f"K ({k}) must be a multiple of group_size ({group_size})")
    if packed.dtype != torch.uint8 or packed.shape[1] * 2 != k:
        raise ValueError(f"want packed uint8 [N, {k // 2}]; got {packed.dtype} {tuple(packed.shape)}")
    if scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"want scales and zeros [{n}, {k // group_size}]; got {tuple(scales.shape)}, "
                         f"{tuple(zeros.shape)}")
    x2 = x.reshape(-1, k).contiguous()
    packed, scales, zeros = packed.contiguous(), scales.contiguous(), zeros.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    dtype = compute_dtype(x2)
    block_m, block_n, block_k = _block_m(m), 64, min(group_size, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_matmul_kernel[grid](x2, packed, scales, zeros, y, m, n, k,
                              x2.stride(0), packed.stride(0), scales.stride(0), y.stride(0),
                              GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                              DTYPE=dtype, PRECISION=dot_precision(dtype))
    return y.view(*x.shape[:-1], n)
