"""Batched sampler: turns one row of logits per request into the next token.

Stages run in vLLM's order: the constrained rows' token masks (structured
outputs, allowed_token_ids), logit bias, min_tokens masking, repetition penalty,
frequency and presence penalties, greedy argmax, temperature, top-k, top-p, min-p, then a
draw by the exponential trick (argmax of probs / q, q ~ Exp(1)), which needs no
host sync unlike torch.multinomial. Each stage is skipped when no row of the
batch needs it, so an all-greedy batch without penalties is a single argmax.
The only host sync is the final transfer of the results.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from leanserve.engine.structured import TokenMasks
from leanserve.params import Logprob, SamplingParams
from leanserve.scheduler.request import Request


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprob | None]  # None where the request did not ask


class Sampler:
    """Samples one token per row of logits [B, V], row i for requests[i].

    seed seeds the generator shared by the requests without their own seed
    (made on the logits' device at first use); None uses torch's default
    generator. A row given its own generator (the engine makes one for each
    seeded request) draws only from it, so its tokens depend on its seed and
    its logits, never on the rest of the batch. masks holds the allowed next
    tokens of the rows a grammar constrains; banned, the tokens some rows must
    not take now (the last tokens of their bad words).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None

    def __call__(self, logits: torch.Tensor, requests: list[Request],
                 generators: list[torch.Generator | None] | None = None,
                 masks: TokenMasks | None = None, banned: dict[int, list[int]] | None = None) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(f"expected logits of shape [{len(requests)}, vocab], got {tuple(logits.shape)}")
        generators = generators or [None] * len(requests)
        params = [r.sampling_params for r in requests]
        # The stages below never write into their input, so `logits` stays the
        # raw model output that log-probabilities are reported from.
        penalized = _apply_token_masks(logits, requests, masks, banned or {})
        penalized = _apply_logit_bias(penalized, requests)
        penalized = _mask_stop_tokens_under_min_tokens(penalized, requests)
        penalized = _apply_repetition_penalty(penalized, requests)
        penalized = _apply_frequency_presence_penalties(penalized, requests)
        greedy = [p.greedy for p in params]
        if all(greedy):
            token_ids = penalized.argmax(-1)
        else:
            token_ids = self._sample(penalized, params, generators)
            if any(greedy):
                greedy_rows = torch.tensor(greedy, device=logits.device)
                token_ids = torch.where(greedy_rows, penalized.argmax(-1), token_ids)
        return _to_output(logits, token_ids, params)

    def _sample(self, logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> torch.Tensor:
        """Draws from every row; greedy rows get neutral parameters and their
        draw is discarded by the caller, which keeps all work batched."""
        vocab_size = logits.shape[1]
        device = logits.device
        sampled = [not p.greedy for p in params]
        temperatures = [p.temperature if s else 1.0 for p, s in zip(params, sampled)]
        top_ks = [p.top_k if s and 0 < p.top_k < vocab_size else vocab_size for p, s in zip(params, sampled)]
        top_ps = [p.top_p if s else 1.0 for p, s in zip(params, sampled)]
        min_ps = [p.min_p if s else 0.0 for p, s in zip(params, sampled)]

        if any(t != 1.0 for t in temperatures):
            logits = logits / torch.tensor(temperatures, dtype=logits.dtype, device=device)[:, None]
        logits = _apply_top_k_top_p(logits, top_ks, top_ps)
        probs = logits.softmax(-1)
        if any(m > 0.0 for m in min_ps):
            min_p = torch.tensor(min_ps, dtype=probs.dtype, device=device)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), 0.0)
        # argmax(p / q) with q ~ Exp(1) samples from p (p need not be normalized).
        return probs.div_(self._exponential_noise(probs, generators, sampled)).argmax(-1)

    def _exponential_noise(self, probs: torch.Tensor, generators: list[torch.Generator | None],
                           sampled: list[bool]) -> torch.Tensor:
        """Exp(1) noise as -log(U), U ~ uniform [0, 1): five times faster than
        exponential_ on CPU, and q > 0 always, so a filtered token (p = 0) never
        becomes 0 / 0 = NaN, which argmax would pick."""
        seeded_rows = [i for i, g in enumerate(generators) if sampled[i] and g is not None]
        if len(seeded_rows) < sum(sampled):
            uniform = torch.empty_like(probs).uniform_(generator=self._shared_generator(probs.device))
        else:
            uniform = torch.full_like(probs, 0.5)  # the rest are greedy rows, whose draw is discarded
        if seeded_rows:
            # Each seeded request draws a full row from its own generator (on
            # the generator's device), so the draw is the same in any batch.
            draws = [
                torch.rand(probs.shape[1], dtype=probs.dtype, device=generators[i].device, generator=generators[i])
                for i in seeded_rows
            ]
            uniform[torch.tensor(seeded_rows, device=probs.device)] = torch.stack(draws).to(probs.device)
        return uniform.log_().neg_()

    def _shared_generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is not None and self._generator is None:
            self._generator = torch.Generator(device).manual_seed(self.seed)
        return self._generator


