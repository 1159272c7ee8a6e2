"""Continuous batching: each step decides how many tokens every request computes.

A request is "computed tokens vs total tokens": a decoding request has one
uncomputed token (its last sample), a prefilling one has the rest of its
prompt, so prefill, chunked prefill, prefix-cache hits and decode are the same
subtraction. Budget split as vLLM's: running requests first (decodes before
prefill chunks), then waiting prompts, under `max_num_batched_tokens` tokens
and `max_num_seqs` sequences per step.

Waiting prompts are prepacked: the most urgent one (lowest priority value, then
earliest arrival) is always taken, so nothing waits forever, and the rest of
the budget is filled with the shortest waiting prompts that fit (prepacking.py).
"""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from leanserve.scheduler.block_manager import BlockManager, cdiv
from leanserve.scheduler.prepacking import shortest_first_fill
from leanserve.scheduler.request import Request, RequestStatus


@dataclass
class ScheduledBatch:
    """The work of one step: `num_tokens[i]` tokens of `requests[i]`, starting at its computed count."""

    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)

    def add(self, request: Request, num_tokens: int) -> None:
        self.requests.append(request)
        self.num_tokens.append(num_tokens)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @staticmethod
    def samples(request: Request, num_tokens: int) -> bool:
        """Whether a request's step of num_tokens computes its last token, so that it samples the next."""
        return request.num_computed_tokens + num_tokens == request.num_tokens

    def sampling_requests(self) -> list[Request]:
        """The requests that sample in this step, in batch order."""
        return [r for r, n in zip(self.requests, self.num_tokens) if self.samples(r, n)]


def _urgency(request: Request) -> tuple[int, int]:
    return request.priority, request.arrival_index


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Request] = []       # sorted by urgency
        self.running: list[Request] = []       # in admission order
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_computed_tokens = 0       # tokens the model has run, all requests, all steps

    def add(self, request: Request, max_total_tokens: int) -> None:
        """Queue a request that may grow to `max_total_tokens` tokens; refuse one the cache can never hold."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if cdiv(max_total_tokens, self.block_manager.block_size) > self.block_manager.num_blocks:
            raise ValueError(
                f"request {request.request_id!r} needs up to {max_total_tokens} tokens of KV cache, "
                f"more than the whole cache holds ({self.block_manager.num_blocks * self.block_manager.block_size})")
        self.requests[request.request_id] = request
        bisect.insort(self.waiting, request, key=_urgency)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        # Decodes first, then chunks of prompts already started. When the cache is full, the least
        # urgent request not yet in this step's batch (possibly this one) gives its blocks back.
        scheduled: set[int] = set()
        for request in sorted(self.running, key=lambda r: r.num_uncomputed_tokens > 1):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:   # preempted earlier in this loop
                continue
            num_tokens = min(request.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate(request, num_tokens):
                preempted = True
                victim = max((r for r in self.running if id(r) not in scheduled), key=_urgency)
                self._preempt(victim)
                if victim is request:
                    break
            else:
                batch.add(request, num_tokens)
                scheduled.add(id(request))
                budget -= num_tokens
        # New prompts join only when nothing had to make room this step.
        if not preempted and budget > 0:
            self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        candidates = self.waiting[:self.max_num_seqs - len(self.running)]
        if not candidates:
            return
        head = candidates[0]            # alone when it fills the step (chunked if chunking is on)
        pack = [candidates[i] for i in shortest_first_fill([r.num_uncomputed_tokens for r in candidates], budget)]
        pack.sort(key=_urgency)
        for request in pack:
            self.block_manager.match_prefix(request)
            num_tokens = request.num_uncomputed_tokens
            if self.enable_chunked_prefill:
                num_tokens = min(num_tokens, budget)
            elif num_tokens > budget and request is not head:
                num_tokens = 0
            if num_tokens == 0 or not self.block_manager.allocate(request, num_tokens):
                self.block_manager.free(request)          # hand back its prefix hits
                request.num_computed_tokens = 0
                if request is head:
                    return
                continue
            self.waiting.remove(request)
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
                request.num_cached_tokens = request.num_computed_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.add(request, num_tokens)
            budget = max(0, budget - num_tokens)

    def advance(self, batch: ScheduledBatch) -> None:
        """After the model ran the batch: count its tokens as computed and publish full blocks."""
        for request, num_tokens in zip(batch.requests, batch.num_tokens):
            request.num_computed_tokens += num_tokens
            self.block_manager.cache_full_blocks(request)
        self.num_computed_tokens += batch.total_tokens

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and queue it again; it recomputes prompt and outputs later."""
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=_urgency)
        self.num_preemptions += 1

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Remove a request wherever it is and free its blocks at once."""
        assert status.finished
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request)
        self.requests.pop(request.request_id, None)

    def abort(self, request_id: str) -> bool:
        """Abort a request wherever it is; False if it is not (or no longer) here."""
        request = self.requests.get(request_id)
        if request is None:
            return False
        self.finish(request, RequestStatus.FINISHED_ABORTED)
        return True

    def check_invariants(self) -> None:
        """Raise AssertionError naming the requests (and blocks) of every broken invariant; cheap when idle."""
        def ids(requests) -> str:
            return ", ".join(sorted(r.request_id for r in requests))

        waiting, running, known = set(self.waiting), set(self.running), set(self.requests.values())
        problems = []
        if waiting & running:
            problems.append(f"both waiting and running: {ids(waiting & running)}")
        if known - waiting - running:
            problems.append(f"known but neither waiting nor running: {ids(known - waiting - running)}")
        if (waiting | running) - known:
            problems.append(f"finished but still queued: {ids((waiting | running) - known)}")
        if bad := [r for r in waiting if r.status is not RequestStatus.WAITING or r.block_table]:
            problems.append(f"waiting with another status or holding blocks: {ids(bad)}")
        if bad := [r for r in running if r.status is not RequestStatus.RUNNING]:
            problems.append(f"running with another status: {ids(bad)}")
        if [_urgency(r) for r in self.waiting] != sorted(_urgency(r) for r in self.waiting):
            problems.append("the waiting queue is out of order")
        if len(self.running) > self.max_num_seqs:
            problems.append(f"{len(self.running)} running, more than max_num_seqs {self.max_num_seqs}")
        problems += self.block_manager.invariant_problems(self.running)
        if problems:
            raise AssertionError("; ".join(problems))
