"""Quantized weights in the engine, end to end with the real SmolLM2: the shipped Q4_1 file run
as stored, and Q8_0 against the float32 reference on the exactness prompts."""

from __future__ import annotations

import pytest
from model_folder import write_smollm2_folder
from test_engine_exactness import CHAT_PROMPTS

from kvops.worker.config import EngineConfig
from kvops.worker.engine import LLMEngine
from kvops.worker.ops.quant_linear import QuantizedEmbedding, QuantizedLinear
from kvops.worker.request import SamplingParams
from kvops.worker.serve.telemetry import ServingMetrics

pytestmark = pytest.mark.slow

# Small caches: these engines run short prompts only.
SMALL = {"max_model_len": 256, "num_kv_blocks": 160}
# Logprob margins (nats) that Q8_0's rounding may swap: the pair's margins in the two engines
# added up. Measured 2026-11-30: 4 of the 9 prompts diverge within 48 tokens, at sums of
# 0.016-0.177 (the same 4 with float activations; with int8 activations 8 of 9, up to 0.37).
NEAR_TIE = 0.25


def chat_prompts(engine: LLMEngine) -> list[list[int]]:
    tokenizer = engine.tokenizer
    return [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": text}]),
            add_special_tokens=False,
        )
        for text in CHAT_PROMPTS
    ]


def test_the_shipped_file_runs_as_stored_in_a_fraction_of_the_memory():
    quantized = LLMEngine(EngineConfig(**SMALL))  # the default: the file's own format
    model = quantized.runner.model
    assert quantized.stats().quantization == "q4_1"
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantizedLinear)
    assert model.model.layers[0].mlp.down_proj.fmt == "q4_1"
    # The tied head computes on the embedding's Q8_0 blocks, one matrix for both.
    assert isinstance(model.model.embed_tokens, QuantizedEmbedding)
    assert model.lm_head.fmt == "q8_0"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    reference = LLMEngine(EngineConfig(quantization="none", **SMALL))
    assert reference.stats().quantization == "none"
    # 30 layers of Q4_1 (5 bits a weight) and a Q8_0 embedding against float32 everywhere.
    assert quantized.runner.weight_bytes < reference.runner.weight_bytes / 4

    prompt = chat_prompts(quantized)[0]  # the capital of France
    params = SamplingParams(max_tokens=12, temperature=0)
    answer = quantized.generate(prompt_token_ids=[prompt], sampling_params=params)[0]
    assert "Paris" in answer.text

    metrics = ServingMetrics(quantized.model_name, quantized.stats)
    text = metrics.exposition()[0].decode()
    weight_line = next(
        line for line in text.splitlines() if line.startswith("kvops_model_weight_bytes{")
    )
    assert 'quantization="q4_1"' in weight_line
    assert float(weight_line.split()[-1]) == quantized.runner.weight_bytes
    assert "kvops_kv_cache_bytes{" in text and "kvops_resident_memory_bytes{" in text


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    """SmolLM2 as a float (bfloat16) safetensors folder: quantized to Q8_0 at load, or not."""
    return write_smollm2_folder(tmp_path_factory.mktemp("smollm2"))


def test_q8_0_greedy_equals_the_float32_reference(float_folder):
    reference = LLMEngine(EngineConfig(model=str(float_folder), quantization="none", **SMALL))
    q8_0 = LLMEngine(EngineConfig(model=str(float_folder), quantization="q8_0", **SMALL))
    assert q8_0.runner.weight_bytes < reference.runner.weight_bytes / 3
    prompts = chat_prompts(reference)
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True, logprobs=2)
    expected = reference.generate(prompt_token_ids=prompts, sampling_params=params)
    got = q8_0.generate(prompt_token_ids=prompts, sampling_params=params)
    diverged = []
    for want, have in zip(expected, got, strict=True):
        if have.token_ids == want.token_ids:
            continue
        pairs = zip(want.token_ids, have.token_ids, strict=True)
        first = next(i for i, (a, b) in enumerate(pairs) if a != b)
        # Both engines saw the same prefix: each ranks the other's token second. Explained by
        # near-tied logits when the two margins together (how far Q8_0 moved the pair) are small.
        a, b = want.token_ids[first], have.token_ids[first]
        margin_reference = want.logprobs[first].top[a] - want.logprobs[first].top.get(b, -99.0)
        margin_q8_0 = have.logprobs[first].top[b] - have.logprobs[first].top.get(a, -99.0)
        diverged.append((first, round(margin_reference, 3), round(margin_q8_0, 3)))
    print("diverged (position, reference margin, q8_0 margin):", diverged)
    assert all(m1 + m2 < NEAR_TIE for _, m1, m2 in diverged), diverged
    assert len(diverged) <= len(prompts) // 2, diverged
