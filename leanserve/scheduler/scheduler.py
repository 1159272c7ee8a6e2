"""Continuous batching: each step decides how many tokens every request computes.

A request is "computed tokens vs total tokens": a decoding request has one
uncomputed token (its last sample), a prefilling one has the rest of its
prompt, so prefill, chunked prefill and decode are the same subtraction.
Budget split as vLLM's: running requests first, then waiting ones, under
`max_num_batched_tokens` tokens and `max_num_seqs` sequences per step.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from leanserve.scheduler.block_manager import BlockManager, cdiv
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


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    def add(self, request: Request, max_total_tokens: int) -> None:
        """Queue a request that may grow to `max_total_tokens` tokens; refuse one the cache can never hold."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        blocks = cdiv(max_total_tokens, self.block_manager.block_size)
        if blocks > self.block_manager.num_blocks:
            raise ValueError(
                f"request {request.request_id!r} needs up to {max_total_tokens} tokens of KV cache, "
                f"more than the whole cache holds ({self.block_manager.num_blocks * self.block_manager.block_size})")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        preempted = False
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            num_tokens = min(request.num_uncomputed_tokens, budget)
            while not self.block_manager.allocate(request, num_tokens):
                preempted = True
                self._preempt(self.running[-1])
                if request.status is not RequestStatus.RUNNING:
                    break
            else:
                batch.add(request, num_tokens)
                budget -= num_tokens
        # New requests join only when nothing had to make room this step.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            num_tokens = min(request.num_uncomputed_tokens, budget)
            if not self.block_manager.allocate(request, num_tokens):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.add(request, num_tokens)
            budget -= num_tokens
        return batch

    def _preempt(self, request: Request) -> None:
        """Free the request's blocks and queue it first; it recomputes prompt and outputs later."""
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
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

    def check_invariants(self) -> None:
        waiting, running = set(self.waiting), set(self.running)
        assert not waiting & running, "a request is both waiting and running"
        assert waiting | running == set(self.requests.values()), "a request is lost or finished but still queued"
        assert all(r.status is RequestStatus.WAITING and not r.block_table for r in waiting)
        assert all(r.status is RequestStatus.RUNNING for r in running)
        assert len(self.running) <= self.max_num_seqs
        self.block_manager.check_invariants(self.running)
