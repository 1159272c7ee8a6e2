"""The synchronous engine: add requests, call `step()` until none is left."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os

import torch

from leanserve.engine.engine_config import EngineConfig
from leanserve.engine.executor import NativeExecutor
from leanserve.engine.loader import load_checkpoint
from leanserve.engine.model_runner import ModelRunner, kv_bytes_per_token
from leanserve.engine.output_processor import OutputProcessor
from leanserve.engine.outputs import RequestOutput
from leanserve.engine.quantize import quantize_model, resolve_quantization
from leanserve.engine.sampler import Sampler
from leanserve.params import SamplingParams
from leanserve.scheduler.block_manager import BlockManager
from leanserve.scheduler.request import Request, RequestStatus
from leanserve.scheduler.scheduler import Scheduler

log = logging.getLogger("leanserve.engine")


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        checkpoint = load_checkpoint(config.model)
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        self.max_model_len = min(config.max_model_len or self.model_config.max_position_embeddings,
                                 self.model_config.max_position_embeddings)
        self.quantization = resolve_quantization(config.quantization, checkpoint)
        num_blocks = self._num_kv_blocks()
        self.runner = ModelRunner(self.model_config, checkpoint.weights, config.torch_dtype, num_blocks,
                                  config.block_size, config.device, config.attention_backend,
                                  quantize=functools.partial(quantize_model, mode=self.quantization,
                                                             checkpoint=checkpoint, device=config.device),
                                  kv_cache_dtype=config.kv_cache_torch_dtype, deterministic=config.deterministic)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        self.sampler = Sampler(seed=config.seed)
        self.outputs = OutputProcessor(self.tokenizer, self.max_model_len, self.model_config.vocab_size)
        kv_tokens = num_blocks * config.block_size
        kv_dtype = config.kv_cache_torch_dtype
        kv_name = str(kv_dtype).removeprefix("torch.")
        log.info("loaded %s (%s, %d layers, %s, %s weights); KV cache %d tokens in %d blocks of %d, %s",
                 checkpoint.path, self.model_config.architecture, self.model_config.num_hidden_layers,
                 config.dtype, self.quantization, kv_tokens, num_blocks, config.block_size, kv_name,
                 extra={"model_path": str(checkpoint.path), "dtype": config.dtype, "quantization": self.quantization,
                        "max_model_len": self.max_model_len, "kv_cache_dtype": kv_name,
                        "kv_cache_tokens": kv_tokens, "kv_cache_gib": round(
                            kv_tokens * kv_bytes_per_token(self.model_config, kv_dtype) / 2**30, 2)})
        self.kernels = self.runner.executor.describe()
        executor = self.runner.executor
        if config.deterministic and not (isinstance(executor, NativeExecutor) and executor.dense_linears == 0):
            log.warning("deterministic: batch-invariant logits need the native executor with quantized weights "
                        "(int4, int8); this model runs %s, whose float32 matmuls may sum in another order in "
                        "another batch", self.kernels["executor"])
        log.info("kernels: %s", "; ".join(f"{op}: {path}" for op, path in self.kernels.items()), extra=self.kernels)

    def _num_kv_blocks(self) -> int:
        cfg = self.config
        tokens = cfg.kv_cache_tokens
        if tokens is None:
            per_token = kv_bytes_per_token(self.model_config, cfg.kv_cache_torch_dtype)
            tokens = int(available_memory_bytes() * cfg.kv_cache_memory_fraction) // per_token
            tokens = min(tokens, cfg.max_num_seqs * self.max_model_len)
        return max(1, tokens // cfg.block_size)

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0, prompt_text: str | None = None) -> None:
        """Queue a request (a string, or token ids with their text if known); ValueError if it cannot be served."""
        params = params or SamplingParams()
        if request_id in self.outputs:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else prompt_text
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate(token_ids, params)
        max_total = self.max_total_tokens(token_ids, params)
        children = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = dataclasses.replace(params, seed=params.seed + i)   # n distinct, reproducible
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            children.append(Request(child_id, token_ids, child_params, eos_token_ids=self.tokenizer.eos_token_ids,
                                    priority=priority))
        self.outputs.add(request_id, text, children)
        for i, child in enumerate(children):
            try:
                self.scheduler.add(child, max_total)
            except ValueError:                        # none of the n sequences runs
                for added in children[:i]:
                    self.scheduler.finish(added, RequestStatus.FINISHED_ABORTED)
                self.outputs.remove(request_id)
                raise

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a prompt this engine cannot serve with these parameters."""
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        for name, ids in (("logit_bias", params.logit_bias or ()), ("allowed_token_ids", params.allowed_token_ids or ()),
                          ("stop_token_ids", params.stop_token_ids)):
            if any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"{name} token ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens; the model's context is {self.max_model_len}")
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                             f"exceeds the model's context of {self.max_model_len} tokens")

    def max_total_tokens(self, token_ids: list[int], params: SamplingParams) -> int:
        """The most tokens the request can grow to."""
        return min(self.max_model_len, len(token_ids) + (params.max_tokens or self.max_model_len))

    def abort_request(self, request_id: str) -> None:
        removed = self.outputs.remove(request_id)
        for request in removed:
            if not request.finished:
                self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        if removed and not self.outputs:
            self._check_when_idle()

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that progressed."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampling = batch.sampling_requests()
        masks = self.outputs.start_masks(sampling)        # computed while the model runs
        try:
            logits = self.runner.execute(batch)
            sampled = self.sampler(logits, sampling, self.outputs.generators(sampling), masks and masks.result(),
                                   self.outputs.banned_tokens(sampling))
        except Exception as e:  # noqa: BLE001 - a failed step must not take other requests down
            log.exception("model step failed; failing its %d requests", len(batch))
            for request in self.outputs.fail(batch.requests, f"{type(e).__name__}: {e}"):
                if not request.finished:
                    self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)
            return self._reports()
        self.scheduler.advance(batch)
        for request, token_id, logprob in zip(sampling, sampled.token_ids, sampled.logprobs):
            status = self.outputs.append(request, token_id, logprob)
            if status is not None:
                self.scheduler.finish(request, status)
        return self._reports()

    def _reports(self) -> list[RequestOutput]:
        """This step's reports; once the last request is reported, the idle check."""
        reports = self.outputs.reports()
        if not self.outputs:
            self._check_when_idle()
        return reports

    def _check_when_idle(self) -> None:
        """The scheduler's invariants, once nothing is left to run (cheap then); a broken one is logged
        with the requests and blocks it involves, and serving goes on."""
        try:
            self.scheduler.check_invariants()
        except AssertionError as e:
            log.error("scheduler invariants broken when idle: %s", e)
