"""Incremental detokenization, stop checks and stop-string holdback against a stub tokenizer."""

from __future__ import annotations

import pytest

from kvops.worker.output_processor import OutputState, check_stop, make_output
from kvops.worker.request import Request, RequestStatus, SamplingParams, TokenLogprob

# Token id -> bytes, as a byte-level BPE vocabulary has them: "é" is split over ids 6 and 7.
PIECES = [b"Hello", b" world", b"!", b" E", b"N", b"D", b"\xc3", b"\xa9", b" more", b"<eos>"]
HELLO, WORLD, BANG, E, N, D, E_ACUTE_1, E_ACUTE_2, MORE, EOS = range(len(PIECES))
MAX_MODEL_LEN = 64


class StubTokenizer:
    """Decodes like a byte-level tokenizer: a character split between tokens shows as U+FFFD."""

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def new_request(max_tokens: int = 16, **params) -> tuple[Request, OutputState]:
    sampling = SamplingParams(max_tokens=max_tokens, **params)
    request = Request("r", [HELLO], sampling, eos_token_ids=frozenset({EOS}))
    return request, OutputState(StubTokenizer(), request.prompt_token_ids, sampling.stop)


def run(request: Request, state: OutputState, tokens: list[int]):
    """Feed tokens as LLMEngine.step() does; every output, up to the one that finishes."""
    outputs = []
    for token in tokens:
        request.output_token_ids.append(token)
        status, reason = check_stop(request, state, token, MAX_MODEL_LEN)
        if status is not None:
            request.status = status
        outputs.append(make_output(request, state, reason))
        if status is not None:
            break
    return outputs


def test_deltas_add_up_to_the_text():
    request, state = new_request()
    outputs = run(request, state, [WORLD, BANG, MORE])
    assert [o.new_text for o in outputs] == [" world", "!", " more"]
    assert outputs[-1].text == " world! more"
    assert [o.new_token_ids for o in outputs] == [[WORLD], [BANG], [MORE]]
    assert outputs[-1].token_ids == [WORLD, BANG, MORE] and not outputs[-1].finished


def test_a_character_split_between_tokens_waits_for_its_second_half():
    request, state = new_request()
    outputs = run(request, state, [E_ACUTE_1, E_ACUTE_2])
    assert [o.new_text for o in outputs] == ["", "é"]


def test_the_last_token_releases_an_incomplete_character():
    request, state = new_request(max_tokens=2)
    outputs = run(request, state, [WORLD, E_ACUTE_1])
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    assert outputs[-1].text == " world\ufffd"


def test_text_that_could_start_a_stop_string_is_held_back():
    request, state = new_request(stop=["END"])
    outputs = run(request, state, [WORLD, E, N, MORE])
    # "END" is 3 characters, so the last 2 wait until they cannot begin it any more.
    assert [o.text for o in outputs] == [" wor", " world", " world ", " world EN mo"]
    assert "".join(o.new_text for o in outputs) == outputs[-1].text


def test_a_stop_string_across_tokens_cuts_the_text_before_it():
    request, state = new_request(stop=["!!", "END"])
    outputs = run(request, state, [WORLD, E, N, D, MORE])
    final = outputs[-1]
    assert len(outputs) == 4 and final.finished
    assert final.finish_reason == "stop" and final.stop_reason == "END"
    assert final.text == " world " == "".join(o.new_text for o in outputs)
    assert final.token_ids == [WORLD, E, N, D]


def test_the_earliest_stop_string_wins():
    request, state = new_request(stop=["d!", "!"])
    [final] = run(request, state, [WORLD, BANG])[1:]
    assert final.stop_reason == "d!" and final.text == " worl"


@pytest.mark.parametrize(
    ("params", "tokens", "finish_reason", "stop_reason"),
    [
        ({"stop_token_ids": [BANG]}, [WORLD, BANG, MORE], "stop", BANG),
        ({}, [WORLD, EOS, MORE], "stop", None),
        ({"ignore_eos": True, "max_tokens": 3}, [WORLD, EOS, MORE], "length", None),
        ({"max_tokens": 2}, [WORLD, MORE, MORE], "length", None),
        ({"max_tokens": 60}, [MORE] * MAX_MODEL_LEN, "length", None),  # the context is full
    ],
)
def test_what_ends_a_request(params, tokens, finish_reason, stop_reason):
    request, state = new_request(**params)
    final = run(request, state, tokens)[-1]
    assert final.finished and final.finish_reason == finish_reason
    assert final.stop_reason == stop_reason


def test_logprobs_are_reported_as_deltas_only_when_asked():
    request, state = new_request(logprobs=1)
    request.output_logprobs.append(TokenLogprob(WORLD, -0.5, {WORLD: -0.5}))
    first = run(request, state, [WORLD])[0]
    request.output_logprobs.append(TokenLogprob(BANG, -1.0, {BANG: -1.0}))
    second = run(request, state, [BANG])[0]
    assert [lp.token_id for lp in second.logprobs] == [WORLD, BANG]
    assert [lp.token_id for lp in first.new_logprobs] == [WORLD]
    assert [lp.token_id for lp in second.new_logprobs] == [BANG]
    plain, plain_state = new_request()
    assert run(plain, plain_state, [WORLD])[0].logprobs is None


def test_an_aborted_request_reports_what_was_held_back():
    request, state = new_request(stop=["END"])
    run(request, state, [WORLD, E])
    request.status = RequestStatus.FINISHED_ABORTED
    final = make_output(request, state)
    assert final.finished and final.finish_reason == "abort"
    assert final.text == " world E" and final.new_text == " E"


def test_without_a_tokenizer_only_token_ids_are_reported():
    request = Request("r", [HELLO], SamplingParams(max_tokens=2))
    state = OutputState(None, request.prompt_token_ids, [])
    outputs = run(request, state, [WORLD, BANG])
    assert [o.new_token_ids for o in outputs] == [[WORLD], [BANG]]
    assert all(o.text == "" == o.new_text for o in outputs) and outputs[-1].finished


def test_a_text_prompt_without_a_tokenizer_is_a_clear_error():
    from kvops.worker.config import EngineConfig
    from kvops.worker.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model="dummy:tiny", num_kv_blocks=16, max_model_len=64))
    engine.tokenizer = None  # as for a model folder without tokenizer.json
    with pytest.raises(ValueError, match="no tokenizer: send prompt token ids"):
        engine.make_request("Hello")
    with pytest.raises(ValueError, match="stop strings need text"):
        engine.make_request(prompt_token_ids=[1, 2], sampling_params=SamplingParams(stop=["x"]))
    request = engine.make_request(prompt_token_ids=[1, 2], sampling_params=SamplingParams())
    assert request.eos_token_ids == frozenset()
