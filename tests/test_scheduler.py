"""The scheduler: token budget, max_num_seqs, chunked prefill, preemption, aborts.

A fake model stands in for the model runner: it "writes" each computed token's KV into the
blocks of the request's block table, checks that everything the request attends to is there, and
samples a token that is a function of the whole sequence, so outputs must not depend on
scheduling, caching or preemption.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from kvops.worker.block_manager import KVCacheManager, cdiv
from kvops.worker.config import EngineConfig
from kvops.worker.request import Request, RequestStatus, SamplingParams
from kvops.worker.scheduler import Scheduler, SchedulerOutput


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 32,
    chunked: bool = True,
    caching: bool = True,
) -> Scheduler:
    config = EngineConfig(
        block_size=block_size,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        enable_chunked_prefill=chunked,
        enable_prefix_caching=caching,
    )
    return Scheduler(config, KVCacheManager(num_blocks, block_size, caching))


def make_request(request_id: str, prompt: list[int], max_tokens: int = 4) -> Request:
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens))


def fake_token(tokens: list[int]) -> int:
    return (sum(tokens) * 7 + len(tokens)) % 5


def step(scheduler: Scheduler) -> SchedulerOutput:
    """One engine step with the fake model; finishes requests at max_tokens."""
    output = scheduler.schedule()
    scheduler.update_from_output(output)
    for scheduled in output.scheduled:
        request = scheduled.request
        if scheduled.needs_sampling:
            request.output_token_ids.append(fake_token(request.all_token_ids))
            if request.num_output_tokens >= request.sampling_params.max_tokens:
                scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
    return output


def new_tokens(output: SchedulerOutput) -> dict[str, int]:
    return {s.request.request_id: s.num_new_tokens for s in output.scheduled}


def run_all(scheduler: Scheduler, requests: list[Request], max_steps: int = 500) -> None:
    for request in requests:
        scheduler.add_request(request)
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests:
            return
        step(scheduler)
    raise AssertionError("requests did not finish")


def test_token_budget_is_respected():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", [i] * 6))
    output = scheduler.schedule()
    assert new_tokens(output) == {"r0": 6, "r1": 4}  # r1 gets a chunk, r2 waits
    assert output.num_batched_tokens == 10
    assert [s.needs_sampling for s in output.scheduled] == [True, False]
    assert scheduler.num_running == 2 and scheduler.num_waiting == 1


def test_max_num_seqs_is_respected():
    scheduler = make_scheduler(max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", [i] * 3))
    output = step(scheduler)
    assert new_tokens(output) == {"r0": 3, "r1": 3}
    output = step(scheduler)
    assert new_tokens(output) == {"r0": 1, "r1": 1}  # decodes; r2 still waits
    assert scheduler.num_waiting == 1


def test_chunked_prefill_splits_a_long_prompt():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    request = make_request("long", list(range(25)))
    scheduler.add_request(request)
    chunks = []
    for _ in range(4):
        output = step(scheduler)
        (scheduled,) = output.scheduled
        chunks.append((scheduled.num_computed_tokens, scheduled.num_new_tokens))
        assert scheduled.needs_sampling == (scheduled.num_computed_tokens >= 20)
    assert chunks == [(0, 10), (10, 10), (20, 5), (25, 1)]
    assert request.num_output_tokens == 2


def test_no_chunking_when_disabled():
    scheduler = make_scheduler(max_num_batched_tokens=10, chunked=False)
    scheduler.add_request(make_request("a", [1] * 6))
    scheduler.add_request(make_request("b", [2] * 6))
    assert new_tokens(step(scheduler)) == {"a": 6}  # b does not fit whole: next step
    assert new_tokens(step(scheduler)) == {"a": 1, "b": 6}


def test_prompt_longer_than_budget_alone_is_chunked_rather_than_stuck():
    # Config validation rules this out with chunking off; the scheduler still makes progress.
    scheduler = make_scheduler(max_num_batched_tokens=8, chunked=False)
    scheduler.add_request(make_request("a", [1] * 12))
    assert new_tokens(step(scheduler)) == {"a": 8}
    assert new_tokens(step(scheduler)) == {"a": 4}


def test_decode_steps_and_timestamps():
    scheduler = make_scheduler()
    request = make_request("a", [1, 2, 3], max_tokens=3)
    scheduler.add_request(request)
    assert request.status is RequestStatus.WAITING
    output = step(scheduler)
    assert request.first_scheduled_time is not None
    assert output.scheduled[0].token_ids == [1, 2, 3]
    output = step(scheduler)
    assert output.scheduled[0].token_ids == request.all_token_ids[3:4]
    step(scheduler)
    assert request.status is RequestStatus.FINISHED_LENGTH
    assert request.finished_time is not None
    assert not scheduler.has_unfinished_requests
    assert scheduler.kv_cache.num_free_blocks == scheduler.kv_cache.num_blocks


def test_prefix_cache_hit_sets_cached_tokens():
    scheduler = make_scheduler()
    run_all(scheduler, [make_request("a", list(range(10)))])
    b = make_request("b", list(range(10)))
    scheduler.add_request(b)
    output = step(scheduler)
    assert b.num_cached_tokens == 8
    assert new_tokens(output) == {"b": 2}
    assert output.scheduled[0].num_computed_tokens == 8


def test_preemption_of_the_newest_and_resume():
    # 4 blocks of 4 tokens: two 7-token prompts fit, but not their 9th tokens.
    scheduler = make_scheduler(num_blocks=4)
    a = make_request("a", [1] * 7, max_tokens=6)
    b = make_request("b", [2] * 7, max_tokens=6)
    c = make_request("c", [3] * 3, max_tokens=1)
    for r in (a, b):
        scheduler.add_request(r)
    step(scheduler)  # both prefilled, token 8 sampled
    scheduler.add_request(c)
    step(scheduler)  # token 8 computed (fits in block 2), token 9 sampled; c doesn't fit
    assert scheduler.num_waiting == 1
    b_outputs = list(b.output_token_ids)
    output = step(scheduler)  # a needs a third block: b (newest) is preempted
    assert output.preempted == [b]
    assert new_tokens(output) == {"a": 1}
    assert b.status is RequestStatus.PREEMPTED and b.num_preemptions == 1
    assert b.num_computed_tokens == 0 and b.output_token_ids == b_outputs
    assert scheduler.kv_cache.block_table("b") == []
    assert list(scheduler.waiting) == [b, c]  # b is resumed before c
    assert scheduler.num_preemptions == 1
    output = step(scheduler)  # still no room for b
    assert new_tokens(output) == {"a": 1}
    run_all(scheduler, [])
    assert b.num_preemptions >= 1 and b.num_output_tokens == 6
    # Same outputs as without any memory pressure.
    reference = make_scheduler(num_blocks=64)
    ra, rb, rc = (make_request(r.request_id, r.prompt_token_ids, 6) for r in (a, b, c))
    rc.sampling_params.max_tokens = 1
    run_all(reference, [ra, rb, rc])
    assert (a.output_token_ids, b.output_token_ids, c.output_token_ids) == (
        ra.output_token_ids,
        rb.output_token_ids,
        rc.output_token_ids,
    )
    assert reference.num_preemptions == 0


def test_running_request_preempts_itself_when_it_is_the_newest():
    scheduler = make_scheduler(num_blocks=3, max_num_batched_tokens=4)
    a = make_request("a", [1] * 4, max_tokens=8)
    b = make_request("b", [2] * 5, max_tokens=8)
    scheduler.add_request(a)
    scheduler.add_request(b)
    assert new_tokens(step(scheduler)) == {"a": 4}
    # a decodes into a second block, then b takes the third with a 4-token chunk... which it
    # can't grow: when b (the newest) needs a fourth block it preempts itself.
    outputs = [step(scheduler) for _ in range(3)]
    assert any(o.preempted == [b] for o in outputs)
    scheduler.kv_cache.check_invariants(["a", "b"])
    run_all(scheduler, [])
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8


def test_abort_waiting_and_running_frees_blocks():
    scheduler = make_scheduler(max_num_seqs=1)
    kv = scheduler.kv_cache
    a = make_request("a", [1] * 9)
    b = make_request("b", [2] * 9)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler)
    assert kv.block_table("a") and kv.num_free_blocks < kv.num_blocks
    assert scheduler.abort_request("b") is b  # waiting
    assert b.status is RequestStatus.FINISHED_ABORTED and b.status.finish_reason == "abort"
    assert scheduler.abort_request("a") is a  # running
    assert a.status is RequestStatus.FINISHED_ABORTED and a.finished_time is not None
    assert kv.num_free_blocks == kv.num_blocks
    assert scheduler.num_running == scheduler.num_waiting == 0
    assert scheduler.abort_request("a") is None
    assert scheduler.schedule().is_empty
    kv.check_invariants([])


def test_abort_between_schedule_and_update():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", [1] * 5))
    output = scheduler.schedule()
    scheduler.abort_request("a")
    scheduler.update_from_output(output)  # must not touch the freed request
    scheduler.kv_cache.check_invariants([])


def test_bad_calls():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", [1]))
    with pytest.raises(ValueError, match="request_id"):
        scheduler.add_request(make_request("a", [2]))
    with pytest.raises(ValueError, match="finished"):
        scheduler.finish_request("a", RequestStatus.RUNNING)
    assert scheduler.finish_request("nope", RequestStatus.FINISHED_STOPPED) is None
    with pytest.raises(ValueError, match="block_size"):
        Scheduler(EngineConfig(block_size=16), KVCacheManager(4, 8))


# ---------------------------------------------------------------------- property test

PREFIXES = [[(7 * i + j) % 5 for j in range(64)] for i in range(3)]


class SchedulerMachine(RuleBasedStateMachine):
    @initialize(
        block_size=st.sampled_from([2, 4]),
        num_blocks=st.integers(2, 8),
        max_num_seqs=st.integers(1, 4),
        budget=st.integers(1, 20),
        chunked=st.booleans(),
        caching=st.booleans(),
        data=st.data(),
        count=st.integers(1, 4),
    )
    def setup(self, block_size, num_blocks, max_num_seqs, budget, chunked, caching, data, count):
        if not chunked:
            budget = max(budget, 3)
        self.scheduler = make_scheduler(
            num_blocks, block_size, max_num_seqs, budget, chunked=chunked, caching=caching
        )
        self.kv = self.scheduler.kv_cache
        self.bs = block_size
        # The engine guarantees each request fits alone (and, without chunking, in one step
        # even when recomputed after a preemption).
        self.max_len = num_blocks * block_size if chunked else min(num_blocks * block_size, budget)
        self.max_len = max(self.max_len, 2)
        self.next_id = 0
        self.all_requests: list[Request] = []
        # Fake KV memory: block id -> per slot, the token prefix whose KV that slot holds.
        self.memory: dict[int, list[tuple[int, ...] | None]] = {
            b: [None] * block_size for b in range(num_blocks)
        }
        self.add(data, count)

    @rule(data=st.data(), count=st.integers(1, 3))
    def add(self, data, count):
        for _ in range(count):
            prompt_len = data.draw(st.integers(1, self.max_len - 1), label="prompt_len")
            max_tokens = data.draw(st.integers(1, self.max_len - prompt_len), label="max_tokens")
            prefix = data.draw(st.sampled_from(PREFIXES), label="prefix")
            # Mostly long shared prefixes, so that prefix caching gets exercised.
            shared = data.draw(
                st.one_of(st.just(prompt_len), st.integers(0, prompt_len)), label="shared"
            )
            suffix = data.draw(
                st.lists(
                    st.integers(0, 2), min_size=prompt_len - shared, max_size=prompt_len - shared
                ),
                label="suffix",
            )
            request = make_request(f"r{self.next_id}", prefix[:shared] + suffix, max_tokens)
            self.next_id += 1
            self.all_requests.append(request)
            self.scheduler.add_request(request)

    @rule(data=st.data(), abort=st.booleans())
    def finish_one(self, data, abort):
        ids = sorted(r.request_id for r in self.live_requests())
        if not ids:
            return
        request_id = data.draw(st.sampled_from(ids), label="victim")
        status = RequestStatus.FINISHED_ABORTED if abort else RequestStatus.FINISHED_STOPPED
        request = self.scheduler.finish_request(request_id, status)
        assert request is not None and request.status is status
        assert self.kv.block_table(request_id) == []

    @rule(count=st.integers(1, 4))
    def step(self, count):
        for _ in range(count):
            self.checked_step()
            self.consistent()

    def live_requests(self) -> list[Request]:
        return list(self.scheduler.running) + list(self.scheduler.waiting)

    def checked_step(self) -> SchedulerOutput:
        scheduler, config, bs = self.scheduler, self.scheduler.config, self.bs
        running_before = [r.request_id for r in scheduler.running]
        waiting_before = [r.request_id for r in scheduler.waiting]
        output = scheduler.schedule()

        ids = [s.request.request_id for s in output.scheduled]
        assert len(ids) == len(set(ids)) <= config.max_num_seqs
        assert scheduler.num_running <= config.max_num_seqs
        assert output.num_batched_tokens == sum(s.num_new_tokens for s in output.scheduled)
        assert output.num_batched_tokens <= config.max_num_batched_tokens
        admitted = [i for i in ids if i not in running_before]
        assert admitted == waiting_before[: len(admitted)]  # FIFO, no skipping ahead
        if output.preempted:
            assert not admitted
        # Preempted requests go back to the front, oldest first; the rest keeps its order.
        assert [r.request_id for r in scheduler.waiting] == [
            r.request_id for r in reversed(output.preempted)
        ] + waiting_before[len(admitted) :]
        for request in output.preempted:
            assert request.status is RequestStatus.PREEMPTED
            assert request.request_id not in ids
            assert self.kv.block_table(request.request_id) == []
        # The runner's rows mirror the scheduled requests.
        assert len(output.step.rows) == len(output.scheduled)
        for s, row in zip(output.scheduled, output.step.rows, strict=True):
            assert row.request_id == s.request.request_id and row.token_ids == s.token_ids
            assert row.positions[0] == s.num_computed_tokens and row.sample == s.needs_sampling
            assert row.block_table.tolist() == s.block_ids
        for s in output.scheduled:
            request = s.request
            assert request.status is RequestStatus.RUNNING
            assert s.num_computed_tokens == request.num_computed_tokens
            remaining = request.num_tokens - s.num_computed_tokens
            assert 1 <= s.num_new_tokens <= remaining
            if not config.enable_chunked_prefill:
                assert s.num_new_tokens == remaining
            assert request.num_cached_tokens % bs == 0
            assert request.num_cached_tokens < request.num_prompt_tokens + request.num_output_tokens
            table = self.kv.block_table(request.request_id)
            assert s.block_ids is table
            assert len(table) == cdiv(s.num_computed_tokens + s.num_new_tokens, bs)
            self.fake_forward(request, table, s.num_computed_tokens, s.num_new_tokens)

        scheduler.update_from_output(output)
        for s in output.scheduled:
            request = s.request
            if s.needs_sampling:
                request.output_token_ids.append(fake_token(request.all_token_ids))
                if request.num_output_tokens >= request.sampling_params.max_tokens:
                    scheduler.finish_request(request.request_id, RequestStatus.FINISHED_LENGTH)
        return output

    def fake_forward(self, request: Request, table: list[int], start: int, count: int) -> None:
        bs, tokens = self.bs, request.all_token_ids
        # Attention reads the KV of every earlier position: it must be this sequence's.
        for p in range(start):
            assert self.memory[table[p // bs]][p % bs] == tuple(tokens[: p + 1]), (request, p)
        for p in range(start, start + count):
            block = self.kv.blocks[table[p // bs]]
            # Never overwrite a block that is shared or findable in the prefix cache.
            assert block.ref_count == 1 and block.block_hash is None, block
            self.memory[block.block_id][p % bs] = tuple(tokens[: p + 1])

    @invariant()
    def consistent(self):
        if not hasattr(self, "scheduler"):
            return
        scheduler = self.scheduler
        live = self.live_requests()
        assert len({r.request_id for r in live}) == len(live)
        assert all(r.status is RequestStatus.RUNNING for r in scheduler.running)
        assert all(
            r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in scheduler.waiting
        )
        assert all(r.num_computed_tokens == 0 for r in scheduler.waiting)
        self.kv.check_invariants(r.request_id for r in live)

    def teardown(self):
        if not hasattr(self, "scheduler"):
            return
        scheduler = self.scheduler
        # Liveness: with no new arrivals everything finishes. The oldest running request is
        # never preempted and computes at least one token per step, and a request at the head
        # of the queue is admitted when nothing runs (each fits alone), which bounds the steps.
        bound = sum(
            r.num_prompt_tokens + r.sampling_params.max_tokens + 1 for r in self.live_requests()
        )
        for _ in range(bound):
            if not scheduler.has_unfinished_requests:
                break
            self.checked_step()
            self.consistent()
        assert not scheduler.has_unfinished_requests
        event(f"preemptions: {min(scheduler.num_preemptions, 3)}")
        if self.kv.enable_prefix_caching:
            event(f"prefix-cache hits: {self.kv.prefix_cache_hits > 0}")
        event(f"requests: {min(len(self.all_requests), 6)}")
        for request in self.all_requests:
            assert request.is_finished
            if request.status is RequestStatus.FINISHED_LENGTH:
                assert request.num_output_tokens == request.sampling_params.max_tokens
            # Outputs never depend on batching, caching or preemption.
            expected = list(request.prompt_token_ids)
            for _ in range(request.num_output_tokens):
                expected.append(fake_token(expected))
            assert request.all_token_ids == expected
        assert self.kv.num_free_blocks == self.kv.num_blocks
        assert self.kv.usage == 0
        self.kv.check_invariants([])


SchedulerMachine.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_scheduler_state_machine = SchedulerMachine.TestCase
