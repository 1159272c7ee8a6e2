"""LeanServe: an LLM inference serving engine."""
from leanserve.params import SamplingParams, StructuredOutputs

__all__ = ["LLM", "SamplingParams", "StructuredOutputs", "RequestOutput", "CompletionOutput"]


def __getattr__(name: str):
    # The engine pulls in torch, the loaders and the model; import it when first asked for.
    if name == "LLM":
        from leanserve.engine.llm import LLM
        return LLM
    if name in ("RequestOutput", "CompletionOutput"):
        from leanserve.engine import outputs
        return getattr(outputs, name)
    raise AttributeError(f"module 'leanserve' has no attribute {name!r}")
