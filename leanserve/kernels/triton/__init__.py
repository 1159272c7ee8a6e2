"""Triton kernels: lean (stream-K) decode attention, varlen prefill attention, dequantizing matmuls.

Importing this package defines the kernels, and `triton.jit` decides then whether
they run compiled or in Triton's CPU interpreter: set TRITON_INTERPRET=1 before
importing it to run them on CPU tensors (tests do).
"""
from leanserve.kernels.triton.lean_attention import (LeanPlan, default_num_workers, lean_attention_decode,
                                                     merge_lean_partials, plan_lean_tiles)
from leanserve.kernels.triton.prefill_attention import plan_prefill_blocks, prefill_attention
from leanserve.kernels.triton.quant_matmul import (dequantize_int4, int4_matmul, int8_matmul, pack_int4,
                                                   quantize_int4, quantize_int8, unpack_int4)

__all__ = [
    "LeanPlan", "default_num_workers", "lean_attention_decode", "merge_lean_partials", "plan_lean_tiles",
    "plan_prefill_blocks", "prefill_attention",
    "dequantize_int4", "int4_matmul", "int8_matmul", "pack_int4", "quantize_int4", "quantize_int8", "unpack_int4",
]
