"""Retrieval in a request: RAG for chat completions and the Generate RPC (chat and managed
prompts; both servers go through Retrieval.chat_messages and RagAnswer), and the worker's own
/v1/embeddings, /v1/search and Embed / Search RPCs.

With a vector index configured (`--vector-index host:port`, a VectorIndex's search Service), a
chat request's user question is searched in the index over gRPC, the top-k chunks go into the
prompt (a managed prompt's `context` variable, or a default system message), and the answer
comes back with its citations and its groundedness: the share of its sentences that a retrieved
chunk supports (kvops.worker.rag.grounding, all-MiniLM-L6-v2 at its calibrated threshold).

MiniLM runs on one worker thread, never on the event loop that streams tokens (one thread: torch
keeps an OpenMP pool per calling thread, and more pools than CPUs slow every parallel region).
It is loaded at start when retrieval is configured, else on the first /v1/embeddings request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kvops.worker.rag.client import SearchClient, SearchUnavailable
from kvops.worker.rag.embedding import MINILM_NAME, MiniLMEmbedder
from kvops.worker.rag.grounding import UNGROUNDED_BELOW, Groundedness, groundedness
from kvops.worker.serve.openai_protocol import MAX_RETRIEVAL_TOP_K as MAX_TOP_K
from kvops.worker.serve.openai_protocol import RetrievalField
from kvops.worker.serve.prompts import ResolvedPrompt
from kvops.worker.serve.service import InvalidRequest, ModelNotFound, ServingError, ServingState
from kvops.worker.serve.telemetry import Carrier, PromptLabel

# A search answers in milliseconds; past this the index is treated as unreachable (503), so a
# request never hangs on it.
SEARCH_TIMEOUT_S = 5.0
# OpenAI's own limit on inputs per embeddings request.
MAX_EMBED_INPUTS = 2048
# The managed-prompt variable that receives the retrieved chunks.
CONTEXT_VARIABLE = "context"
DEFAULT_INSTRUCTION = (
    "Answer the question using only the numbered sources below, and cite them as [n]. "
    "If the sources do not say, answer that you do not know."
)


class IndexUnavailable(ServingError):
    """The vector index did not answer in time: the request cannot be grounded."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    error_type = "server_error"
    outcome = "error"


class NoVectorIndex(ServingError):
    """/v1/search (or the Search RPC) on a worker without a vector index."""

    http_status = 404
    grpc_code = "NOT_FOUND"
    error_type = "invalid_request_error"
    outcome = "invalid"


@dataclass(frozen=True)
class RetrievalOptions:
    """What one request asks of retrieval (the `retrieval` extension field)."""

    top_k: int
    filters: Mapping[str, str] = field(default_factory=dict)


@dataclass
class Retrieved:
    """The chunks one request was given, and how getting them went (for its span)."""

    hits: list[dict]
    top_k: int
    started_ns: int  # epoch nanoseconds
    seconds: float

    def citations(self) -> list[dict]:
        """What the response says it used; `index` is the [n] of the context."""
        return [
            {
                "index": number,
                "source": hit["source"],
                "chunk_id": hit["chunk_id"],
                "score": hit["score"],
            }
            for number, hit in enumerate(self.hits, 1)
        ]

    def context(self) -> str:
        """The chunks, numbered as the citations are, each with its source."""
        return "\n\n".join(
            f"[{number}] (source: {hit['source']})\n{hit['text'].strip()}"
            for number, hit in enumerate(self.hits, 1)
        )


class RagAnswer:
    """One request's retrieval until its answer is scored. A request that ends without an
    answer (an error, a client gone) still records its retrieval span, and only once."""

    def __init__(
        self,
        retrieval: Retrieval,
        retrieved: Retrieved,
        prompt: PromptLabel | None,
        request_id: str,
    ) -> None:
        self.retrieval = retrieval
        self.retrieved = retrieved
        self.prompt = prompt
        self.request_id = request_id
        self._reported = False

    async def score(self, answers: Sequence[str]) -> dict | None:
        """The first answer's groundedness, as the response carries it (see Retrieval.assess)."""
        assessed = await self.retrieval.assess(
            self.retrieved, answers, self.prompt, self.request_id
        )
        self._reported = True
        return assessed

    def report_unscored(self) -> None:
        if not self._reported:
            self.retrieval.report(self.retrieved, [], self.prompt, self.request_id)
            self._reported = True


