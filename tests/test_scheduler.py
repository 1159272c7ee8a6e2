"""Block manager and scheduler alone: ints and lists, no model."""
import itertools

import pytest

from leanserve.params import SamplingParams
from leanserve.scheduler.block_manager import BlockManager
from leanserve.scheduler.request import Request, RequestStatus
from leanserve.scheduler.scheduler import ScheduledBatch, Scheduler


_first_token = itertools.count(1000, 1000)


def make_request(name: str, prompt_len: int, max_tokens: int = 8) -> Request:
    """A request whose prompt shares no token with another's (no prefix hits unless a test makes them)."""
    first = next(_first_token)
    return Request(name, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens))


def run_step(scheduler: Scheduler) -> ScheduledBatch:
    """Schedule once and play the model's part as the engine does: advance (which publishes full blocks
    to the prefix cache), then append a token to each request whose prompt is computed."""
    batch = scheduler.schedule()
    scheduler.advance(batch)
    for request in batch.requests:
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token(7)
            if request.num_output_tokens >= request.sampling_params.max_tokens:
                scheduler.finish(request, RequestStatus.FINISHED_LENGTH)
    scheduler.check_invariants()
    return batch


def test_block_manager_allocates_by_block_and_frees():
    bm = BlockManager(num_blocks=4, block_size=4)
    r = make_request("a", 5)
    assert bm.blocks_needed(r, 5) == 2
    assert bm.allocate(r, 5) and len(r.block_table) == 2
    r.num_computed_tokens = 5
    assert bm.blocks_needed(r, 3) == 0          # 8 tokens still fit in two blocks
    assert bm.allocate(r, 4) and len(r.block_table) == 3
    other = make_request("b", 9)
    assert not bm.allocate(other, 9)            # needs 3, one left: nothing changes
    assert other.block_table == [] and bm.num_free_blocks == 1
    bm.check_invariants([r, other])
    bm.free(r)
    assert bm.num_free_blocks == 4 and r.block_table == []
    bm.check_invariants([r, other])


def test_broken_block_bookkeeping_is_named_by_block_and_request():
    bm = BlockManager(8, 4)
    r = make_request("r", 6)
    bm.allocate(r, 6)
    assert bm.invariant_problems([r]) == []
    bm.ref_counts[5] = 1                      # referenced by nobody's table, and still on the free list
    assert bm.invariant_problems([r]) == ["block 5 has 1 references but is held by []",
                                          "free list and reference counts disagree on blocks [5]"]
    bm.ref_counts[5] = 0
    other = make_request("other", 2)
    other.block_table = [r.block_table[0]]    # held twice, counted once
    assert bm.invariant_problems([r, other]) == [f"block {r.block_table[0]} has 1 references but is held by [r, other]"]
    with pytest.raises(AssertionError, match="held by \\[r, other\\]"):
        bm.check_invariants([r, other])


def test_block_manager_rejects_empty_cache():
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0, 16)


def test_new_request_joins_running_batch_and_finished_one_leaves():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a = make_request("a", 10, max_tokens=3)
    s.add(a, 13)
    batch = run_step(s)
    assert batch.requests == [a] and batch.num_tokens == [10]
    b = make_request("b", 6, max_tokens=5)
    s.add(b, 11)
    batch = run_step(s)                          # a decodes one token while b prefills
    assert batch.requests == [a, b] and batch.num_tokens == [1, 6]
    run_step(s)                                  # a's third token: it finishes and frees its blocks
    assert a.status is RequestStatus.FINISHED_LENGTH and a.block_table == []
    assert s.running == [b]
    batch = run_step(s)
    assert batch.requests == [b]


def test_token_budget_chunks_a_long_prompt_while_decodes_go_first():
    s = Scheduler(BlockManager(256, 4), max_num_seqs=8, max_num_batched_tokens=16)
    short = make_request("short", 4, max_tokens=20)
    s.add(short, 24)
    run_step(s)
    long = make_request("long", 40, max_tokens=2)
    s.add(long, 42)
    chunks = []
    while long.num_output_tokens == 0:
        batch = run_step(s)
        assert batch.total_tokens <= 16
        assert batch.requests[0] is short and batch.num_tokens[0] == 1   # a decode token every step
        chunks.append(batch.num_tokens[1])
    assert chunks == [15, 15, 10]


