"""Offline API: `LLM(...).generate(prompts)` and `.chat(conversations)`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from tqdm import tqdm

from leanserve.engine.engine_config import EngineConfig
from leanserve.engine.llm_engine import LLMEngine
from leanserve.engine.outputs import RequestOutput
from leanserve.params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]


class LLM:
    """Generate from many prompts at once with continuous batching.

    `LLM(model="smollm2")` loads the default model; `model` may also be a path to a
    .gguf file or a HuggingFace-format directory. Other keywords go to EngineConfig
    (dtype, max_num_seqs, max_num_batched_tokens, kv_cache_tokens, block_size, seed, ...).
    """

    def __init__(self, model: str = "smollm2", **engine_kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Complete each prompt (a string or a list of token ids); outputs come back in input order.

        `priority`, one int per prompt, orders the queue: lower runs first, ties by arrival.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), sampling_params, use_tqdm, priority)

    def chat(self, conversations: list[Message] | Sequence[list[Message]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation (a list of {role, content}) and generate."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c, add_generation_prompt),
                                         add_special_tokens=False) for c in conversations]
        return self._run(prompts, sampling_params, use_tqdm)

    def _run(self, prompts: list[Prompt], sampling_params, use_tqdm: bool,
             priority: Sequence[int] | None = None) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} SamplingParams for {len(prompts)} prompts")
        priority = [0] * len(prompts) if priority is None else list(priority)
        if len(priority) != len(prompts):
            raise ValueError(f"got {len(priority)} priorities for {len(prompts)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        try:
            for request_id, prompt, params, rank in zip(ids, prompts, sampling_params, priority):
                self.engine.add_request(request_id, prompt, params, priority=rank)
            finished: dict[str, RequestOutput] = {}
            with tqdm(total=len(prompts), desc="Generating", unit="req", disable=not use_tqdm) as bar:
                while len(finished) < len(prompts):
                    for output in self.engine.step():
                        if output.finished:
                            finished[output.request_id] = output
                            bar.update(1)
        finally:
            for request_id in ids:
                self.engine.abort_request(request_id)
        return [finished[request_id] for request_id in ids]
