"""From sampled tokens to what a caller sees: incremental text, stop checks, RequestOutputs.

The engine hands each sampled token to `check_stop()`, which decides whether the request ends
(a stop token, EOS, its length, or a stop string in its text), then reports it with
`make_output()`. Text is decoded incrementally, and while a request runs the last characters
that could begin a stop string are held back, so no client ever sees half of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvops.worker.request import Request, RequestOutput, RequestStatus
from kvops.worker.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputState:
    """One request's decoded text, cut before its first stop string, and what was reported.

    Without a tokenizer there is no text: the request reports token ids only.
    """

    def __init__(
        self, tokenizer: Tokenizer | None, prompt_token_ids: Sequence[int], stop: Sequence[str]
    ):
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, prompt_token_ids) if tokenizer is not None else None
        )
        self.stop = list(stop)
        # The longest text that may still become a stop string once more tokens arrive.
        self.holdback = max(map(len, self.stop)) - 1 if self.stop else 0
        self.text = ""
        self.reported_chars = 0
        self.reported_tokens = 0

    def add_token(self, token: int, last: bool) -> str | None:
        """Decode one more token (`last`: none follows, so an incomplete character is released);
        return the stop string the text now contains, after cutting the text before it."""
        if self.detokenizer is None:
            return None
        previous_len = len(self.detokenizer.text)
        self.detokenizer.add([token])
        if last:
            self.detokenizer.flush()
        self.text = self.detokenizer.text
        if not self.stop:
            return None
        # Only the new text, and what a stop string could straddle, needs searching.
        search_from = max(0, previous_len - self.holdback)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        self.text = self.text[:index]
        return stop

    def report_text(self, finished: bool) -> str:
        """The text not reported yet, less the holdback while the request runs."""
        visible = len(self.text) if finished else len(self.text) - self.holdback
        visible = max(visible, self.reported_chars)
        new_text = self.text[self.reported_chars : visible]
        self.reported_chars = visible
        return new_text


def check_stop(
    request: Request, state: OutputState, token: int, max_model_len: int
) -> tuple[RequestStatus | None, str | int | None]:
    """Whether `token`, just appended to `request`, ends it: (status, stop reason), or Nones."""
    params = request.sampling_params
    status, reason = None, None
    if token in params.stop_token_ids:
        status, reason = RequestStatus.FINISHED_STOPPED, token
    elif not params.ignore_eos and token in request.eos_token_ids:
        status = RequestStatus.FINISHED_STOPPED
    elif request.num_output_tokens >= params.max_tokens or request.num_tokens >= max_model_len:
        status = RequestStatus.FINISHED_LENGTH
    stop = state.add_token(token, last=status is not None)
    if stop is not None:
        return RequestStatus.FINISHED_STOPPED, stop
    return status, reason


def make_output(
    request: Request, state: OutputState, stop_reason: str | int | None = None
) -> RequestOutput:
    """The request's cumulative output and its delta since the previous make_output()."""
    finished = request.is_finished
    new_text = state.report_text(finished)
    new_token_ids = request.output_token_ids[state.reported_tokens :]
    logprobs = request.output_logprobs if request.sampling_params.logprobs is not None else None
    new_logprobs = logprobs[state.reported_tokens :] if logprobs is not None else None
    state.reported_tokens = request.num_output_tokens
    return RequestOutput(
        request_id=request.request_id,
        prompt_token_ids=request.prompt_token_ids,
        token_ids=list(request.output_token_ids),
        text=state.text[: state.reported_chars],
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
