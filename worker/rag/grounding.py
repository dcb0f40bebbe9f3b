"""Groundedness of an answer in the chunks it was given: the share of the answer's sentences
that some chunk supports, where "supports" means that the sentence's embedding is at least
SUPPORT_THRESHOLD (cosine) from the embedding of the whole chunk, one of its sentences, or one
clause of one of its sentences. Comparing sentence with sentence (and clause) keeps a short
claim from being diluted by the rest of a long chunk.

The threshold was calibrated with all-MiniLM-L6-v2 on the labelled set in
tests/rag_groundedness_calibration.json (answer sentences that restate, paraphrase or copy a
passage of their context, and sentences on the same topics that the context does not say:
other facts, other subjects). calibrate() below does it, and tests/test_rag_grounding.py
recomputes it: the threshold is the midpoint between the
largest unsupported and the smallest supported similarity when the two sets separate, else the
similarity that classifies the most sentences correctly. On its 27 supported and 26
unsupported sentences the two sets separate, narrowly: supported ones reach down to 0.582 (a
paraphrase led by a pronoun, "It brought the Thirty Years' War to an end."), unsupported ones up
to 0.577 (a related fact next to a passage on photosynthesis); the midpoint, 0.58, classifies all
53. The margin is thin and the set small and hand-written: read a score as "how much of the
answer restates its context", not as a verdict on one sentence near 0.58. Another embedder
needs its own threshold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kvops.worker.rag.embedding import Embedder

SUPPORT_THRESHOLD = 0.58
# An answer is "ungrounded" (the worker's kvops_rag_ungrounded_answers_total, from which
# dashboards show a hallucination rate) when fewer than half its sentences are supported: a
# majority of claims from outside the context. Not calibrated on data like SUPPORT_THRESHOLD; a
# policy on top of it, kept here so the two are read together.
UNGROUNDED_BELOW = 0.5

# A sentence ends at ., ! or ? followed by space (or at a line break); abbreviations such as
# "e.g. x" split too, which only makes two shorter sentences to check.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
# Clauses of a context sentence are compared too: an answer often restates one clause of it.
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+")
# Fragments shorter than this (list markers, "Yes.") carry no claim to check.
MIN_SENTENCE_CHARS = 12


@dataclass
class SentenceSupport:
    sentence: str
    best_chunk_index: int  # -1 without chunks
    similarity: float
    supported: bool


@dataclass
class Groundedness:
    score: float  # supported sentences / sentences; 1.0 for an answer with no sentence to check
    sentences: list[SentenceSupport]


def split_sentences(text: str) -> list[str]:
    return [
        part.strip()
        for part in _SENTENCE_END.split(text)
        if len(part.strip()) >= MIN_SENTENCE_CHARS
    ]


def context_units(chunk: str) -> list[str]:
    """A chunk's sentences and, for sentences of several clauses, each clause."""
    units = []
    for sentence in split_sentences(chunk):
        units.append(sentence)
        clauses = [c for c in _CLAUSE_END.split(sentence) if len(c) >= MIN_SENTENCE_CHARS]
        if len(clauses) > 1:
            units += clauses
    return units


def best_support(sentences: list[str], chunks: list[str], embedder: Embedder):
    """For each sentence, its best similarity to a unit of the chunks and that unit's chunk."""
    units: list[str] = []
    owners: list[int] = []
    for number, chunk in enumerate(chunks):
        for unit in dict.fromkeys([chunk, *context_units(chunk)]):
            units.append(unit)
            owners.append(number)
    if not sentences or not units:
        return torch.zeros(len(sentences)), torch.full((len(sentences),), -1)
    vectors = embedder.embed(sentences + units)
    matrix = vectors[: len(sentences)] @ vectors[len(sentences) :].T
    best, best_unit = matrix.max(1)
    return best, torch.tensor(owners)[best_unit]


def groundedness(
    answer: str, chunks: list[str], embedder: Embedder, threshold: float = SUPPORT_THRESHOLD
) -> Groundedness:
    sentences = split_sentences(answer)
    best, owner = best_support(sentences, chunks, embedder)
    support = [
        SentenceSupport(sentence, int(chunk), float(similarity), float(similarity) >= threshold)
        for sentence, similarity, chunk in zip(
            sentences, best.tolist(), owner.tolist(), strict=True
        )
    ]
    if not support:
        return Groundedness(1.0, [])
    return Groundedness(sum(s.supported for s in support) / len(support), support)


def calibrate(cases: list[dict], embedder: Embedder) -> dict:
    """The threshold a labelled set implies. Each case: {context: [chunk texts], supported:
    [sentences the context says], unsupported: [sentences it does not]}."""
    positive: list[float] = []
    negative: list[float] = []
    for case in cases:
        for label, bucket in (("supported", positive), ("unsupported", negative)):
            best, _ = best_support(case[label], case["context"], embedder)
            bucket += best.tolist()
    if max(negative) < min(positive):
        threshold = (max(negative) + min(positive)) / 2
    else:
        candidates = sorted(positive + negative)
        threshold = max(
            candidates,
            key=lambda t: sum(p >= t for p in positive) + sum(n < t for n in negative),
        )
    return {
        "threshold": threshold,
        "supported_min": min(positive),
        "unsupported_max": max(negative),
        "supported": len(positive),
        "unsupported": len(negative),
        "accuracy": (sum(p >= threshold for p in positive) + sum(n < threshold for n in negative))
        / (len(positive) + len(negative)),
    }
