"""What the engine hands back each step."""
from __future__ import annotations

from dataclasses import dataclass, field

from leanserve.params import Logprob


@dataclass
class CompletionOutput:
    """One sequence's part of a report. The deltas are what it produced since the last report; the whole
    text, token ids and log-probs are filled in the request's final report only (empty before)."""

    index: int
    finish_reason: str | None = None     # 'stop', 'length', 'abort' or 'error'
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    text_delta: str = ""
    token_ids_delta: list[int] = field(default_factory=list)
    logprobs_delta: list[Logprob] | None = None     # None where the request asked for no log-probs
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    error: str | None = None
    # time.monotonic() when the request arrived and when the scheduler first gave it compute.
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    num_cached_tokens: int = 0          # prompt tokens read from the prefix cache

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)
