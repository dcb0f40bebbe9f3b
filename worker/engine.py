"""LLMEngine (add_request / step / abort) and AsyncLLMEngine (a step-loop thread, async streams)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kvops.worker.block_manager import KVCacheManager
from kvops.worker.config import EngineConfig
from kvops.worker.model_runner import TORCH_DTYPES, ModelRunner
from kvops.worker.request import Request, RequestOutput, RequestStatus, SamplingParams
from kvops.worker.scheduler import Scheduler
from kvops.worker.tokenizer import IncrementalDetokenizer
from kvops.worker.weights import load_model_weights

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """A snapshot for metrics: gauges now, counters since start."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int


class _TextState:
    """Detokenized text of one request, cut at a stop string, and how much was reported."""

    def __init__(self, detokenizer: IncrementalDetokenizer):
        self.detokenizer = detokenizer
        self.text = ""
        self.reported_chars = 0
        self.reported_tokens = 0


class LLMEngine:
    """The synchronous engine: one `step()` schedules, runs the model once and reports outputs."""

    def __init__(self, config: EngineConfig):
        config.validate()
        self.config = config
        loaded = load_model_weights(
            config.model,
            TORCH_DTYPES[config.dtype],
            config.device,
            model_overrides=config.model_overrides,
        )
        self.model_name = loaded.name
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = config.max_model_len or loaded.config.max_position_embeddings
        self.runner = ModelRunner(config, loaded.config, loaded.state_dict, self.max_model_len)
        del loaded
        capacity = self.runner.num_blocks * config.block_size
        # Every request must fit alone, so that preempting the others always lets it finish.
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({self.runner.num_blocks} blocks of "
                f"{config.block_size}), less than max_model_len={self.max_model_len}: "
                "give it more memory or lower max_model_len"
            )
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be at least "
                f"max_model_len ({self.max_model_len}) when chunked prefill is off"
            )
        self.kv_cache = KVCacheManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.kv_cache)
        self._text: dict[str, _TextState] = {}
        self._ids = itertools.count()

    # -- requests -----------------------------------------------------------------------------

    def make_request(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Validate and tokenize, touching no engine state; raise ValueError naming the problem."""
        params = sampling_params or SamplingParams()
        params.validate()
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("prompt must be a string or a list of token ids")
            prompt_token_ids = self.tokenizer.encode(prompt) if prompt else []
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens and max_tokens is {params.max_tokens}: "
                f"together more than the model's context length (max_model_len="
                f"{self.max_model_len})"
            )
        return Request(
            request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_token_ids,
            params,
            eos_token_ids=self.tokenizer.eos_token_ids,
        )

    def add_request(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> Request:
        request = self.make_request(prompt, sampling_params, prompt_token_ids, request_id)
        self.enqueue(request)
        return request

    def enqueue(self, request: Request) -> None:
        """Admit a request from make_request()."""
        if self.scheduler.get_request(request.request_id) is not None:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self._text[request.request_id] = _TextState(
            IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids)
        )
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request at once and free its KV blocks; its final output, or None if unknown."""
        request = self.scheduler.abort_request(request_id)
        if request is None:
            return None
        self.runner.release([request_id])
        return self._output(request, self._text.pop(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests

    # -- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduler_output = self.scheduler.schedule()
        sampled = {}
        if scheduler_output.scheduled:
            sampled = self.runner.execute(scheduler_output)
        self.scheduler.update_from_output(scheduler_output)
        now = time.monotonic()
        outputs, finished = [], []
        for scheduled in scheduler_output.scheduled:
            request = scheduled.request
            if request.request_id not in sampled:
                continue
            token, logprob = sampled[request.request_id]
            request.output_token_ids.append(token)
            if logprob is not None:
                request.output_logprobs.append(logprob)
            if request.first_token_time is None:
                request.first_token_time = now
            state = self._text[request.request_id]
            status, stop_reason = self._check_stop(request, state, token)
            if status is not None:
                self.scheduler.finish_request(request.request_id, status)
                finished.append(request.request_id)
                del self._text[request.request_id]
            outputs.append(self._output(request, state, stop_reason))
        self.runner.release(finished)
        return outputs

    def _check_stop(
        self, request: Request, state: _TextState, token: int
    ) -> tuple[RequestStatus | None, str | int | None]:
        params = request.sampling_params
        previous_len = len(state.detokenizer.text)
        state.detokenizer.add([token])
        status, reason = None, None
        if token in params.stop_token_ids:
            status, reason = RequestStatus.FINISHED_STOPPED, token
        elif not params.ignore_eos and token in request.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif (
            request.num_output_tokens >= params.max_tokens
            or request.num_tokens >= self.max_model_len
        ):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            # Release a character the last token left incomplete.
            state.detokenizer.flush()
        state.text = state.detokenizer.text
        if params.stop:
            # Only the new text (and what a stop string could straddle) needs searching.
            search_from = max(0, previous_len - max(map(len, params.stop)) + 1)
            hits = [(i, s) for s in params.stop if (i := state.text.find(s, search_from)) >= 0]
            if hits:
                index, stop = min(hits)
                state.text = state.text[:index]
                return RequestStatus.FINISHED_STOPPED, stop
        return status, reason

    def _output(
        self, request: Request, state: _TextState, stop_reason: str | int | None = None
    ) -> RequestOutput:
        finished = request.is_finished
        visible = len(state.text)
        if not finished and request.sampling_params.stop:
            # Hold back what could be the start of a stop string, so none ever leaks half-sent.
            visible -= max(map(len, request.sampling_params.stop)) - 1
        visible = max(visible, state.reported_chars)
        new_text = state.text[state.reported_chars : visible]
        new_token_ids = request.output_token_ids[state.reported_tokens :]
        logprobs = request.output_logprobs if request.sampling_params.logprobs is not None else None
        new_logprobs = logprobs[state.reported_tokens :] if logprobs is not None else None
        state.reported_chars = visible
        state.reported_tokens = request.num_output_tokens
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=list(request.output_token_ids),
            text=state.text[:visible],
            new_token_ids=new_token_ids,
            new_text=new_text,
            finished=finished,
            finish_reason=request.status.finish_reason,
            stop_reason=stop_reason,
            logprobs=logprobs,
            new_logprobs=new_logprobs,
            num_cached_tokens=request.num_cached_tokens,
            arrival_time=request.arrival_time,
            first_scheduled_time=request.first_scheduled_time,
            first_token_time=request.first_token_time,
            finished_time=request.finished_time,
        )

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv_cache.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.kv_cache.prefix_cache_queries,
            prefix_cache_hits=self.kv_cache.prefix_cache_hits,
        )

    def generate(
        self,
        prompts: list[str] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        prompt_token_ids: list[list[int]] | None = None,
    ) -> list[RequestOutput]:
        """Submit all prompts at once, run until each finishes; final outputs in input order."""
        inputs = prompt_token_ids if prompt_token_ids is not None else prompts or []
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params or SamplingParams()] * len(inputs)
        requests = [
            self.make_request(
                prompt=None if prompt_token_ids is not None else item,
                sampling_params=params,
                prompt_token_ids=item if prompt_token_ids is not None else None,
            )
            for item, params in zip(inputs, sampling_params, strict=True)
        ]
        for request in requests:
            self.enqueue(request)
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for output in self.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[r.request_id] for r in requests]


