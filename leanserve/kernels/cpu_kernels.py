"""Native CPU kernels (C++ in leanserve/kernels/cpu/), one Python module per ISA level.

The kernels are written once over a small SIMD layer (cpu/simd.h) whose implementation follows
from the compiler flags: AVX-512 (with VNNI's vpdpbusd or without), AVX2 + FMA + F16C (with
AVX-VNNI or without), or portable C++ that any target compiles. `native_kernels()` builds (the
first time; torch's extension builder caches it in ~/.cache/torch_extensions, or
TORCH_EXTENSIONS_DIR) and loads the best level this CPU runs; LEANSERVE_CPU_ISA=<level> picks
another it can run, and LEANSERVE_NATIVE_KERNELS=0 none. Where nothing builds (no C++ compiler)
callers use the torch implementations, which compute the same thing.
"""
from __future__ import annotations

import functools
import logging
import os
import platform
import time
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).with_name("cpu")
_AVX2 = ("avx2", "fma", "f16c")
_AVX512 = _AVX2 + ("avx512f", "avx512bw", "avx512vl", "avx512dq")
# level -> (compiler flags, /proc/cpuinfo flags it needs), best first.
LEVELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "avx512_vnni": (("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                     "-mavx512vnni"), _AVX512 + ("avx512_vnni",)),
    "avx512": (("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"), _AVX512),
    "avx2_vnni": (("-mavx2", "-mfma", "-mf16c", "-mavxvnni"), _AVX2 + ("avx_vnni",)),
    "avx2": (("-mavx2", "-mfma", "-mf16c"), _AVX2),
    "portable": (("-DLEANSERVE_PORTABLE",), ()),
}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo names them (empty where there is none to read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def buildable_levels() -> list[str]:
    """The levels this machine's compiler can build: every level on x86-64, the portable one elsewhere."""
    return list(LEVELS) if platform.machine().lower() in ("x86_64", "amd64") else ["portable"]


def runnable_levels() -> list[str]:
    """The levels this CPU can run, best first."""
    return [level for level in buildable_levels() if set(LEVELS[level][1]) <= cpu_flags()]


def selected_level() -> str:
    """The level native_kernels() loads: LEANSERVE_CPU_ISA, else the best this CPU runs."""
    forced = os.environ.get("LEANSERVE_CPU_ISA")
    if not forced:
        return runnable_levels()[0]
    if forced not in LEVELS:
        raise ValueError(f"LEANSERVE_CPU_ISA={forced!r}: not one of {list(LEVELS)}")
    if forced not in runnable_levels():
        missing = sorted(set(LEVELS[forced][1]) - cpu_flags())
        raise ValueError(f"LEANSERVE_CPU_ISA={forced!r}: this CPU cannot run it (it lacks {', '.join(missing)})")
    return forced


STALE_LOCK_SECONDS = 600      # a build takes under a minute: an older lock was left by a killed one


def _remove_stale_lock(name: str) -> None:
    """torch's builder waits for as long as a lock file stands in the build directory; a build that was
    killed halfway leaves one behind."""
    from torch.utils.cpp_extension import _get_build_directory

    lock = Path(_get_build_directory(name, verbose=False)) / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except OSError:
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
        lock.unlink(missing_ok=True)


def build(level: str):
    """Compile (or find compiled) and import the module of one level; raises where that fails."""
    from torch.utils.cpp_extension import load

    flags, _ = LEVELS[level]
    start = time.perf_counter()
    _remove_stale_lock(f"leanserve_cpu_{level}")
    module = load(name=f"leanserve_cpu_{level}", sources=[str(SOURCE_DIR / "module.cpp")],
                  extra_include_paths=[str(SOURCE_DIR)],
                  extra_cflags=["-O3", "-fopenmp", "-fvisibility=hidden", *flags],
                  extra_ldflags=["-fopenmp"])
    if module.ISA != level:
        raise RuntimeError(f"the {level} build compiled the {module.ISA} kernels (check the compiler's flags)")
    seconds = time.perf_counter() - start
    if seconds > 5:
        log.info("built the native CPU kernels (%s) in %.0f s", level, seconds)
    return module


def native_kernels(level: str | None = None):
    """The compiled module of `level` (default: selected_level()), or None where the native kernels
    are switched off (LEANSERVE_NATIVE_KERNELS=0) or do not build here."""
    if os.environ.get("LEANSERVE_NATIVE_KERNELS", "1") == "0":
        return None
    return _load(level or selected_level())


@functools.cache
def _load(level: str):
    try:
        return build(level)
    except Exception as e:  # noqa: BLE001 - any build failure means: use the torch path
        message = str(e).strip().splitlines()
        log.warning("native CPU kernels (%s) unavailable (%s: %s); using the torch versions",
                    level, type(e).__name__, message[-1] if message else "")
        return None


def describe() -> dict[str, str]:
    """What `leanserve env` and the server's load log say about the native kernels."""
    wanted = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni",
              "asimd", "sve")
    kernels = native_kernels()
    return {"cpu": cpu_model(), "cpu flags": " ".join(f for f in wanted if f in cpu_flags()) or "(none of note)",
            "runnable levels": " ".join(runnable_levels()),
            "native kernels": f"{kernels.ISA} (built in {Path(kernels.__file__).parent})" if kernels is not None
            else "none (torch fallback)"}