class Retrieval:
    """One worker's vector index client and embedder, shared by its HTTP and gRPC servers."""

    # What /v1/embeddings and Embed answer with (and groundedness is calibrated for).
    embedding_model = MINILM_NAME

    def __init__(self, state: ServingState, timeout: float = SEARCH_TIMEOUT_S) -> None:
        address = state.options.vector_index
        top_k = state.options.retrieval_top_k
        if not 1 <= top_k <= MAX_TOP_K:
            raise ValueError(f"retrieval top_k must be between 1 and {MAX_TOP_K}, got {top_k}")
        self.state = state
        self.address = address
        self.top_k = top_k
        self.client = None if address is None else SearchClient(address, timeout=timeout)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embed")
        self._embedder: MiniLMEmbedder | None = None
        self._loading: asyncio.Lock | None = None

    @property
    def enabled(self) -> bool:
        return self.client is not None

    async def start(self) -> None:
        """Load the embedder now when every RAG answer will need it."""
        if self.enabled:
            await self._embedder_ready()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close_async()
        self._executor.shutdown(wait=False)

    # -- chat requests --------------------------------------------------------------------------

    def options_for(self, requested: bool | RetrievalField | None) -> RetrievalOptions | None:
        """The request's `retrieval` field: absent or true (the defaults), false (none), or
        {top_k, filters}. None: this request does not retrieve."""
        if requested is False or (requested is None and not self.enabled):
            return None
        if not self.enabled:
            raise InvalidRequest(
                "retrieval: this deployment has no vector index (--vector-index)", "retrieval"
            )
        if requested is None or requested is True:
            return RetrievalOptions(self.top_k)
        return RetrievalOptions(requested.top_k or self.top_k, requested.filters)

    def checked_top_k(self, top_k: object) -> int:
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
            raise InvalidRequest(
                f"retrieval.top_k must be an integer from 1 to {MAX_TOP_K}", "retrieval.top_k"
            )
        return top_k

    async def chat_messages(
        self,
        requested: bool | RetrievalField | None,
        prompt: ResolvedPrompt | None,
        variables: Mapping[str, str],
        messages: list[dict[str, str]],
        carrier: Carrier | None,
    ) -> tuple[list[dict[str, str]], Retrieved | None]:
        """A chat request's messages (the managed prompt's rendered ones, if it names one, then
        its own) with the chunks retrieved for its user question, unless `requested` (its
        `retrieval` option, as options_for reads it) leaves retrieval out. The HTTP and gRPC
        servers both build their chat prompts here."""
        options = self.options_for(requested)
        if options is None:
            rendered = [] if prompt is None else self.state.render_prompt(prompt, variables)
            return rendered + messages, None
        return await self.augment(options, prompt, variables, messages, carrier)

    async def augment(
        self,
        options: RetrievalOptions,
        prompt: ResolvedPrompt | None,
        variables: Mapping[str, str],
        messages: list[dict[str, str]],
        carrier: Carrier | None,
    ) -> tuple[list[dict[str, str]], Retrieved]:
        """The request's messages with the chunks retrieved for its user question: in the
        managed prompt's `context` variable when it declares one, else in a system message."""
        state = self.state
        takes_context = prompt is not None and any(
            v.name == CONTEXT_VARIABLE for v in prompt.spec.variables
        )
        if takes_context and CONTEXT_VARIABLE in variables:
            raise InvalidRequest(
                f"prompt variable {CONTEXT_VARIABLE!r} is filled by retrieval; send "
                "retrieval: false to give it yourself",
                "prompt.variables",
            )
        if prompt is None:
            draft = messages
        else:
            # Rendered once without the context to find the question (it may be a variable).
            empty = {CONTEXT_VARIABLE: ""} if takes_context else {}
            draft = state.render_prompt(prompt, {**variables, **empty}) + messages
        retrieved = await self.retrieve(_question(draft), options, prompt, carrier)
        if takes_context:
            assert prompt is not None
            rendered = state.render_prompt(
                prompt, {**variables, CONTEXT_VARIABLE: retrieved.context()}
            )
            return rendered + messages, retrieved
        return _with_context_message(draft, retrieved), retrieved

    async def retrieve(
        self,
        query: str,
        options: RetrievalOptions,
        prompt: ResolvedPrompt | None = None,
        carrier: Carrier | None = None,
    ) -> Retrieved:
        """The top chunks for `query`; IndexUnavailable (counted, traced) when the index does
        not answer."""
        client = self.client
        if client is None:
            raise NoVectorIndex(
                "no vector index is configured on this worker (--vector-index)", "retrieval"
            )
        started_ns = time.time_ns()
        started = time.perf_counter()
        try:
            hits = await client.search_async(query, options.top_k, dict(options.filters))
        except SearchUnavailable as error:
            self._record_failure(started_ns, options, prompt, carrier, error)
            # "vector index at HOST:PORT unreachable: <why>"
            raise IndexUnavailable(f"{error}; retry later") from None
        except ValueError as error:
            raise InvalidRequest(str(error), "retrieval") from None
        except RuntimeError as error:
            self._record_failure(started_ns, options, prompt, carrier, error)
            raise IndexUnavailable(str(error)) from None
        seconds = time.perf_counter() - started
        self.state.metrics.record_retrieval(seconds)
        return Retrieved(hits, options.top_k, started_ns, seconds)

    async def assess(
        self,
        retrieved: Retrieved,
        answers: Sequence[str],
        prompt: PromptLabel | None,
        request_id: str,
    ) -> dict | None:
        """Score each answer's groundedness in the retrieved chunks, record it (metrics, the
        retrieval span under the request's span) and return the first answer's, as the response
        carries it. With no answer (the request failed), only the span is recorded."""
        chunks = [hit["text"] for hit in retrieved.hits]
        scores = [await self.groundedness(answer, chunks) for answer in answers]
        return self.report(retrieved, scores, prompt, request_id)

    def report(
        self,
        retrieved: Retrieved,
        scores: Sequence[Groundedness],
        prompt: PromptLabel | None,
        request_id: str,
    ) -> dict | None:
        """Record the scores (metrics) and the retrieval span; the first answer's score as the
        response carries it (None without an answer)."""
        for score in scores:
            self.state.metrics.record_groundedness(
                score.score, score.score < UNGROUNDED_BELOW, prompt=prompt
            )
        answered = self.state.answered.get(request_id)
        self.state.tracer.record_retrieval(
            None if answered is None else answered.span_context,
            None,
            address=self.address or "",
            top_k=retrieved.top_k,
            hits=len(retrieved.hits),
            started_ns=retrieved.started_ns,
            seconds=retrieved.seconds,
            prompt=prompt,
            groundedness=scores[0].score if scores else None,
            ungrounded_sentences=(
                sum(not s.supported for s in scores[0].sentences) if scores else None
            ),
        )
        if not scores:
            return None
        return {
            "score": scores[0].score,
            "ungrounded_sentences": [s.sentence for s in scores[0].sentences if not s.supported],
        }

    async def groundedness(self, answer: str, chunks: list[str]) -> Groundedness:
        embedder = await self._embedder_ready()
        return await self._run(groundedness, answer, chunks, embedder)

    def _record_failure(
        self,
        started_ns: int,
        options: RetrievalOptions,
        prompt: ResolvedPrompt | None,
        carrier: Carrier | None,
        error: Exception,
    ) -> None:
        self.state.metrics.record_retrieval_error()
        # No request span exists yet: the failed retrieval is a child of the caller's context.
        self.state.tracer.record_retrieval(
            None,
            carrier,
            address=self.address or "",
            top_k=options.top_k,
            hits=0,
            started_ns=started_ns,
            seconds=(time.time_ns() - started_ns) / 1e9,
            prompt=None if prompt is None else prompt.label,
            error=type(error).__name__,
        )

    # -- /v1/embeddings, /v1/search, Embed, Search ----------------------------------------------

    def check_embedding_model(self, model: str | None) -> None:
        # The served model's name is accepted too: an `llmd://` embedder (RemoteEmbedder) names
        # the first model of /v1/models.
        if model not in (None, "", MINILM_NAME, self.state.model_name):
            raise ModelNotFound(
                f"the embedding model {model!r} does not exist; this server embeds with "
                f"{MINILM_NAME!r}",
                "model",
            )

    async def embed(self, inputs: list[str]) -> tuple[list[list[float]], int]:
        """The normalised embeddings of `inputs` and their token count."""
        if not inputs:
            raise InvalidRequest("input must not be empty", "input")
        if len(inputs) > MAX_EMBED_INPUTS:
            raise InvalidRequest(
                f"at most {MAX_EMBED_INPUTS} inputs per request, got {len(inputs)}", "input"
            )
        embedder = await self._embedder_ready()

        def run() -> tuple[list[list[float]], int]:
            encodings = embedder.tokenizer.encode_batch(inputs, add_special_tokens=True)
            return embedder.embed(inputs).tolist(), sum(len(e.ids) for e in encodings)

        return await self._run(run)

    async def search(self, query: str, top_k: int | None, filters: Mapping[str, str]) -> list[dict]:
        """A plain search (no generation) against the configured index."""
        if not query.strip():
            raise InvalidRequest("query must not be empty", "query")
        options = RetrievalOptions(self.checked_top_k(top_k or self.top_k), filters)
        return (await self.retrieve(query, options)).hits

    # -- the embedder's thread ------------------------------------------------------------------

    async def _embedder_ready(self) -> MiniLMEmbedder:
        if self._embedder is None:
            if self._loading is None:
                self._loading = asyncio.Lock()
            async with self._loading:
                if self._embedder is None:
                    self._embedder = await self._run(MiniLMEmbedder)
        return self._embedder

    async def _run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)


def _question(messages: Sequence[Mapping[str, str]]) -> str:
    """The text retrieval searches for: the last user message."""
    for message in reversed(messages):
        if message["role"] == "user" and message["content"].strip():
            return message["content"]
    raise InvalidRequest(
        "retrieval needs a user message to search for (or send retrieval: false)", "messages"
    )


def _with_context_message(
    messages: list[dict[str, str]], retrieved: Retrieved
) -> list[dict[str, str]]:
    """The default placement: the instruction and the chunks as the system message (appended
    to the request's own system message when it has one)."""
    context = f"{DEFAULT_INSTRUCTION}\n\n{retrieved.context()}"
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{"role": "system", "content": f"{first['content']}\n\n{context}"}, *messages[1:]]
    return [{"role": "system", "content": context}, *messages]
