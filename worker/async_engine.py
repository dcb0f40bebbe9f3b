"""AsyncLLMEngine: LLMEngine stepped on one background thread, each request an async stream.

It is the servers' only door to the engine: worker/serve/ uses this class and the plain types
of worker/request.py, nothing else from the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, Callable
from typing import Literal

from kvops.worker.config import EngineConfig
from kvops.worker.engine import LLMEngine
from kvops.worker.request import EngineStats, Request, RequestOutput, SamplingParams
from kvops.worker.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# What the caller's thread asks of the step thread: add a request, or abort one by id.
_Command = tuple[Literal["add"], Request] | tuple[Literal["abort"], str]
# Where a stream's items go: its event loop and queue (outputs, or the error that ends it).
_Stream = tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput | BaseException]]


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
        self._commands: list[_Command] = []
        self._streams: dict[str, _Stream] = {}
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

    # -- what the servers read ------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer | None:
        """None for a model without one: it takes and returns token ids only."""
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_num_seqs(self) -> int:
        """How many requests run at once; more wait in the engine's queue."""
        return self.engine.config.max_num_seqs

    @property
    def is_alive(self) -> bool:
        """Whether the step thread runs (liveness probes report it)."""
        return self._thread.is_alive() and not self._stopping

    def stats(self) -> EngineStats:
        """The snapshot taken after the latest step (safe from any thread)."""
        return self._stats

    # -- requests -------------------------------------------------------------------------------

    def make_request(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Validate and tokenize in the caller's thread; raise ValueError naming the problem.

        Hand the Request to `stream()`, which takes it as it is: a request is validated once.
        """
        return self.engine.make_request(prompt, sampling_params, prompt_token_ids, request_id)

    def generate(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[RequestOutput, None]:
        """`stream(make_request(...))`: bad input raises here, before a stream exists."""
        return self.stream(self.make_request(prompt, sampling_params, prompt_token_ids, request_id))

    async def stream(self, request: Request) -> AsyncGenerator[RequestOutput, None]:
        """Run a request from make_request(); yield outputs as tokens arrive, the last one with
        finished=True.

        Leaving the loop early (or the task being cancelled) aborts the request and frees its
        KV blocks.
        """
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
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
        for command in commands:
            if command[0] == "add":
                request = command[1]
                try:
                    self.engine.enqueue(request)
                except ValueError as error:
                    self._deliver_error(request.request_id, error)
            else:
                output = self.engine.abort_request(command[1])
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


def _put(target: _Stream, item: RequestOutput | BaseException) -> None:
    """Hand an item to a stream's event loop; a loop that has closed has no reader left."""
    loop, queue = target
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(queue.put_nowait, item)
