"""OpenAI's request bodies as pydantic models, and the response objects built from engine outputs.

Field ranges follow OpenAI's API reference, so a client gets the same 400 here as there.
Unknown fields are ignored, as OpenAI-compatible servers do, because clients send vendor extras.
"""

from __future__ import annotations

import base64
import struct
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kvops.operator.api import ModelParameters
from kvops.worker.request import MAX_LOGPROBS, RequestOutput, SamplingParams, TokenLogprob
from kvops.worker.serve.service import MAX_CHOICES

Role = Literal["system", "developer", "user", "assistant", "tool"]
# The engine decides the defaults OpenAI's API shares with it (they agree).
_DEFAULTS = SamplingParams()


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Role
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    """What chat and text completions share."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float = Field(_DEFAULTS.temperature, ge=0, le=2)
    top_p: float = Field(_DEFAULTS.top_p, gt=0, le=1)
    # Extensions that vLLM's API has too.
    top_k: int = Field(_DEFAULTS.top_k, ge=0)
    ignore_eos: bool = _DEFAULTS.ignore_eos
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int, logprobs: int | None, choice: int) -> SamplingParams:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            # Choices of one request differ from each other but repeat with the same seed.
            seed=None if self.seed is None else self.seed + choice,
            stop=stops,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )


class PromptReference(BaseModel):
    """The `prompt` extension of chat completions: a managed prompt version to render."""

    # A misspelt key (`lable`) would otherwise silently pick the production version.
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    version: str | None = None
    label: str | None = None
    variables: dict[str, str] = Field(default_factory=dict)


# Chunks one request may retrieve: the LLMDeployment's bound on spec.retrieval.topK, so that
# every value the operator accepts starts a worker (whether they fit the context is the
# prompt's length check).
MAX_RETRIEVAL_TOP_K = 100


class RetrievalField(BaseModel):
    """The `retrieval` extension of chat completions as an object: this request's top_k and
    metadata filters (equality; the key "source" filters on the document)."""

    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(None, ge=1, le=MAX_RETRIEVAL_TOP_K)
    filters: dict[str, str] = Field(default_factory=dict)


class ChatCompletionRequest(_GenerationRequest):
    # Empty only when `prompt` renders the messages (checked by the server).
    messages: list[ChatMessage] = Field(default_factory=list)
    prompt: PromptReference | None = None
    # RAG (with a vector index): absent or true retrieves, false does not, an object tunes it.
    retrieval: bool | RetrievalField | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("retrieval", mode="before")
    @classmethod
    def _retrieval_object(cls, value: object) -> object:
        """An object's own error, rather than the union's (that it is not a boolean either)."""
        if not isinstance(value, dict):
            return value
        try:
            return RetrievalField.model_validate(value)
        except ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ValueError(f"{where}: {first['msg']}") from None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def with_defaults(self, parameters: ModelParameters) -> ChatCompletionRequest:
        """This request with a prompt's model parameters where the client set none."""
        given = self.model_fields_set
        defaults: dict = {}
        if parameters.temperature is not None and "temperature" not in given:
            defaults["temperature"] = parameters.temperature
        if parameters.top_p is not None and "top_p" not in given:
            defaults["top_p"] = parameters.top_p
        if (
            parameters.max_tokens is not None
            and not {"max_tokens", "max_completion_tokens"} & given
        ):
            defaults["max_tokens"] = parameters.max_tokens
        if parameters.stop and "stop" not in given:
            defaults["stop"] = list(parameters.stop)
        return self.model_copy(update=defaults)


class FeedbackRequest(BaseModel):
    """POST /v1/feedback: a rating of an answer, by the id its response carried."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=256)
    # "up", "down" or a number from 0 to 10 (checked by the server, like the comment's length).
    score: float | str
    comment: str | None = None


class EmbeddingsRequest(BaseModel):
    """OpenAI's POST /v1/embeddings, with the worker's built-in embedding model."""

    model: str | None = None
    input: str | Annotated[list[str], Field(min_length=1)]
    encoding_format: Literal["float", "base64"] = "float"

    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class SearchRequest(BaseModel):
    """POST /v1/search: the same body as a VectorIndex's search server takes."""

    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1)
    top_k: int | None = Field(None, ge=1, le=MAX_RETRIEVAL_TOP_K)
    filters: dict[str, str] = Field(default_factory=dict)


class CompletionRequest(_GenerationRequest):
    prompt: str | Annotated[list[int], Field(min_length=1)]
    max_tokens: int = Field(_DEFAULTS.max_tokens, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


# -- responses --------------------------------------------------------------------------------


def usage(prompt_tokens: int, outputs: list[RequestOutput]) -> dict:
    completion = sum(len(o.token_ids) for o in outputs)
    cached = max((o.num_cached_tokens for o in outputs), default=0)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat_logprobs(logprobs: list[TokenLogprob] | None, token_text) -> dict | None:
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [
            {
                **entry(item.token_id, item.logprob),
                "top_logprobs": [entry(t, lp) for t, lp in item.top.items()],
            }
            for item in logprobs
        ]
    }


def completion_logprobs(
    logprobs: list[TokenLogprob] | None, token_text, offset: int
) -> dict | None:
    if logprobs is None:
        return None
    tokens = [token_text(item.token_id) for item in logprobs]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return {
        "tokens": tokens,
        "token_logprobs": [item.logprob for item in logprobs],
        "top_logprobs": [{token_text(t): lp for t, lp in item.top.items()} for item in logprobs],
        "text_offset": offsets,
    }


def envelope(request_id: str, obj: str, model: str, created: int | None = None) -> dict:
    return {
        "id": request_id,
        "object": obj,
        "created": created or int(time.time()),
        "model": model,
    }


def prompt_used(name: str, version: str, content_hash: str) -> dict:
    """What a response says about the managed prompt that made its messages."""
    return {"prompt": {"name": name, "version": version, "hash": content_hash}}


def embeddings(vectors: list[list[float]], encoding: str, model: str, tokens: int) -> dict:
    """OpenAI's embeddings list; base64 is the little-endian float32 bytes (what its Python
    client asks for by default)."""

    def encoded(vector: list[float]) -> list[float] | str:
        if encoding == "float":
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encoded(vector)}
            for i, vector in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def error_body(message: str, error_type: str, param: str | None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
