"""What the HTTP and gRPC servers share: admission, deadlines, draining, telemetry, errors.

Both servers turn their wire format into token ids and SamplingParams, have
`ServingState.make_requests()` validate them once, then run them with `ServingState.generate()`,
which is the only way a request reaches the engine. Errors are `ServingError`s that each server
maps onto its own status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import time
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from dataclasses import dataclass

from kvops.operator.prompts import RenderError
from kvops.worker.async_engine import AsyncLLMEngine
from kvops.worker.request import Request, RequestOutput, SamplingParams
from kvops.worker.serve.feedback import (
    MAX_COMMENT_CHARS,
    AnsweredRequest,
    FeedbackLog,
    Rating,
    RecentRequests,
    parse_rating,
)
from kvops.worker.serve.prompts import PromptStore, ResolvedPrompt, UnknownPrompt
from kvops.worker.serve.telemetry import PromptLabel, RequestTracer, ServingMetrics

# How many completions one request may ask for (OpenAI's `n`).
MAX_CHOICES = 16


class ServingError(Exception):
    """An error a client sees: an HTTP status, a gRPC status code name and OpenAI's error type."""

    http_status = 500
    grpc_code = "INTERNAL"
    error_type = "server_error"
    # What `kvops_requests_total{outcome=...}` counts it as.
    outcome = "error"
    # The managed prompt of the request that failed, once known (attributed_to).
    prompt: PromptLabel | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(ServingError):
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    error_type = "invalid_request_error"
    outcome = "invalid"