class AsyncLLMEngine:
    """Runs LLMEngine.step() in one background thread; `generate()` is an async stream.

    Requests are validated in the caller's thread (so bad input raises there, before any KV block
    is taken); adds and aborts reach the engine through a command list that the step thread
    applies between steps, so the engine itself is only ever touched by that thread.
    """

    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine]):
        """`engine`: a built engine, or a function that builds one on the step thread (see
        from_config); what the function raises is raised here."""
        build = (lambda: engine) if isinstance(engine, LLMEngine) else engine
        self._commands: list[tuple[str, object]] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wakeup = threading.Event()
        self._stopping = False
        built: concurrent.futures.Future[LLMEngine] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._main, args=(build, built), name="kvops-engine", daemon=True
        )
        self._thread.start()
        try:
            built.result()  # the step thread has set self.engine
        except BaseException:
            self._thread.join()  # it has already returned; leave no thread behind
            raise
        self._stats = self.engine.stats()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncLLMEngine:
        """Load the model on the step thread, so that one thread runs all of torch's parallel
        work. libgomp (torch's OpenMP) keeps a worker pool per thread that has run a parallel
        region; once two pools hold more threads than there are CPUs it stops spinning between
        regions, and every small GEMM then waits for its workers to wake. Loading on the caller's
        thread and stepping on another made a SmolLM2 decode step 45% slower (59 against 41 ms on
        2 CPUs)."""
        return cls(lambda: LLMEngine(config))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_alive(self) -> bool:
        """Whether the step thread runs (liveness probes report it)."""
        return self._thread.is_alive() and not self._stopping

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step (safe from any thread)."""
        return self._stats

    async def generate(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens arrive; the last one has finished=True.

        Leaving the loop early (or the task being cancelled) aborts the request and frees its
        KV blocks.
        """
        request = self.engine.make_request(prompt, sampling_params, prompt_token_ids, request_id)
        queue: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if request.request_id in self._streams:
                raise ValueError(f"request_id {request.request_id!r} is already in use")
            self._streams[request.request_id] = (asyncio.get_running_loop(), queue)
            self._commands.append(("add", request))
        self._wakeup.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                # Nobody reads this stream any more (its event loop may even close first).
                with self._lock:
                    self._streams.pop(request.request_id, None)
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._commands.append(("abort", request_id))
        self._wakeup.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._thread.join(timeout=30)

    # -- the step thread ------------------------------------------------------------------------

    def _main(
        self, build: Callable[[], LLMEngine], built: concurrent.futures.Future[LLMEngine]
    ) -> None:
        try:
            engine = build()
        except BaseException as error:  # noqa: BLE001 - re-raised in __init__
            built.set_exception(error)
            return
        self.engine = engine  # before the result: the loop below reads it
        built.set_result(engine)
        self._run()

    def _run(self) -> None:
        while not self._stopping:
            self._apply_commands()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:  # noqa: BLE001 - every stream must hear about it
                log.exception("engine step failed; failing all requests")
                self._fail_all(error)
                continue
            self._stats = self.engine.stats()
            for output in outputs:
                self._deliver(output)

    def _apply_commands(self) -> None:
        with self._lock:
            commands, self._commands = self._commands, []
        for kind, payload in commands:
            if kind == "add":
                try:
                    self.engine.enqueue(payload)
                except ValueError as error:
                    self._deliver_error(payload.request_id, error)
            else:
                output = self.engine.abort_request(payload)
                if output is not None:
                    self._deliver(output)
        self._stats = self.engine.stats()

    def _deliver(self, output: RequestOutput) -> None:
        with self._lock:
            target = self._streams.get(output.request_id)
            if output.finished:
                self._streams.pop(output.request_id, None)
        if target is not None:
            _put(target, output)

    def _deliver_error(self, request_id: str, error: BaseException) -> None:
        with self._lock:
            target = self._streams.pop(request_id, None)
        if target is not None:
            _put(target, error)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            self.engine.abort_request(request_id)
            self._deliver_error(request_id, RuntimeError(f"engine step failed: {error}"))


def _put(target: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item: object) -> None:
    """Hand an item to a stream's event loop; a loop that has closed has no reader left."""
    loop, queue = target
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(queue.put_nowait, item)
