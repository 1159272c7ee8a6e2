"""From sampled tokens to what callers get: detokenizing, stop rules, the n sequences of a request and
the reports of each step.

Its cost per token does not grow with the output's length: a report carries what changed since the last
one (text, token ids and log-probs), and a request's whole text, token ids and log-probs are assembled
once, in its final report.
"""
from __future__ import annotations

from concurrent.futures import Future

import llguidance
import torch

from leanserve.engine.outputs import CompletionOutput, RequestOutput
from leanserve.engine.structured import GrammarCompiler, MaskFiller, TokenMasks
from leanserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from leanserve.params import Logprob
from leanserve.scheduler.request import Request, RequestStatus


class Sequence:
    """One of a request's n sequences: its scheduler request and what only the engine keeps of it (its
    detokenizer, its own random generator if seeded, its grammar's matcher if constrained, what it
    produced since the last report)."""

    def __init__(self, request: Request, tokenizer: Tokenizer, matcher: llguidance.LLMatcher | None) -> None:
        params = request.sampling_params
        self.request = request
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, request.prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
            stop_strings=params.stop_strings, include_stop_str_in_output=params.include_stop_str_in_output)
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.matcher = matcher
        self.bad_words = _bad_word_ids(tokenizer, params.bad_words or [])
        self.text_delta = ""
        self.token_delta: list[int] = []
        self.logprob_delta: list[Logprob] = []

    def output(self, index: int, final: bool) -> CompletionOutput:
        """This sequence's part of a report (and its deltas start again)."""
        r = self.request
        wants_logprobs = r.sampling_params.logprobs is not None
        out = CompletionOutput(
            index=index, finish_reason=r.status.value if r.finished else None, stop_reason=r.stop_reason,
            text_delta=self.text_delta, token_ids_delta=self.token_delta,
            logprobs_delta=self.logprob_delta if wants_logprobs else None)
        if final:
            out.text, out.token_ids = self.detokenizer.output_text, list(r.output_token_ids)
            out.logprobs = list(r.output_logprobs) if wants_logprobs else None
        self.text_delta, self.token_delta, self.logprob_delta = "", [], []
        return out


class _Group:
    """The n sequences of one user request."""

    def __init__(self, request_id: str, prompt: str | None, sequences: list[Sequence]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.sequences = sequences


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer, max_model_len: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.grammars = GrammarCompiler(tokenizer, vocab_size)
        self._masks = MaskFiller(vocab_size)
        self._groups: dict[str, _Group] = {}
        self._sequences: dict[str, tuple[_Group, Sequence]] = {}     # by scheduler request id
        self._progressed: dict[str, _Group] = {}                       # reported at the next `reports()`

    def __len__(self) -> int:
        """Requests not yet finished and reported."""
        return len(self._groups)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._groups

    def add(self, request_id: str, prompt: str | None, requests: list[Request]) -> None:
        """Take a request's n sequences; ValueError if its structured output does not compile."""
        spec = requests[0].sampling_params.structured_outputs
        matchers = self.grammars.matchers(spec, len(requests)) if spec is not None else [None] * len(requests)
        group = _Group(request_id, prompt, [Sequence(r, self.tokenizer, m) for r, m in zip(requests, matchers)])
        self._groups[request_id] = group
        for sequence in group.sequences:
            self._sequences[sequence.request.request_id] = group, sequence

    def generators(self, requests: list[Request]) -> list[torch.Generator | None]:
        """The random generator of each request (None for those without a seed), for the sampler."""
        return [self._sequences[r.request_id][1].generator for r in requests]

    def start_masks(self, requests: list[Request]) -> Future[TokenMasks] | None:
        """The next-token masks of the constrained ones among a step's sampling requests, computed on a
        worker thread while the model runs (None if none is constrained)."""
        return self._masks.start([self._sequences[r.request_id][1].matcher for r in requests])

    def banned_tokens(self, requests: list[Request]) -> dict[int, list[int]]:
        """Per row (of those with bad words), the tokens that would complete one of them now."""
        banned = {}
        for i, r in enumerate(requests):
            tail = r.output_token_ids          # a word's last token is banned where the output ends with the rest
            ids = [w[-1] for w in self._sequences[r.request_id][1].bad_words
                   if len(tail) >= len(w) - 1 and tail[len(tail) - len(w) + 1:] == w[:-1]]
            if ids:
                banned[i] = ids
        return banned

    def append(self, request: Request, token_id: int, logprob: Logprob | None) -> RequestStatus | None:
        """Add a sampled token to its request; the status it finishes with, if this token ends it."""
        group, sequence = self._sequences[request.request_id]
        request.append_output_token(token_id, logprob)
        text, stop_string = sequence.detokenizer.add_tokens([token_id])
        status, request.stop_reason = self._stop_status(request, token_id, stop_string)
        if sequence.matcher is not None and status is None:
            status = self._grammar_status(request, sequence.matcher, token_id)
        if status is not None and stop_string is None:
            text += sequence.detokenizer.flush()
        sequence.text_delta += text
        sequence.token_delta.append(token_id)
        if logprob is not None:
            sequence.logprob_delta.append(logprob)
        self._progressed[group.request_id] = group
        return status

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

    @staticmethod
    def _grammar_status(request: Request, matcher: llguidance.LLMatcher, token_id: int) -> RequestStatus | None:
        """Feed the token to the request's grammar: it ends the request once the grammar is complete (and
        fails it if the grammar refused the token, which its mask should have prevented)."""
        if not matcher.consume_token(token_id):
            request.error = f"the structured output's grammar refused token {token_id}"
            return RequestStatus.FINISHED_ERROR
        return RequestStatus.FINISHED_STOPPED if matcher.is_stopped() else None

    def fail(self, requests: list[Request], message: str) -> list[Request]:
        """Mark the user requests these scheduler requests belong to as failed (reported at the next
        `reports()`); returns all their sequences' requests, for the scheduler to finish."""
        failed = []
        for request in requests:
            group, _ = self._sequences[request.request_id]
            self._progressed[group.request_id] = group
            failed += [s.request for s in group.sequences if s.request not in failed]
        for request in failed:
            request.error = message
        return failed

    def reports(self) -> list[RequestOutput]:
        """A report of each request that progressed since the last call; a finished one is forgotten."""
        progressed, self._progressed = self._progressed, {}
        return [self._report(group) for group in progressed.values()]

    def _report(self, group: _Group) -> RequestOutput:
        final = all(s.request.finished for s in group.sequences)
        first = group.sequences[0].request
        report = RequestOutput(group.request_id, group.prompt, first.prompt_token_ids,
                               [s.output(i, final) for i, s in enumerate(group.sequences)], error=first.error,
                               arrival_time=first.arrival_time, first_scheduled_time=first.first_scheduled_time,
                               num_cached_tokens=first.num_cached_tokens)
        if final:
            self.remove(group.request_id)
        return report

    def remove(self, request_id: str) -> list[Request]:
        """Forget a request; its sequences' requests (none if it is unknown)."""
        group = self._groups.pop(request_id, None)
        self._progressed.pop(request_id, None)
        for sequence in group.sequences if group else []:
            del self._sequences[sequence.request.request_id]
        return [s.request for s in group.sequences] if group else []


def _bad_word_ids(tokenizer: Tokenizer, words: list[str]) -> list[list[int]]:
    """Each bad word's token ids as it would be generated, with and without a leading space (as vLLM)."""
    found = {tuple(tokenizer.encode(prefix + w.strip(), add_special_tokens=False))
             for w in words for prefix in ("", " ")}
    return [list(ids) for ids in found if ids]