class ModelNotFound(ServingError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    error_type = "invalid_request_error"
    outcome = "invalid"


class NotFound(ServingError):
    """A prompt, prompt version or label, or a request id, that this worker does not know."""

    http_status = 404
    grpc_code = "NOT_FOUND"
    error_type = "invalid_request_error"
    outcome = "invalid"


class Unauthenticated(ServingError):
    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    error_type = "invalid_request_error"
    outcome = "invalid"


class Overloaded(ServingError):
    http_status = 429
    grpc_code = "RESOURCE_EXHAUSTED"
    error_type = "rate_limit_error"
    outcome = "rejected"
    # Seconds a client should wait before retrying (HTTP Retry-After, gRPC retry-after metadata).
    retry_after_s = 1


class ShuttingDown(ServingError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "server_error"
    outcome = "rejected"


class DeadlineExceeded(ServingError):
    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    error_type = "timeout_error"
    outcome = "timeout"


@dataclass
class ServingOptions:
    served_model_name: str
    # Requests that may wait beyond the running batch (max_num_seqs); more are refused.
    max_queue: int = 256
    # Seconds a request may take end to end, unless the client asks for less (None: unbounded).
    request_timeout: float | None = None
    api_key: str | None = None
    # The folder of the operator's prompts.json (None: no managed prompts).
    prompts_dir: str | None = None
    # The JSON-lines file feedback is appended to (None: feedback is counted and traced only).
    feedback_log: str | None = None
    # host:port of a VectorIndex's search gRPC (None: no RAG); chunks per RAG request.
    vector_index: str | None = None
    retrieval_top_k: int = 4

    def validate(self) -> None:
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")


class ServingState:
    """One worker's shared state: the engine, how many requests it holds, whether it drains."""

    def __init__(
        self,
        engine: AsyncLLMEngine,
        options: ServingOptions,
        metrics: ServingMetrics,
        tracer: RequestTracer,
    ):
        options.validate()
        self.engine = engine
        self.options = options
        self.metrics = metrics
        self.tracer = tracer
        self.capacity = engine.max_num_seqs + options.max_queue
        self.in_flight = 0
        self.draining = False
        self._ids = itertools.count()
        self._idle = asyncio.Event()
        self._idle.set()
        self.prompts = PromptStore(options.prompts_dir)
        self.answered = RecentRequests()
        self.feedback_log = (
            None if options.feedback_log is None else FeedbackLog(options.feedback_log)
        )

    @property
    def model_name(self) -> str:
        return self.options.served_model_name

    @property
    def ready(self) -> bool:
        return not self.draining and self.engine.is_alive

    # -- checks every request goes through ------------------------------------------------------

    def authenticate(self, authorization: str | None) -> None:
        """Check an `Authorization: Bearer <key>` value (HTTP header or gRPC metadata) in
        constant time; the key itself never appears in an error or a log."""
        expected = self.options.api_key
        if expected is None:
            return
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.encode(), expected.encode()
        ):
            raise Unauthenticated("a valid API key is required (Authorization: Bearer <key>)")

    def check_model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise ModelNotFound(
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                param="model",
            )

    @contextlib.contextmanager
    def admit(self, count: int = 1) -> Iterator[None]:
        """Hold `count` slots while a request runs; refuse it when the queue is full or draining."""
        if self.draining:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        if self.in_flight + count > self.capacity:
            raise Overloaded(
                f"the server is at capacity ({self.capacity} requests in flight or queued); "
                f"retry after {Overloaded.retry_after_s}s"
            )
        self.in_flight += count
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= count
            if self.in_flight == 0:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False when `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{time.time_ns():x}-{next(self._ids)}"

    # -- managed prompts and feedback ------------------------------------------------------------

    def resolve_prompt(self, name: str, version: str | None, label: str | None) -> ResolvedPrompt:
        if not name:
            raise InvalidRequest("prompt.name is required", "prompt.name")
        if version and label:
            raise InvalidRequest("prompt: give a version or a label, not both", "prompt")
        try:
            return self.prompts.resolve(name, version or None, label or None)
        except UnknownPrompt as error:
            raise NotFound(str(error), "prompt") from None

    def render_prompt(
        self, prompt: ResolvedPrompt, variables: Mapping[str, str]
    ) -> list[dict[str, str]]:
        try:
            return prompt.render(dict(variables))
        except RenderError as error:
            raise InvalidRequest(
                f"prompt {prompt.name!r} version {prompt.version!r}: {error}", "prompt.variables"
            ) from None

    async def feedback(
        self, request_id: str, score: float | str, comment: str | None
    ) -> tuple[AnsweredRequest, Rating]:
        """Count, trace and log a rating of the answer to `request_id`, which this worker gave."""
        try:
            rating = parse_rating(score)
        except ValueError as error:
            raise InvalidRequest(str(error), "score") from None
        if comment is not None and len(comment) > MAX_COMMENT_CHARS:
            raise InvalidRequest(
                f"comment must be at most {MAX_COMMENT_CHARS} characters", "comment"
            )
        answered = self.answered.get(request_id)
        if answered is None:
            raise NotFound(
                f"no request {request_id!r} among the last {self.answered.capacity} this "
                "worker answered",
                "request_id",
            )
        if self.feedback_log is not None:
            # fsync can take milliseconds: off the event loop that streams tokens.
            await asyncio.to_thread(self.feedback_log.append, request_id, answered, rating, comment)
        self.metrics.record_feedback(answered.prompt, rating.kind, rating.score)
        self.tracer.record_feedback(
            answered.span_context,
            answered.model,
            answered.prompt,
            request_id,
            rating.kind,
            rating.score,
        )
        return answered, rating

    # -- turning input into token ids -----------------------------------------------------------

    def chat_prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        tokenizer = self.engine.tokenizer
        if tokenizer is None or not tokenizer.has_chat_template:
            raise InvalidRequest(
                f"the model {self.model_name!r} has no chat template; use completions",
                param="messages",
            )
        try:
            text = tokenizer.apply_chat_template(list(messages))
        except ValueError as error:
            raise InvalidRequest(f"messages: {error}", param="messages") from error
        return tokenizer.encode(text, add_special_tokens=False)

    def text_prompt_ids(self, prompt: str) -> list[int]:
        return self.require_tokenizer("prompt").encode(prompt)

    def require_tokenizer(self, param: str):
        """The model's tokenizer; a model without one takes token ids only."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise InvalidRequest(
                f"the model {self.model_name!r} has no tokenizer: send token ids", param=param
            )
        return tokenizer

    def token_text(self, token_id: int) -> str:
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            return ""
        return tokenizer.decode([token_id], skip_special_tokens=False)

    def remaining_context(self, prompt_token_ids: Sequence[int]) -> int:
        """The max_tokens a request gets when the client sets none: the rest of the context."""
        return max(self.engine.max_model_len - len(prompt_token_ids), 1)

    # -- running one generation -----------------------------------------------------------------

    def make_requests(
        self, prompt_token_ids: list[int], params: list[SamplingParams], request_id: str
    ) -> list[Request]:
        """One engine request per choice, validated once, before any response (or stream)
        starts; InvalidRequest for what the engine refuses. `generate()` runs them as they are."""
        try:
            return [
                self.engine.make_request(
                    sampling_params=choice_params,
                    prompt_token_ids=prompt_token_ids,
                    request_id=request_id if len(params) == 1 else f"{request_id}-{index}",
                )
                for index, choice_params in enumerate(params)
            ]
        except ValueError as error:
            raise InvalidRequest(str(error)) from error

    async def generate(
        self,
        requests: list[Request],
        request_id: str,
        *,
        operation: str,
        carrier: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        stream: bool = False,
        timeout: float | None = None,
        prompt: PromptLabel | None = None,
        started_ns: int | None = None,
    ) -> AsyncGenerator[tuple[int, RequestOutput], None]:
        """Stream (choice index, output) for one client request of len(requests) choices.

        One span covers the request (from `started_ns`, epoch, when work such as retrieval
        came first); metrics count each choice. The caller holds an `admit()`
        slot per choice. Leaving the loop early, or the deadline passing, aborts every
        unfinished choice (the engine frees its KV blocks at once).
        """
        timeout = _min_timeout(timeout, self.options.request_timeout)
        deadline = None if timeout is None else _now() + timeout
        span = self.tracer.start_span(
            operation,
            self.model_name,
            requests[0].sampling_params,
            carrier,
            stream=stream,
            choice_count=len(requests),
            prompt=prompt,
            start_time=started_ns,
        )
        span_context = span.get_span_context() if span.is_recording() else None
        self.answered.remember(request_id, AnsweredRequest(self.model_name, prompt, span_context))
        finals: list[RequestOutput | None] = [None] * len(requests)
        latest: list[RequestOutput | None] = [None] * len(requests)
        error: BaseException | None = None
        merged = _merge([self.engine.stream(request) for request in requests])
        try:
            while None in finals:
                remaining = None if deadline is None else deadline - _now()
                try:
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError
                    index, output = await asyncio.wait_for(anext(merged), remaining)
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"the request did not finish within {timeout:g}s"
                    ) from None
                except ValueError as invalid:
                    raise InvalidRequest(str(invalid)) from invalid
                latest[index] = output
                if output.finished:
                    finals[index] = output
                    self.metrics.record_finished(output, prompt=prompt)
                yield index, output
        except BaseException as failure:
            # Closing the stream after its final output is not a failure.
            if None in finals:
                error = failure
            if isinstance(failure, ServingError):
                failure.prompt = prompt
            raise
        finally:
            await merged.aclose()
            self._record_unfinished(finals, latest, error, prompt)
            done = [f for f in finals if f is not None]
            self.tracer.finish_span(span, done, error, response_id=request_id)

    def record_error(self, error: ServingError) -> None:
        """Count a refused request; the servers call it for every ServingError they send."""
        self.metrics.record_rejected(error.outcome, prompt=error.prompt)

    def _record_unfinished(
        self,
        finals: list[RequestOutput | None],
        latest: list[RequestOutput | None],
        error: BaseException | None,
        prompt: PromptLabel | None,
    ) -> None:
        # ServingErrors are counted by the server that sends them (record_error).
        if error is None or isinstance(error, ServingError):
            return
        # The client went away (or stopped reading) before the request finished.
        cancelled = isinstance(error, asyncio.CancelledError | GeneratorExit)
        outcome = "aborted" if cancelled else "error"
        for final, last in zip(finals, latest, strict=True):
            if final is not None:
                continue
            if last is not None:
                self.metrics.record_finished(last, prompt=prompt, outcome=outcome)
            else:
                self.metrics.record_rejected(outcome, prompt=prompt)


@contextlib.contextmanager
def attributed_to(prompt: ResolvedPrompt | None) -> Iterator[None]:
    """Count the ServingErrors raised inside under the request's managed prompt."""
    try:
        yield
    except ServingError as error:
        if prompt is not None and error.prompt is None:
            error.prompt = prompt.label
        raise


def _now() -> float:
    return asyncio.get_running_loop().time()


def _min_timeout(*timeouts: float | None) -> float | None:
    given = [t for t in timeouts if t is not None]
    return min(given) if given else None


async def _merge(
    streams: list[AsyncGenerator[RequestOutput, None]],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Interleave output streams as they produce; closing the merge closes them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for output in only:
                yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | Exception]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[RequestOutput, None]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for output in stream:
                    await queue.put((index, output))
        except Exception as error:  # noqa: BLE001 - re-raised by the consumer below
            await queue.put((index, error))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        unfinished = len(streams)
        while unfinished:
            index, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield index, item
            if item.finished:
                unfinished -= 1
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
