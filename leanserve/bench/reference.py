"""HuggingFace transformers on the same weights: the independent reference the benchmarks compare with."""
from __future__ import annotations

import torch


def load_transformers(model: str):
    """(tokenizer, float32 model) from the GGUF file or HF directory that `model` names."""
    import transformers

    from leanserve.engine.loader import resolve_model_path

    path = resolve_model_path(model)
    kwargs = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
    directory = str(path.parent if path.suffix == ".gguf" else path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, **kwargs)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    return tokenizer, hf_model.eval()
