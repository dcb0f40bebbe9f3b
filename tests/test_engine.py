"""LLMEngine and AsyncLLMEngine behaviour on the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvops.worker.async_engine import AsyncLLMEngine
from kvops.worker.config import EngineConfig
from kvops.worker.engine import LLMEngine
from kvops.worker.request import SamplingParams


def chat_ids(engine, text: str) -> list[int]:
    tokenizer = engine.tokenizer
    return tokenizer.encode(
        tokenizer.apply_chat_template([{"role": "user", "content": text}]),
        add_special_tokens=False,
    )


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kwargs)


def run_one(engine: LLMEngine, ids: list[int], params: SamplingParams):
    [output] = engine.generate(prompt_token_ids=[ids], sampling_params=params)
    return output


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ("", greedy(4), "prompt is empty"),
        ("hello " * 9000, greedy(4), "max_model_len"),
        ("hello", SamplingParams(max_tokens=0), "max_tokens"),
        ("hello", SamplingParams(max_tokens=-3), "max_tokens"),
        ("hello", SamplingParams(temperature=-0.5), "temperature"),
        ("hello", SamplingParams(top_p=0.0), "top_p"),
        ("hello", SamplingParams(top_p=1.5), "top_p"),
        ("hello", SamplingParams(logprobs=100), "logprobs"),
    ],
)
def test_bad_requests_are_refused_before_taking_blocks(smollm2_engine, prompt, params, message):
    engine = smollm2_engine
    good = engine.add_request("Count to five.", greedy(6))
    engine.step()
    free_before = engine.kv_cache.num_free_blocks
    waiting_before = engine.stats().num_waiting
    with pytest.raises(ValueError, match=message):
        engine.add_request(prompt, params)
    assert engine.kv_cache.num_free_blocks == free_before
    assert engine.stats().num_waiting == waiting_before
    # The good request carries on to its end.
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert outputs[-1].request_id == good.request_id
    assert outputs[-1].finished and len(outputs[-1].token_ids) == 6
    assert engine.kv_cache.usage == 0


def test_duplicate_request_id_is_refused(smollm2_engine):
    engine = smollm2_engine
    engine.add_request("Hi", greedy(2), request_id="same")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("Hi", greedy(2), request_id="same")
    while engine.has_unfinished_requests():
        engine.step()


def test_unknown_model_path_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises((ValueError, FileNotFoundError), match="no-such-model"):
        LLMEngine(EngineConfig(model=str(missing)))


def test_async_engine_raises_load_errors_from_its_step_thread(tmp_path):
    # from_config loads the model on the step thread; the error must still reach the caller.
    def step_threads() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name == "kvops-engine"}

    before = step_threads()
    missing = tmp_path / "no-such-model"
    with pytest.raises((ValueError, FileNotFoundError), match="no-such-model"):
        AsyncLLMEngine.from_config(EngineConfig(model=str(missing)))
    assert step_threads() <= before  # the failed engine's thread has ended


def test_corrupt_gguf_is_named_corrupt(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(ValueError, match="corrupt"):
        LLMEngine(EngineConfig(model=str(bad)))


def test_abort_frees_blocks_at_once(smollm2_engine):
    engine = smollm2_engine
    request = engine.add_request(
        "Tell me a long story about a dragon.", greedy(100, ignore_eos=True)
    )
    for _ in range(3):
        engine.step()
    assert engine.kv_cache.usage > 0
    final = engine.abort_request(request.request_id)
    assert final.finished and final.finish_reason == "abort"
    assert engine.kv_cache.usage == 0
    assert not engine.has_unfinished_requests()
    assert engine.abort_request(request.request_id) is None


def test_chat_answer_ends_at_end_of_turn(smollm2_engine):
    output = run_one(smollm2_engine, chat_ids(smollm2_engine, "Say hello."), greedy(64))
    assert output.finish_reason == "stop"
    assert len(output.token_ids) < 64
    assert output.token_ids[-1] in smollm2_engine.tokenizer.eos_token_ids
    assert "<|im_end|>" not in output.text and output.text.strip()


def test_max_tokens_one(smollm2_engine):
    output = run_one(smollm2_engine, chat_ids(smollm2_engine, "Hi"), greedy(1))
    assert len(output.token_ids) == 1 and output.finish_reason == "length"


def test_stop_string_cuts_text_and_never_leaks_while_streaming(smollm2_engine):
    engine = smollm2_engine
    ids = chat_ids(engine, "Explain photosynthesis in three sentences.")
    full = run_one(engine, ids, greedy(48, ignore_eos=True)).text
    stop = full[20:26]
    assert stop.strip(), full
    request = engine.add_request(prompt_token_ids=ids, sampling_params=greedy(48, stop=[stop]))
    streamed, finals = "", []
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.request_id == request.request_id
            streamed += output.new_text
            assert stop not in streamed
            finals.append(output)
    assert finals[-1].finish_reason == "stop"
    assert finals[-1].stop_reason == stop
    assert streamed == finals[-1].text == full[: full.index(stop)]


def test_stop_token_id_is_kept_as_last_token(smollm2_engine):
    engine = smollm2_engine
    ids = chat_ids(engine, "Name three colours.")
    tokens = run_one(engine, ids, greedy(20, ignore_eos=True)).token_ids
    stop_token = tokens[5]
    output = run_one(engine, ids, greedy(20, stop_token_ids=[stop_token], ignore_eos=True))
    first = tokens.index(stop_token)
    assert output.token_ids == tokens[: first + 1]
    assert output.finish_reason == "stop" and output.stop_reason == stop_token


def test_seeded_sampling_is_independent_of_the_batch(smollm2_engine):
    engine = smollm2_engine
    ids = chat_ids(engine, "Write a short poem about the sea.")
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run_one(engine, ids, params).token_ids
    others = [chat_ids(engine, f"Question number {i}: why?") for i in range(5)]
    batch = engine.generate(
        prompt_token_ids=[*others[:2], ids, *others[2:]],
        sampling_params=[SamplingParams(max_tokens=24, temperature=1.0, seed=i) for i in range(2)]
        + [params]
        + [SamplingParams(max_tokens=24, temperature=1.0, seed=i) for i in range(3)],
    )
    assert batch[2].token_ids == alone
    different_seed = run_one(engine, ids, SamplingParams(**{**params.__dict__, "seed": 99}))
    assert different_seed.token_ids != alone


def test_top_k_one_is_greedy(smollm2_engine):
    engine = smollm2_engine
    ids = chat_ids(engine, "What is two plus two?")
    sampled = run_one(engine, ids, SamplingParams(max_tokens=16, temperature=0.8, top_k=1, seed=5))
    assert sampled.token_ids == run_one(engine, ids, greedy(16)).token_ids


def test_logprobs_with_top_alternatives(smollm2_engine):
    engine = smollm2_engine
    output = run_one(engine, chat_ids(engine, "Hello!"), greedy(8, logprobs=5))
    assert len(output.logprobs) == len(output.token_ids)
    for token, lp in zip(output.token_ids, output.logprobs, strict=True):
        assert lp.token_id == token
        assert len(lp.top) == 5
        values = list(lp.top.values())
        assert values == sorted(values, reverse=True)
        # Greedy picks the most likely token, so it leads the alternatives.
        assert next(iter(lp.top)) == token
        assert lp.logprob == pytest.approx(lp.top[token]) and lp.logprob <= 0


@pytest.fixture(scope="module")
def async_engine():
    engine = AsyncLLMEngine.from_config(EngineConfig())
    yield engine
    engine.shutdown()


def test_async_streams_concurrent_requests(async_engine, served_engine):
    prompts = [f"Give me a fun fact about the number {i}." for i in range(12)]
    # Each alone, in an engine of the same configuration.
    expected = [
        run_one(served_engine, chat_ids(served_engine, p), greedy(12)).token_ids for p in prompts
    ]

    async def one(prompt: str) -> list[int]:
        tokens = []
        async for output in async_engine.generate(
            prompt_token_ids=chat_ids(async_engine, prompt), sampling_params=greedy(12)
        ):
            tokens += output.new_token_ids
            assert output.token_ids == tokens
        assert output.finished
        return tokens

    async def all_of_them():
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(all_of_them()) == expected


def test_async_cancel_aborts_and_frees_blocks(async_engine):
    async def cancel_midway():
        stream = async_engine.generate("Tell me a very long story.", greedy(300, ignore_eos=True))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.aclose()
        for _ in range(200):
            stats = async_engine.stats()
            if stats.num_running == 0 and stats.kv_cache_usage == 0:
                return stats
            await asyncio.sleep(0.01)
        return async_engine.stats()

    stats = asyncio.run(cancel_midway())
    assert stats.num_running == 0 and stats.kv_cache_usage == 0


def test_async_bad_request_raises_in_caller(async_engine):
    async def bad():
        async for _ in async_engine.generate("hi", SamplingParams(max_tokens=0)):
            pass

    with pytest.raises(ValueError, match="max_tokens"):
        asyncio.run(bad())


@pytest.mark.slow  # the real model
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_engine_answers(dtype):
    engine = LLMEngine(EngineConfig(dtype=dtype, max_model_len=512, num_kv_blocks=64))
    [output] = engine.generate(
        prompt_token_ids=[chat_ids(engine, "What is the capital of France?")],
        sampling_params=greedy(16),
    )
    assert output.token_ids and output.finish_reason in ("stop", "length")
    assert "Paris" in output.text
    assert str(engine.runner.kv_caches[0][0].dtype) == f"torch.{dtype}"
