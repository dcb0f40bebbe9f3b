"""Token-budget continuous batching: one SchedulerOutput per engine step.

There are no separate prefill and decode phases (as in vLLM v1): every request has
`num_computed_tokens`, and each step gives it up to `num_tokens - num_computed_tokens` new tokens
within the step's token budget. A decode is a request with one token left; a long prompt is split
across steps (chunked prefill). Running requests go first, oldest first; when KV blocks run out
the newest running request is preempted (its blocks freed, recomputed later from prompt +
outputs), so the oldest request always progresses and no request fails because another is long.

Each SchedulerOutput carries the Step (step.py) the model runner executes: plain rows with copies
of the block tables, so the runner never sees a Request or the scheduler.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from kvops.worker.block_manager import KVCacheManager
from kvops.worker.config import EngineConfig
from kvops.worker.request import Request, RequestStatus, token_slice
from kvops.worker.step import Step, StepRow


@dataclass
class ScheduledRequest:
    """One request's share of a step: tokens [num_computed_tokens, +num_new_tokens)."""

    request: Request
    num_new_tokens: int
    # Snapshot at scheduling time: the position of the first new token.
    num_computed_tokens: int
    # The request's block table (the live list, valid for this step).
    block_ids: list[int]
    # Snapshot of request.num_tokens at scheduling time (the engine appends tokens later).
    num_tokens: int

    @property
    def needs_sampling(self) -> bool:
        """Whether this step computes all known tokens, so the model must sample the next one."""
        return self.num_computed_tokens + self.num_new_tokens == self.num_tokens

    @property
    def token_ids(self) -> list[int]:
        """The token ids this step feeds to the model."""
        start = self.num_computed_tokens
        request = self.request
        return token_slice(
            request.prompt_token_ids, request.output_token_ids, start, start + self.num_new_tokens
        )


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests preempted this step, now waiting again. The model runner is not told: it keeps
    # their sampling generators, so a seeded request draws the same tokens after recomputation.
    preempted: list[Request] = field(default_factory=list)
    num_batched_tokens: int = 0
    # What the model runner executes: one row per scheduled request, in the same order.
    step: Step = field(default_factory=Step)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """Owns the waiting and running queues. Not thread-safe: call from the step loop only."""

    def __init__(self, config: EngineConfig, kv_cache: KVCacheManager):
        if kv_cache.block_size != config.block_size:
            raise ValueError(
                f"block_size: the KV cache uses {kv_cache.block_size}, config {config.block_size}"
            )
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order, oldest first
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._num_preemptions = 0

    # ------------------------------------------------------------------ queries

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_preemptions(self) -> int:
        """Preemptions since start (a counter for metrics)."""
        return self._num_preemptions

    @property
    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    # ------------------------------------------------------------------ changes

    def add_request(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        if request.num_tokens < 1:
            raise ValueError("a request needs at least one prompt token")
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        config = self.config
        budget = config.max_num_batched_tokens
        output = SchedulerOutput()

        # 1. Running requests, oldest first. If blocks run out, preempt the newest one(s).
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:  # nothing to compute until the engine appends a token
                i += 1
                continue
            while not self.kv_cache.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                output.preempted.append(victim)
                if victim is request:
                    break
            else:
                self._add_scheduled(output, request, num_new)
                budget -= num_new
                i += 1
                continue
            break  # the request preempted itself: no blocks left for anyone newer

        # 2. Waiting requests, in order, unless this step had to preempt (no room to grow).
        while (
            not output.preempted
            and self.waiting
            and budget > 0
            and len(self.running) < config.max_num_seqs
        ):
            request = self.waiting[0]
            computed_blocks, num_cached = self.kv_cache.get_computed_blocks(request)
            num_remaining = request.num_tokens - num_cached
            if not config.enable_chunked_prefill and num_remaining > budget and output.scheduled:
                # Without chunking the whole rest goes in one step: wait for a fuller budget.
                # (When nothing else is scheduled the budget is full; a request longer than
                # that can only progress in chunks, which config validation normally rules out.)
                break
            num_new = min(num_remaining, budget)
            if not self.kv_cache.allocate_slots(request, num_new, computed_blocks):
                break  # FIFO: don't let later requests overtake it
            self.waiting.popleft()
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            request.num_cached_tokens = num_cached
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self._add_scheduled(output, request, num_new)
            budget -= num_new

        return output

    def update_from_output(self, scheduler_output: SchedulerOutput) -> None:
        """Advance the scheduled requests after the model ran (before the engine appends the
        sampled tokens), and register the blocks they filled in the prefix cache."""
        for scheduled in scheduler_output.scheduled:
            request = scheduled.request
            if request.status is not RequestStatus.RUNNING:
                continue  # finished or aborted since it was scheduled
            request.num_computed_tokens = scheduled.num_computed_tokens + scheduled.num_new_tokens
            self.kv_cache.cache_blocks(request, request.num_computed_tokens)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Finish a request wherever it is (waiting, running, preempted) and free its blocks.

        Returns the request, or None when it is unknown or already finished.
        """
        if not status.finished:
            raise ValueError(f"status must be a finished status, got {status.name}")
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        request.status = status
        request.finished_time = time.monotonic()
        return request

    def abort_request(self, request_id: str) -> Request | None:
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    # ------------------------------------------------------------------ internals

    def _add_scheduled(self, output: SchedulerOutput, request: Request, num_new: int) -> None:
        scheduled = ScheduledRequest(
            request=request,
            num_new_tokens=num_new,
            num_computed_tokens=request.num_computed_tokens,
            block_ids=self.kv_cache.block_table(request.request_id),
            num_tokens=request.num_tokens,
        )
        output.scheduled.append(scheduled)
        output.num_batched_tokens += num_new
        # Built now, while the request's tokens and block table are those of this step. Rows of
        # requests scheduled earlier in the step stay valid: only unscheduled ones are preempted.
        output.step.rows.append(
            StepRow.build(
                request.request_id,
                scheduled.token_ids,
                scheduled.num_computed_tokens,
                scheduled.block_ids,
                self.config.block_size,
                scheduled.needs_sampling,
                request.sampling_params,
            )
        )

    def _preempt(self, request: Request) -> None:
        # Recompute rather than swap: drop its blocks; its output tokens are kept, and it is
        # recomputed from prompt + outputs (prefix caching often recovers most of it).
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self._num_preemptions += 1
        # Front of the queue: it was admitted before anything still waiting.
        self.waiting.appendleft(request)