def _apply_token_masks(logits: torch.Tensor, requests: list[Request], masks: TokenMasks | None,
                       banned: dict[int, list[int]]) -> torch.Tensor:
    """Only the tokens a row's grammar (masks) and its allowed_token_ids allow, and not banned, stay possible.
    Only the rows with such a rule are touched."""
    allowed_lists = {i: r.sampling_params.allowed_token_ids for i, r in enumerate(requests)
                     if r.sampling_params.allowed_token_ids is not None}
    rows = sorted({*(masks.rows if masks is not None else ()), *allowed_lists, *banned})
    if not rows:
        return logits
    device, vocab_size = logits.device, logits.shape[1]
    at = {row: j for j, row in enumerate(rows)}
    # 0 where a row's token stays possible, -inf where not, added to the rows' logits.
    if masks is not None and masks.rows == rows:
        penalty = masks.penalty(vocab_size).to(device, logits.dtype)
    else:
        penalty = torch.zeros(len(rows), vocab_size, dtype=logits.dtype, device=device)
        if masks is not None:
            penalty[torch.tensor([at[r] for r in masks.rows], device=device)] = masks.penalty(vocab_size).to(
                device, logits.dtype)
    for i, token_ids in allowed_lists.items():
        only = torch.full((vocab_size,), float("-inf"), dtype=logits.dtype, device=device)
        only[torch.tensor(token_ids, device=device)] = 0.0
        penalty[at[i]] += only
    for i, token_ids in banned.items():
        penalty[at[i], torch.tensor(token_ids, device=device)] = float("-inf")
    if len(rows) == logits.shape[0]:
        return logits + penalty
    row_index = torch.tensor(rows, device=device)
    return logits.index_copy(0, row_index, logits.index_select(0, row_index) + penalty)


def _apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    rows: list[int] = []
    cols: list[int] = []
    biases: list[float] = []
    for i, r in enumerate(requests):
        for token_id, bias in (r.sampling_params.logit_bias or {}).items():
            rows.append(i)
            cols.append(token_id)
            biases.append(bias)
    if not rows:
        return logits
    device = logits.device
    return logits.index_put((torch.tensor(rows, device=device), torch.tensor(cols, device=device)),
                            torch.tensor(biases, dtype=logits.dtype, device=device), accumulate=True)


def _mask_stop_tokens_under_min_tokens(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Until a request has min_tokens outputs, its eos and stop tokens cannot be
    chosen (whatever ignore_eos says: that only stops the engine from ending)."""
    rows: list[int] = []
    cols: list[int] = []
    for i, r in enumerate(requests):
        if r.num_output_tokens < r.sampling_params.min_tokens:
            banned = r.eos_token_ids.union(r.sampling_params.stop_token_ids)
            rows += [i] * len(banned)
            cols += banned
    if not rows:
        return logits
    masked = logits.clone()
    masked[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] = float("-inf")
    return masked


def _apply_repetition_penalty(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    penalties = [r.sampling_params.repetition_penalty for r in requests]
    if all(p == 1.0 for p in penalties):
        return logits
    token_ids, _ = _padded_token_ids(
        [r.token_ids if p != 1.0 else [] for r, p in zip(requests, penalties)], logits.device
    )
    penalty = torch.tensor(penalties, dtype=logits.dtype, device=logits.device)[:, None]
    seen = logits.gather(1, token_ids)
    return logits.scatter(1, token_ids, torch.where(seen > 0, seen / penalty, seen * penalty))


def _apply_frequency_presence_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    params = [r.sampling_params for r in requests]
    if all(p.frequency_penalty == 0.0 and p.presence_penalty == 0.0 for p in params):
        return logits
    token_ids, is_token = _padded_token_ids(
        [r.output_token_ids if p.frequency_penalty or p.presence_penalty else [] for r, p in zip(requests, params)],
        logits.device,
    )
    counts = torch.zeros_like(logits).scatter_add_(1, token_ids, is_token.to(logits.dtype)).gather(1, token_ids)
    frequency = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=logits.device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=logits.device)[:, None]
    penalized = logits.gather(1, token_ids) - frequency * counts - presence * (counts > 0)
    return logits.scatter(1, token_ids, penalized)


def _padded_token_ids(token_lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as a [B, L] tensor and a mask of the real entries.

    Penalties gather the logits of these ids and scatter the penalized values
    back, touching B x L entries instead of B x V. A row is padded with its own
    first token, so a pad writes the same value as that token's real entry; an
    empty row is padded with 0, and its penalty is neutral, so logit 0 is
    written back unchanged.
    """
    width = max(map(len, token_lists))
    ids = [tokens + [tokens[0] if tokens else 0] * (width - len(tokens)) for tokens in token_lists]
    is_token = [[True] * len(tokens) + [False] * (width - len(tokens)) for tokens in token_lists]
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(is_token, dtype=torch.bool, device=device))