def test_max_num_seqs_caps_the_running_batch():
    s = Scheduler(BlockManager(256, 4), max_num_seqs=2, max_num_batched_tokens=1000)
    requests = [make_request(f"r{i}", 3, max_tokens=4) for i in range(5)]
    for r in requests:
        s.add(r, 7)
    batch = run_step(s)
    assert batch.requests == requests[:2]
    while s.has_unfinished():
        assert len(run_step(s)) <= 2
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in requests)


def test_full_cache_preempts_latest_and_recomputes_it():
    # 4 blocks of 4 tokens; two requests each growing to 12 tokens cannot both fit.
    s = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_request("a", 4, max_tokens=8), make_request("b", 4, max_tokens=8)
    s.add(a, 12)
    s.add(b, 12)
    while s.num_preemptions == 0:
        run_step(s)
    assert b.status is RequestStatus.WAITING and b.num_computed_tokens == 0 and b.block_table == []
    assert b.num_output_tokens == 5              # its outputs become part of what it recomputes
    assert b.num_uncomputed_tokens == 9
    while s.has_unfinished():
        run_step(s)
    assert a.num_output_tokens == b.num_output_tokens == 8


def test_request_larger_than_cache_is_refused():
    s = Scheduler(BlockManager(2, 4), max_num_seqs=8, max_num_batched_tokens=64)
    with pytest.raises(ValueError, match="more than the whole cache"):
        s.add(make_request("big", 6), 9)


def test_finish_removes_a_waiting_or_running_request():
    s = Scheduler(BlockManager(16, 4), max_num_seqs=1, max_num_batched_tokens=64)
    a, b = make_request("a", 5), make_request("b", 5)
    s.add(a, 13)
    s.add(b, 13)
    run_step(s)
    s.finish(b, RequestStatus.FINISHED_ABORTED)    # waiting
    s.finish(a, RequestStatus.FINISHED_ABORTED)    # running, holding blocks
    s.check_invariants()
    assert not s.has_unfinished() and s.block_manager.num_free_blocks == 16


# ---- prepacking ------------------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

from leanserve.scheduler.block_manager import block_hash  # noqa: E402
from leanserve.scheduler.prepacking import shortest_first_fill  # noqa: E402


def test_shortest_first_fill_takes_the_head_then_the_shortest_that_fit():
    assert shortest_first_fill([500, 1500, 1400, 300, 200], 1984) == [0, 4, 3]
    assert shortest_first_fill([5000, 10, 10], 100) == [0]          # the head alone, to be chunked
    assert shortest_first_fill([50, 10, 60, 10], 100) == [0, 1, 3]


@given(st.lists(st.integers(1, 300), min_size=1, max_size=40), st.integers(1, 256))
def test_shortest_first_fill_stays_within_capacity_and_leaves_no_shorter_prompt_out(lengths, capacity):
    chosen = shortest_first_fill(lengths, capacity)
    assert chosen[0] == 0 and len(set(chosen)) == len(chosen)
    total = sum(lengths[i] for i in chosen)
    assert len(chosen) == 1 or total <= capacity
    left_out = [lengths[i] for i in range(1, len(lengths)) if i not in chosen]
    if left_out and lengths[0] <= capacity:
        assert total + min(left_out) > capacity                      # the shortest one left did not fit
        assert all(lengths[i] <= min(left_out) for i in chosen[1:])


def test_scheduler_prepacks_the_head_prompt_with_the_shortest_that_fit():
    s = Scheduler(BlockManager(1024, 16), max_num_seqs=16, max_num_batched_tokens=1984)
    requests = [make_request(name, n) for name, n in [("head", 500), ("a", 1500), ("b", 1400), ("c", 300), ("d", 200)]]
    for r in requests:
        s.add(r, r.num_tokens + 8)
    batch = run_step(s)
    assert [r.request_id for r in batch.requests] == ["head", "c", "d"] and batch.num_tokens == [500, 300, 200]


def test_without_chunking_a_long_prompt_runs_whole():
    s = Scheduler(BlockManager(1024, 16), max_num_seqs=16, max_num_batched_tokens=64, enable_chunked_prefill=False)
    long = make_request("long", 300)
    s.add(long, 310)
    batch = run_step(s)
    assert batch.num_tokens == [300]


# ---- prefix cache ----------------------------------------------------------------------

