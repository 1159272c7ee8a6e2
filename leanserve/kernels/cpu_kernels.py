"""Native CPU kernels (C++ in leanserve/kernels/cpu/), compiled on first use by torch's extension
builder and cached by it (~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR).

Where they cannot be built (no C++ compiler, or LEANSERVE_NATIVE_KERNELS=0), callers fall back
to the torch implementations, which compute the same thing.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name("cpu") / name
           for name in ("kernels.cpp", "prefill_attention.cpp", "vnni_linear.cpp", "step_layers.cpp")]


@functools.cache
def native_kernels():
    """The compiled module (`lean_attention_decode`, `fused_add_rms_norm`, `silu_mul`,
    `prefill_attention_supported`, `prefill_attention`, `vnni_available`, `int4_vnni_pack`, `int8_vnni_pack`,
    `vnni_linear`, `attention_step`, `model_layers`), or None."""
    if os.environ.get("LEANSERVE_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(name="leanserve_cpu_kernels", cpp_sources=[source.read_text() for source in SOURCES],
                           functions=["lean_attention_decode", "fused_add_rms_norm", "silu_mul",
                                      "prefill_attention_supported", "prefill_attention", "vnni_available",
                                      "int4_vnni_pack", "int8_vnni_pack", "vnni_linear", "attention_step",
                                      "model_layers"],
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
        log.warning("native CPU kernels unavailable (%s: %s); using the torch versions",
                    type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        return None


def native_kernels_for(x: torch.Tensor):
    """The compiled module where its kernels take this tensor (float32 on the CPU), else None."""
    return native_kernels() if x.device.type == "cpu" and x.dtype == torch.float32 else None