def _apply_top_k_top_p(logits: torch.Tensor, top_ks: list[int], top_ps: list[float]) -> torch.Tensor:
    """Masks tokens outside each row's top k (ties with the k-th kept, as in
    vLLM) and its top-p nucleus. Only rows that filter are processed, and they
    are sorted only when one of them uses top-p: on CPU a sort costs about 2 ms
    per row at V = 49152, topk alone a few percent of that."""
    vocab_size = logits.shape[1]
    rows = [i for i, (k, p) in enumerate(zip(top_ks, top_ps)) if k < vocab_size or p < 1.0]
    if not rows:
        return logits
    row_index = torch.tensor(rows, device=logits.device)
    subset = logits.index_select(0, row_index)
    top_k = torch.tensor([top_ks[i] for i in rows], device=logits.device)[:, None]
    if all(top_ps[i] == 1.0 for i in rows):
        max_k = max(top_ks[i] for i in rows)  # from the host list: top_k.max() would sync
        kth_largest = subset.topk(max_k, dim=-1).values.gather(1, top_k - 1)
        filtered = subset.masked_fill(subset < kth_largest, float("-inf"))
    else:
        sorted_logits, order = subset.sort(-1)  # ascending: the kept tokens are last
        kth_largest = sorted_logits.gather(1, vocab_size - top_k)  # k = V keeps all
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
        # Drop a token when the tokens above it already hold at least top_p of
        # the mass, i.e. the mass at or below it is at most 1 - top_p.
        top_p = torch.tensor([top_ps[i] for i in rows], dtype=logits.dtype, device=logits.device)[:, None]
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # the most likely token always stays
        filtered = torch.empty_like(subset).scatter_(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.index_copy(0, row_index, filtered)


def _to_output(raw_logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]) -> SamplerOutput:
    """Moves the results to the host in one transfer. Log-probabilities are
    those of the raw model logits, before penalties and temperature."""
    num_top = [p.logprobs for p in params]
    if all(n is None for n in num_top):
        return SamplerOutput(token_ids.tolist(), [None] * len(params))
    logprobs = raw_logits.log_softmax(-1)
    chosen = logprobs.gather(1, token_ids[:, None])
    ranks = (logprobs > chosen).sum(-1, keepdim=True) + 1
    top = logprobs.topk(max(n for n in num_top if n is not None), dim=-1)
    # float64 holds token ids and ranks exactly, so one tensor carries it all.
    packed = torch.cat(
        [t.to(torch.float64) for t in (token_ids[:, None], chosen, ranks, top.indices, top.values)], dim=1
    ).tolist()
    width = top.indices.shape[1]
    token_list: list[int] = []
    logprob_list: list[Logprob | None] = []
    for row, n in zip(packed, num_top):
        token_id = int(row[0])
        token_list.append(token_id)
        if n is None:
            logprob_list.append(None)
            continue
        top_ids, top_values = row[3:3 + width], row[3 + width:]
        logprob_list.append(Logprob(
            token_id=token_id, logprob=row[1], rank=int(row[2]),
            top=[(int(t), v) for t, v in zip(top_ids[:n], top_values[:n])],
        ))
    return SamplerOutput(token_list, logprob_list)
