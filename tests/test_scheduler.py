"""Block manager and scheduler alone: ints and lists, no model."""
import pytest

from leanserve.engine.sampling_params import SamplingParams
from leanserve.scheduler.block_manager import BlockManager
from leanserve.scheduler.request import Request, RequestStatus
from leanserve.scheduler.scheduler import Scheduler


def make_request(name: str, prompt_len: int, max_tokens: int = 8) -> Request:
    return Request(name, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens))


def run_step(scheduler: Scheduler, finish_after: dict[str, int] | None = None):
    """Schedule once and play the model's part: advance counters, append a token to samplers."""
    batch = scheduler.schedule()
    for request, n in zip(batch.requests, batch.num_tokens):
        request.num_computed_tokens += n
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
