"""The synchronous engine: add requests, call `step()` until none is left."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os

import torch

from leanserve.engine.engine_config import EngineConfig
from leanserve.engine.loader import load_checkpoint
from leanserve.engine.model_runner import ModelRunner, kv_bytes_per_token
from leanserve.engine.outputs import CompletionOutput, RequestOutput
from leanserve.engine.quantize import quantize_model, resolve_quantization
from leanserve.engine.sampler import Sampler
from leanserve.params import SamplingParams
from leanserve.engine.tokenizer import IncrementalDetokenizer
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


class _Sequence:
    """One of a request's n sequences: its scheduler request, and what only the engine keeps of it (its
    detokenizer, its own random generator if seeded, what it produced since the last report)."""

    def __init__(self, request: Request, detokenizer: IncrementalDetokenizer) -> None:
        self.request = request
        self.detokenizer = detokenizer
        seed = request.sampling_params.seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.text_delta = ""
        self.token_delta: list[int] = []


class _Group:
    """The n sequences of one user request."""

    def __init__(self, request_id: str, prompt: str | None, sequences: list[_Sequence]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.sequences = sequences


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
                                  kv_cache_dtype=config.kv_cache_torch_dtype)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        self.sampler = Sampler(seed=config.seed)
        self._groups: dict[str, _Group] = {}
        self._sequence_of: dict[str, tuple[_Group, _Sequence]] = {}     # by scheduler request id
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
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else prompt_text
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate(token_ids, params)
        max_total = self.max_total_tokens(token_ids, params)
        sequences = []
        for i in range(params.n):
            child_params = params
            if params.n > 1 and params.seed is not None:
                child_params = dataclasses.replace(params, seed=params.seed + i)   # n distinct, reproducible
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            child = Request(child_id, token_ids, child_params, eos_token_ids=self.tokenizer.eos_token_ids,
                            priority=priority)
            detokenizer = IncrementalDetokenizer(
                self.tokenizer, token_ids, skip_special_tokens=params.skip_special_tokens,
                stop_strings=params.stop_strings, include_stop_str_in_output=params.include_stop_str_in_output)
            self.scheduler.add(child, max_total)
            sequences.append(_Sequence(child, detokenizer))
        group = _Group(request_id, text, sequences)
        self._groups[request_id] = group
        for sequence in sequences:
            self._sequence_of[sequence.request.request_id] = group, sequence

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a prompt this engine cannot serve with these parameters."""
        if not token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(token_ids)} tokens; the model's context is {self.max_model_len}")
        if params.max_tokens is not None and len(token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"the prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                             f"exceeds the model's context of {self.max_model_len} tokens")

    def max_total_tokens(self, token_ids: list[int], params: SamplingParams) -> int:
        """The most tokens the request can grow to."""
        return min(self.max_model_len, len(token_ids) + (params.max_tokens or self.max_model_len))

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        for sequence in group.sequences if group else []:
            if not sequence.request.finished:
                self.scheduler.finish(sequence.request, RequestStatus.FINISHED_ABORTED)
            self._sequence_of.pop(sequence.request.request_id, None)
        if not self._groups:
            self._check_when_idle()

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, and report every request that progressed."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        try:
            logits, sampling = self.runner.execute(batch)
            sequences = [self._sequence_of[r.request_id] for r in sampling]
            sampled = self.sampler(logits, sampling, [sequence.generator for _, sequence in sequences])
        except Exception as e:  # noqa: BLE001 - a failed step must not take other requests down
            log.exception("model step failed; failing its %d requests", len(batch))
            groups = {self._sequence_of[r.request_id][0] for r in batch.requests}
            return self._fail(groups, f"{type(e).__name__}: {e}")
        self.scheduler.advance(batch)
        progressed: dict[str, _Group] = {}
        for (group, sequence), token_id, logprob in zip(sequences, sampled.token_ids, sampled.logprobs):
            self._append_token(sequence, token_id, logprob)
            progressed[group.request_id] = group
        reports = [self._report(group) for group in progressed.values()]
        if not self._groups:
            self._check_when_idle()
        return reports

    def _check_when_idle(self) -> None:
        """The scheduler's invariants, once nothing is left to run (cheap then); a broken one is logged
        with the requests and blocks it involves, and serving goes on."""
        try:
            self.scheduler.check_invariants()
        except AssertionError as e:
            log.error("scheduler invariants broken when idle: %s", e)

    def _append_token(self, sequence: _Sequence, token_id: int, logprob) -> None:
        request = sequence.request
        request.append_output_token(token_id, logprob)
        text, stop_string = sequence.detokenizer.add_tokens([token_id])
        status, request.stop_reason = self._stop_status(request, token_id, stop_string)
        if status is not None:
            if stop_string is None:
                text += sequence.detokenizer.flush()
            self.scheduler.finish(request, status)
        sequence.text_delta += text
        sequence.token_delta.append(token_id)

    def _stop_status(self, request: Request, token_id: int, stop_string: str | None):
        """Why the request ends after this token, if it does: (status, stop string or token)."""
        params = request.sampling_params
        if stop_string is not None:
            return RequestStatus.FINISHED_STOPPED, stop_string
        if not params.ignore_eos and token_id in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED, None
        if token_id in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED, token_id
        if request.num_output_tokens == params.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH, None
        return None, None

    def _fail(self, groups: set[_Group], message: str) -> list[RequestOutput]:
        """End every sequence of these requests with an error."""
        for group in groups:
            for sequence in group.sequences:
                if not sequence.request.finished:
                    self.scheduler.finish(sequence.request, RequestStatus.FINISHED_ERROR)
                sequence.request.error = message
        return [self._report(group) for group in groups]

    def _report(self, group: _Group) -> RequestOutput:
        outputs = []
        for i, sequence in enumerate(group.sequences):
            r = sequence.request
            outputs.append(CompletionOutput(
                index=i, text=sequence.detokenizer.output_text, token_ids=list(r.output_token_ids),
                finish_reason=r.status.value if r.finished else None, stop_reason=r.stop_reason,
                logprobs=list(r.output_logprobs) if r.sampling_params.logprobs is not None else None,
                text_delta=sequence.text_delta, token_ids_delta=sequence.token_delta))
            sequence.text_delta, sequence.token_delta = "", []
        first = group.sequences[0].request
        report = RequestOutput(group.request_id, group.prompt, first.prompt_token_ids, outputs, error=first.error,
                               arrival_time=first.arrival_time, first_scheduled_time=first.first_scheduled_time)
        if report.finished:
            del self._groups[group.request_id]
            for sequence in group.sequences:
                del self._sequence_of[sequence.request.request_id]
        return report
