"""Feedback on answers: the recent requests it may rate, the rating itself, and its durable log.

A client rates an answer by the id the response carried (`chatcmpl-...`, `cmpl-...`, or a
Generate request id). The worker remembers the last MAX_REMEMBERED ids it answered, with the
model, the prompt version and the trace the answer belongs to, so that feedback is counted and
traced under the prompt version that produced the answer. Each rating is appended to a JSON-lines
file, flushed and fsynced before the client hears back, so that a restart loses no rating.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

from opentelemetry.trace import SpanContext

from kvops.worker.serve.telemetry import PromptLabel

# About 450 bytes each, span context included (measured): the last 100k answers take ~45 MB.
MAX_REMEMBERED = 100_000
MAX_COMMENT_CHARS = 4096
# Numeric scores run from 0 to 10 (a 0-1 rating, five stars, ...); thumbs count as 1 and 0.
MIN_SCORE, MAX_SCORE = 0.0, 10.0
THUMBS = {"up": 1.0, "down": 0.0}


@dataclass(frozen=True, slots=True)
class AnsweredRequest:
    """What feedback on one request is attributed to."""

    model: str
    prompt: PromptLabel | None
    # The request's SERVER span, to parent the feedback span in the same trace; None untraced.
    span_context: SpanContext | None


class RecentRequests:
    """The last `capacity` request ids, oldest forgotten first."""

    def __init__(self, capacity: int = MAX_REMEMBERED):
        self.capacity = capacity
        self._requests: OrderedDict[str, AnsweredRequest] = OrderedDict()

    def remember(self, request_id: str, request: AnsweredRequest) -> None:
        self._requests[request_id] = request
        self._requests.move_to_end(request_id)
        while len(self._requests) > self.capacity:
            self._requests.popitem(last=False)

    def get(self, request_id: str) -> AnsweredRequest | None:
        return self._requests.get(request_id)

    def __len__(self) -> int:
        return len(self._requests)


@dataclass(frozen=True)
class Rating:
    score: float
    # "up", "down" or "score": a metric label, so a dashboard can show the thumbs-up rate.
    kind: str


def parse_rating(value: float | str) -> Rating:
    """A thumb ("up" / "down") or a number from MIN_SCORE to MAX_SCORE; ValueError otherwise."""
    if isinstance(value, str):
        if value not in THUMBS:
            raise ValueError(f'score must be "up", "down" or a number, got {value!r}')
        return Rating(THUMBS[value], value)
    score = float(value)
    if not (math.isfinite(score) and MIN_SCORE <= score <= MAX_SCORE):
        raise ValueError(f"score must be from {MIN_SCORE:g} to {MAX_SCORE:g}, got {value!r}")
    return Rating(score, "score")


class FeedbackLog:
    """A JSON-lines file that ratings are appended to, one line each, synced to disk at once."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        # Opened at start, so that an unwritable path stops the server before it serves.
        self._file = open(self.path, "ab+")  # noqa: SIM115 - closed by close()
        self._lock = threading.Lock()
        # A process killed mid-write leaves a partial last line: end it, so the next one parses.
        if self._file.seek(0, os.SEEK_END) > 0:
            self._file.seek(-1, os.SEEK_END)
            if self._file.read(1) != b"\n":
                self._file.write(b"\n")

    def append(
        self, request_id: str, answered: AnsweredRequest, rating: Rating, comment: str | None
    ) -> None:
        """Append one line; it is on disk when this returns (blocking: call it off the loop)."""
        line = {
            "time": datetime.datetime.now(datetime.UTC).isoformat(),
            "request_id": request_id,
            "model": answered.model,
            "prompt_name": answered.prompt.name if answered.prompt else None,
            "prompt_version": answered.prompt.version if answered.prompt else None,
            "score": rating.score,
            "rating": rating.kind,
            "comment": comment,
        }
        data = (json.dumps(line, ensure_ascii=False) + "\n").encode()
        with self._lock:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())
