"""Sampler behaviour on random logits over a small vocabulary: each parameter
has a test that fails if the sampler ignored it."""
from __future__ import annotations

import pytest
import torch

from leanserve.engine.sampler import Sampler, _apply_frequency_presence_penalties, _apply_repetition_penalty
from leanserve.engine.structured import TokenMasks
from leanserve.params import SamplingParams
from leanserve.scheduler.request import Request

VOCAB = 50
EOS = 2


def make_request(prompt=(1,), output=(), **params) -> Request:
    request = Request("r", prompt_token_ids=list(prompt), sampling_params=SamplingParams(**params),
                      eos_token_ids=frozenset({EOS}))
    for token_id in output:
        request.append_output_token(token_id)
    return request


def own_generators(requests: list[Request]) -> list[torch.Generator | None]:
    """What the engine gives each seeded request: its own generator, seeded with its seed."""
    return [torch.Generator().manual_seed(r.sampling_params.seed) if r.sampling_params.seed is not None else None
            for r in requests]


def random_logits(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def reference_probs(logits: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """Target distribution of one row, filter by filter, in float64."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = probs.argsort(descending=True)
    keep = torch.ones_like(probs, dtype=torch.bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        kept = torch.where(keep, probs, 0.0)
        cumulative = (kept / kept.sum())[order].cumsum(0)
        nucleus_size = int((cumulative < top_p).sum()) + 1  # smallest prefix reaching top_p
        assert abs(cumulative[nucleus_size - 1] - top_p) > 1e-4, "boundary too close to call"
        keep[order[nucleus_size:]] = False
    if min_p:
        keep &= probs >= min_p * torch.where(keep, probs, 0.0).max()
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum()


def empirical_probs(logits_row: torch.Tensor, num_draws: int = 20000, **params) -> torch.Tensor:
    """Distribution of num_draws unseeded draws, taken as one batch."""
    shared = SamplingParams(**params)
    requests = [Request(f"r{i}", [1], shared) for i in range(num_draws)]
    token_ids = Sampler(seed=0)(logits_row.expand(num_draws, -1), requests).token_ids
    return torch.bincount(torch.tensor(token_ids), minlength=logits_row.numel()).double() / num_draws


def total_variation(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * float((p - q).abs().sum())


# --- greedy -------------------------------------------------------------------


def test_greedy_is_argmax_and_draws_no_randomness():
    logits = random_logits(8, VOCAB)
    requests = [make_request(temperature=0.0) for _ in range(8)]
    rng_state = torch.get_rng_state()
    out = Sampler()(logits, requests)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 8
    assert torch.equal(torch.get_rng_state(), rng_state)  # all-greedy: just an argmax


# --- temperature, top-k, top-p, min-p: empirical vs reference distribution ----

DISTRIBUTION_CASES = [
    # (sampling params, the same with the parameter under test switched off)
    (dict(temperature=0.5), dict(temperature=1.0)),
    (dict(temperature=2.0), dict(temperature=1.0)),
    (dict(top_k=5), dict()),
    (dict(top_p=0.6), dict()),
    (dict(min_p=0.1), dict()),
    (dict(temperature=0.8, top_k=10, top_p=0.8, min_p=0.05), dict(temperature=0.8)),
]


@pytest.mark.parametrize("params,params_off", DISTRIBUTION_CASES)
def test_sampled_distribution_matches_reference(params, params_off):
    logits = random_logits(VOCAB, seed=1)
    expected = reference_probs(logits, **params)
    # The parameter must matter, or the check below would prove nothing.
    assert total_variation(expected, reference_probs(logits, **params_off)) > 0.15
    observed = empirical_probs(logits, **params)
    assert observed[expected == 0].sum() == 0, "sampled a token the filters exclude"
    assert (observed > 0).sum() > 1, "sampling collapsed to one token"
    assert total_variation(observed, expected) < 0.04


def test_top_k_never_leaves_the_top_k():
    logits = random_logits(VOCAB, seed=2, scale=0.5)  # flat: many tokens would appear without top-k
    observed = empirical_probs(logits, num_draws=4000, top_k=3)
    assert set(observed.nonzero().flatten().tolist()) == set(logits.topk(3).indices.tolist())


# --- penalties ----------------------------------------------------------------


def greedy_pick(logits_row: torch.Tensor, request: Request) -> int:
    return Sampler()(logits_row[None], [request]).token_ids[0]


def test_repetition_penalty_on_positive_and_negative_logits():
    logits = torch.full((VOCAB,), -5.0)
    logits[7], logits[3] = 2.0, 1.5
    assert greedy_pick(logits, make_request(prompt=[7], temperature=0.0)) == 7
    assert greedy_pick(logits, make_request(prompt=[7], temperature=0.0, repetition_penalty=2.0)) == 3  # 2.0 / 2
    assert greedy_pick(logits, make_request(output=[7], temperature=0.0, repetition_penalty=2.0)) == 3
    logits[7], logits[3] = -0.5, -0.6  # negative logits are multiplied, not divided
    assert greedy_pick(logits, make_request(prompt=[7], temperature=0.0, repetition_penalty=1.5)) == 3


def test_frequency_penalty_counts_occurrences_presence_does_not():
    logits = torch.full((VOCAB,), -5.0)
    logits[10], logits[11] = 2.0, 1.4
    output = [10, 10, 10, 11]
    # presence: both lose 1.0 once -> 10 keeps the lead.
    assert greedy_pick(logits, make_request(output=output, temperature=0.0, presence_penalty=1.0)) == 10
    # frequency: 10 loses 3 * 0.5, 11 loses 0.5 -> 11 wins.
    assert greedy_pick(logits, make_request(output=output, temperature=0.0, frequency_penalty=0.5)) == 11
    # Neither looks at the prompt.
    assert greedy_pick(logits, make_request(prompt=[10] * 5, temperature=0.0,
                                            frequency_penalty=2.0, presence_penalty=2.0)) == 10
    # A presence penalty does act: it sinks a token seen once below an unseen one.
    logits[12] = 1.9
    assert greedy_pick(logits, make_request(output=[10], temperature=0.0, presence_penalty=1.0)) == 12


def test_penalties_match_a_dense_reference_on_ragged_histories():
    """Rows of different lengths, repeated tokens and token 0 exercise the
    padding of the gather/scatter penalty path."""
    logits = random_logits(4, VOCAB, seed=4)
    requests = [
        make_request(prompt=[0, 3, 3], output=[7, 0, 7, 7], repetition_penalty=1.7, frequency_penalty=0.4,
                     presence_penalty=0.3),
        make_request(prompt=[5], output=[6], repetition_penalty=0.6, presence_penalty=-1.0),
        make_request(prompt=[9, 9], frequency_penalty=1.0),  # no output yet
        make_request(prompt=[1], output=[0, 4]),  # no penalties at all
    ]
    expected = logits.clone()
    for row, request in enumerate(requests):
        params = request.sampling_params
        penalty = params.repetition_penalty
        for token_id in set(request.token_ids):
            value = expected[row, token_id]
            expected[row, token_id] = value / penalty if value > 0 else value * penalty
        for token_id in set(request.output_token_ids):
            count = request.output_token_ids.count(token_id)
            expected[row, token_id] -= params.frequency_penalty * count + params.presence_penalty
    penalized = _apply_frequency_presence_penalties(_apply_repetition_penalty(logits, requests), requests)
    torch.testing.assert_close(penalized, expected)


# --- min_tokens ---------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_masks_eos_and_stop_tokens_until_reached(temperature):
    stop_token = 5
    for dominant in (EOS, stop_token):
        logits = random_logits(VOCAB, seed=3)
        logits[dominant] = 30.0
        for num_output in range(4):
            request = make_request(output=[9] * num_output, temperature=temperature, min_tokens=3,
                                   stop_token_ids=[stop_token], ignore_eos=True)
            token_ids = Sampler(seed=num_output)(logits.expand(64, -1), [request] * 64).token_ids
            if num_output < 3:
                assert dominant not in token_ids
            else:
                assert set(token_ids) == {dominant}


# --- seeds --------------------------------------------------------------------


def batch_mates() -> list[Request]:
    """Requests that take every sampler stage, so they change the batch's path."""
    return [
        make_request(temperature=0.0, repetition_penalty=1.3),
        make_request(temperature=0.7),
        make_request(temperature=1.0, seed=999, top_p=0.5),
        make_request(temperature=1.3, top_k=4, min_p=0.1, frequency_penalty=0.5),
    ]


def seeded_tokens(seed: int, row: int, mates: list[Request], sampler_seed: int | None, steps: int = 8) -> list[int]:
    target = make_request(prompt=[1, 4, 9], temperature=0.9, top_k=20, seed=seed, presence_penalty=0.5)
    sampler = Sampler(seed=sampler_seed)
    batch = mates[:row] + [target] + mates[row:]
    generators = own_generators(batch)             # each lives as long as its request, over the steps
    for step in range(steps):
        logits = random_logits(len(batch), VOCAB, seed=100 + step + 7 * len(batch), scale=1.0)
        logits[row] = random_logits(VOCAB, seed=step, scale=1.0)  # the target's own logits
        target.append_output_token(sampler(logits, batch, generators).token_ids[row])
    return target.output_token_ids


def test_seed_gives_same_tokens_in_any_batch_and_row():
    alone = seeded_tokens(seed=42, row=0, mates=[], sampler_seed=None)
    assert seeded_tokens(seed=42, row=0, mates=batch_mates(), sampler_seed=1) == alone
    assert seeded_tokens(seed=42, row=3, mates=batch_mates(), sampler_seed=2) == alone
    assert seeded_tokens(seed=43, row=0, mates=[], sampler_seed=None) != alone


# --- logprobs -----------------------------------------------------------------


def test_logprobs_are_raw_log_softmax_with_rank_and_sorted_top_n():
    logits = random_logits(4, VOCAB, seed=5)
    favourite = int(logits[3].argmax())
    requests = [
        make_request(temperature=0.7, repetition_penalty=1.5, frequency_penalty=1.0, logprobs=3, seed=0),
        make_request(temperature=0.0, logprobs=0),
        make_request(temperature=0.0),
        # The penalty pushes the greedy pick off the raw favourite, so its rank is > 1.
        make_request(prompt=[favourite], temperature=0.0, repetition_penalty=100.0, logprobs=5),
    ]
    out = Sampler()(logits, requests)
    reference = torch.log_softmax(logits, -1)
    assert out.logprobs[2] is None
    for row, n in [(0, 3), (1, 0), (3, 5)]:
        lp, token_id = out.logprobs[row], out.token_ids[row]
        assert lp.token_id == token_id
        assert lp.logprob == pytest.approx(reference[row, token_id].item(), abs=1e-6)
        assert lp.rank == 1 + int((reference[row] > reference[row, token_id]).sum())
        top = reference[row].topk(n)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-6)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert out.logprobs[1].rank == 1
    assert out.logprobs[3].rank > 1


# --- mixed batch --------------------------------------------------------------


def mixed_requests() -> list[Request]:
    return [
        make_request(temperature=0.0),
        make_request(prompt=[1, 2, 3], output=[4, 4], temperature=0.0, repetition_penalty=1.8, frequency_penalty=0.7),
        make_request(temperature=0.7, top_k=10, seed=7),
        make_request(output=[8], temperature=1.2, top_p=0.8, min_p=0.05, presence_penalty=1.0, seed=8),
        make_request(temperature=1.0),  # unseeded: only checked to be a valid token
        make_request(temperature=0.0, min_tokens=2),
    ]


def test_mixed_batch_gives_each_row_what_it_gets_alone():
    logits = random_logits(6, VOCAB, seed=6)
    logits[5, EOS] = 50.0  # row 5 must not pick eos under min_tokens
    raw = logits.clone()
    batch = mixed_requests()
    out = Sampler(seed=3)(logits, batch, own_generators(batch))
    assert torch.equal(logits, raw), "the sampler must not write into the caller's logits"
    alone = [Sampler()(logits[i:i + 1], [r], own_generators([r])).token_ids[0] for i, r in enumerate(mixed_requests())]
    for row in (0, 1, 2, 3, 5):
        assert out.token_ids[row] == alone[row]
    assert 0 <= out.token_ids[4] < VOCAB
    assert out.token_ids[5] != EOS


# --- token masks, logit bias, allowed tokens ------------------------------------


def bitmask_of(allowed_rows: list[list[int]]) -> torch.Tensor:
    """llguidance's layout: bit t % 32 of word t // 32 allows token t."""
    words = torch.zeros(len(allowed_rows), (VOCAB + 31) // 32, dtype=torch.int64)
    for row, tokens in enumerate(allowed_rows):
        for t in tokens:
            words[row, t // 32] |= 1 << (t % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_token_masks_apply_to_their_rows_only():
    logits = random_logits(3, VOCAB, seed=11)
    favourites = logits.argmax(-1).tolist()
    allowed = [t for t in range(VOCAB) if t not in favourites][:3] + [33, 49]   # words 0 and 1, sign bit
    requests = [make_request(temperature=0.0) for _ in range(3)]
    # Row 1 only is constrained: its token comes from `allowed`, rows 0 and 2 keep their favourites.
    out = Sampler()(logits, requests, masks=TokenMasks(rows=[1], bitmask=bitmask_of([allowed])))
    assert out.token_ids[0] == favourites[0] and out.token_ids[2] == favourites[2]
    assert out.token_ids[1] == max(allowed, key=lambda t: logits[1, t].item())
    # A sampled row never leaves its mask either.
    sampled = [make_request(temperature=1.5, seed=s) for s in range(64)]
    tokens = Sampler()(logits[1:2].expand(64, -1), sampled, own_generators(sampled),
                       TokenMasks(rows=list(range(64)), bitmask=bitmask_of([allowed] * 64))).token_ids
    assert set(tokens) <= set(allowed) and len(set(tokens)) > 1


def test_logit_bias_bans_and_forces_tokens():
    logits = random_logits(1, VOCAB, seed=12)
    favourite, runner_up = logits[0].topk(2).indices.tolist()
    assert Sampler()(logits, [make_request(temperature=0.0, logit_bias={favourite: -100})]).token_ids == [runner_up]
    least = int(logits[0].argmin())
    assert Sampler()(logits, [make_request(temperature=0.0, logit_bias={least: 100})]).token_ids == [least]
    mates = [make_request(temperature=0.0), make_request(temperature=0.0, logit_bias={favourite: -100})]
    assert Sampler()(logits.expand(2, -1), mates).token_ids == [favourite, runner_up]


def test_allowed_token_ids_keep_only_those():
    logits = random_logits(2, VOCAB, seed=13)
    allowed = [3, 17, 40]
    requests = [make_request(temperature=0.0, allowed_token_ids=allowed), make_request(temperature=0.0)]
    out = Sampler()(logits, requests)
    assert out.token_ids[0] == max(allowed, key=lambda t: logits[0, t].item())
    assert out.token_ids[1] == int(logits[1].argmax())
