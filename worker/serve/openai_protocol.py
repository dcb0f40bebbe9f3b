"""OpenAI's request bodies as pydantic models, and the response objects built from engine outputs.

Field ranges follow OpenAI's API reference, so a client gets the same 400 here as there.
Unknown fields are ignored, as OpenAI-compatible servers do, because clients send vendor extras.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator

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


class ChatCompletionRequest(_GenerationRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


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


def error_body(message: str, error_type: str, param: str | None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