def test_prefix_hits_reuse_blocks_and_leave_the_last_token_to_compute():
    bm = BlockManager(16, 4)
    first = make_request("first", 10)
    bm.allocate(first, 10)
    first.num_computed_tokens = 10
    bm.cache_full_blocks(first)
    assert len(first.block_hashes) == 2                      # 8 of 10 tokens fill two blocks
    second = Request("second", first.token_ids[:8] + [99, 98], SamplingParams())
    bm.match_prefix(second)
    assert second.block_table == first.block_table[:2] and second.num_computed_tokens == 8
    assert bm.ref_counts[first.block_table[0]] == 2
    exact = Request("exact", first.token_ids[:8], SamplingParams())
    bm.match_prefix(exact)                                  # all 8 cached, yet token 8 must be computed
    assert exact.num_computed_tokens == 4
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (18, 12)
    bm.check_invariants([first, second, exact])


def test_hash_collision_is_caught_by_the_token_check(monkeypatch):
    monkeypatch.setattr("leanserve.scheduler.block_manager.block_hash", lambda parent, tokens: 42)
    bm = BlockManager(16, 4)
    first = make_request("first", 9)
    bm.allocate(first, 9)
    first.num_computed_tokens = 9
    bm.cache_full_blocks(first)
    other = Request("other", [7] * 9, SamplingParams())      # same (fake) hash, other tokens
    bm.match_prefix(other)
    assert other.num_computed_tokens == 0 and other.block_table == []


def test_freed_cached_blocks_stay_findable_until_evicted_least_recent_first():
    bm = BlockManager(4, 4)
    old, new = make_request("old", 5), Request("new", [50 + i for i in range(5)], SamplingParams())
    for r in (old, new):
        bm.allocate(r, 5)
        r.num_computed_tokens = 5
        bm.cache_full_blocks(r)
    old_full, new_full = old.block_table[0], new.block_table[0]
    bm.free(old)
    bm.free(new)
    # Partial blocks hold nothing reusable and go first; then old's full block, then new's.
    assert list(bm.free_blocks)[2:] == [old_full, new_full]
    again = Request("again", list(old.token_ids), SamplingParams())
    bm.match_prefix(again)
    assert again.block_table == [old_full]
    bm.free(again)
    filler = make_request("filler", 1)
    bm.allocate(filler, 12)                                 # takes three blocks: evicts new's, keeps old's
    assert block_hash(None, tuple(new.token_ids[:4])) not in bm.cached
    assert block_hash(None, tuple(old.token_ids[:4])) in bm.cached
    bm.check_invariants([filler])


def test_disabled_prefix_cache_neither_matches_nor_caches():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    r = make_request("r", 9)
    bm.allocate(r, 9)
    r.num_computed_tokens = 9
    bm.cache_full_blocks(r)
    assert bm.cached == {} and r.block_hashes == []
    again = make_request("again", 9)
    bm.match_prefix(again)
    assert again.num_computed_tokens == 0 and bm.prefix_cache_queries == 0


# ---- priorities and aborts -------------------------------------------------------------

def test_lower_priority_value_runs_first_and_ties_go_by_arrival():
    s = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64)
    late_urgent = make_request("urgent", 3)
    late_urgent.priority = -1
    first, second = make_request("first", 3), make_request("second", 3)
    for r in (first, second, late_urgent):
        s.add(r, 11)
    order = []
    while s.has_unfinished():
        batch = run_step(s)
        order += [r.request_id for r in batch.requests if r.request_id not in order]
    assert order == ["urgent", "first", "second"]


def test_preemption_picks_the_least_urgent_running_request():
    s = Scheduler(BlockManager(6, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c = (make_request(n, 4, max_tokens=12) for n in "abc")
    a.priority, b.priority, c.priority = 0, 5, 1
    for r in (a, b, c):
        s.add(r, 16)
    while s.num_preemptions == 0:
        run_step(s)
    assert b.status is RequestStatus.WAITING and a.status is c.status is RequestStatus.RUNNING


def test_abort_frees_blocks_at_once_wherever_the_request_is():
    s = Scheduler(BlockManager(16, 4), max_num_seqs=1, max_num_batched_tokens=64)
    a, b = make_request("a", 6), make_request("b", 6)
    s.add(a, 14)
    s.add(b, 14)
    run_step(s)
    assert s.abort("a") and s.block_manager.num_free_blocks == 16
    assert s.abort("b") and not s.abort("b") and not s.has_unfinished()
    s.check_invariants()


# ---- property-based: random arrivals, lengths, budgets and aborts ------------------------

@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.tuples(st.integers(0, 30), st.integers(1, 90), st.integers(1, 12), st.integers(0, 2)),
                      min_size=1, max_size=25),
    aborts=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 24)), max_size=5),
    num_blocks=st.integers(8, 40), block_size=st.sampled_from([1, 4, 16]),
    budget=st.integers(1, 128), max_num_seqs=st.integers(1, 8), chunked=st.booleans(), prefix=st.booleans())
