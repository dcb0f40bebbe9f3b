"""Groundedness through the real MiniLM scorer: an answer copied from a retrieved chunk scores
near 1, an answer about something the corpus does not hold near 0, and the threshold in
worker/rag/grounding.py is the one its labelled calibration set gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvops.worker.rag.embedding import MiniLMEmbedder
from kvops.worker.rag.grounding import (
    SUPPORT_THRESHOLD,
    calibrate,
    groundedness,
    split_sentences,
)

CHUNKS = [
    "The Aurora 3 router supports Wi-Fi 6E on the 6 GHz band. It has four gigabit Ethernet "
    "ports and one 2.5 gigabit WAN port. Firmware updates are installed automatically every "
    "Sunday at 3 a.m. unless automatic updates are turned off in the admin panel.",
    "To reset the Aurora 3 to factory settings, hold the reset button on the back for ten "
    "seconds until the status light blinks amber. All settings, including the Wi-Fi password, "
    "are erased.",
]


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder()


def test_an_answer_copied_from_a_chunk_is_grounded(embedder):
    answer = (
        "Hold the reset button on the back for ten seconds until the status light blinks amber. "
        "All settings, including the Wi-Fi password, are erased."
    )
    result = groundedness(answer, CHUNKS, embedder)
    assert result.score == 1.0
    assert [s.best_chunk_index for s in result.sentences] == [1, 1]
    assert all(s.similarity > 0.9 for s in result.sentences)


def test_an_answer_about_something_absent_is_not(embedder):
    answer = (
        "The Eiffel Tower was completed in 1889 for the World's Fair. "
        "It is about 330 metres tall and was the tallest structure in the world for 41 years."
    )
    result = groundedness(answer, CHUNKS, embedder)
    assert result.score == 0.0
    assert all(s.similarity < 0.3 and not s.supported for s in result.sentences)


def test_a_half_made_up_answer_scores_in_between(embedder):
    answer = (
        "The Aurora 3 has four gigabit Ethernet ports and a 2.5 gigabit WAN port. "
        "Its battery keeps the network running for eight hours during a power cut."
    )
    result = groundedness(answer, CHUNKS, embedder)
    assert result.score == 0.5
    assert [s.supported for s in result.sentences] == [True, False]


def test_edge_cases(embedder):
    assert groundedness("", CHUNKS, embedder).score == 1.0  # nothing claimed
    no_context = groundedness("The router has four ports.", [], embedder)
    assert no_context.score == 0.0 and no_context.sentences[0].best_chunk_index == -1
    # Fragments too short to claim anything ("Yes.") are left out.
    assert split_sentences("First one here. The second one!\nA third line here? Yes.") == [
        "First one here.",
        "The second one!",
        "A third line here?",
    ]


@pytest.mark.slow
def test_the_threshold_is_what_the_calibration_set_gives(embedder):
    cases = json.loads((Path(__file__).parent / "rag_groundedness_calibration.json").read_text())
    report = calibrate(cases, embedder)
    assert report["supported"] >= 25 and report["unsupported"] >= 25
    assert abs(report["threshold"] - SUPPORT_THRESHOLD) < 0.01
    assert report["accuracy"] >= 0.95