def test_random_workloads_finish_without_leaks(arrivals, aborts, num_blocks, block_size, budget, max_num_seqs,
                                               chunked, prefix):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix)
    s = Scheduler(bm, max_num_seqs, budget, enable_chunked_prefill=chunked)
    pending = sorted(enumerate(arrivals), key=lambda x: x[1][0])
    added, refused = [], 0
    for step in range(3000):
        while pending and pending[0][1][0] <= step:
            i, (_, length, max_tokens, priority) = pending.pop(0)
            # Shared prefixes make prefix hits likely.
            r = Request(f"r{i}", [i % 3 + 1] * (length // 2) + list(range(length - length // 2)),
                        SamplingParams(max_tokens=max_tokens), priority=priority)
            try:
                s.add(r, length + max_tokens)
                added.append(r)
            except ValueError:
                refused += 1
        for when, which in aborts:
            if when == step and which < len(added):
                s.abort(added[which].request_id)
        run_step(s)
        if not pending and not s.has_unfinished():
            break
    assert not s.has_unfinished(), "a request never finished"
    assert bm.num_free_blocks == num_blocks
    assert all(r.status in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED) for r in added)
    assert len(added) + refused == len(arrivals)


def test_no_request_waits_forever_while_others_keep_arriving():
    # Short prompts arrive every step and would always pack better than the long one.
    s = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=32)
    long = make_request("long", 30, max_tokens=2)
    for step in range(200):
        if step == 5:
            s.add(long, 32)
        for j in range(3):
            s.add(make_request(f"s{step}-{j}", 2, max_tokens=1), 3)
        run_step(s)
        if long.finished:
            break
    assert long.finished and step < 20


@settings(max_examples=80, deadline=None)
@given(arrivals=st.lists(st.tuples(st.integers(0, 15), st.integers(0, 2), st.integers(1, 40), st.integers(1, 6)),
                         min_size=2, max_size=16),
       block_size=st.sampled_from([1, 2, 4, 8]), budget=st.integers(1, 64), chunked=st.booleans())
def test_prefix_hits_are_exactly_the_computed_blocks_a_prompt_starts_with(arrivals, block_size, budget, chunked):
    # Prompts of one family share their first tokens. The cache is too large to evict anything, so when
    # a request is admitted its hits must be exactly its leading full blocks (all but its last token)
    # that some request had computed by the step before.
    bm = BlockManager(4096, block_size)
    s = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    pending = sorted(arrivals)
    computed: dict[str, list[int]] = {}          # request -> the tokens it has computed
    requests, expected_hits = [], 0

    def cached_blocks(tokens: list[int]) -> int:
        def shared(done: list[int]) -> int:
            n = 0
            while n < min(len(done), len(tokens) - 1) and done[n] == tokens[n]:
                n += 1
            return n
        return max((shared(done) for done in computed.values()), default=0) // block_size

    for step in range(2000):
        while pending and pending[0][0] <= step:
            _, family, length, max_tokens = pending.pop(0)
            r = Request(f"r{len(requests)}", [100 * family + j for j in range(length)],
                        SamplingParams(max_tokens=max_tokens))
            s.add(r, length + max_tokens)
            requests.append(r)
        before = {id(r) for r in s.running}
        expected = {r.request_id: cached_blocks(r.token_ids) for r in s.waiting}
        batch = run_step(s)
        for r, n in zip(batch.requests, batch.num_tokens):
            if id(r) not in before:              # admitted this step: what it found cached was skipped
                hit = r.num_computed_tokens - n
                assert hit == expected[r.request_id] * block_size, (r.request_id, hit, expected[r.request_id])
                expected_hits += hit
            computed[r.request_id] = r.token_ids[:r.num_computed_tokens]
        if not pending and not s.has_unfinished():
            break
    assert not s.has_unfinished() and bm.num_free_blocks == bm.num_blocks
    assert bm.prefix_cache_hits == expected_hits
