"""Greedy output of the engine equals Hugging Face transformers' greedy generate(), token for token.

SmolLM2-135M-Instruct from the shipped GGUF (dequantized, float32) and random-weight Llama,
Mistral and Qwen2 models, batched with mixed lengths, with and without prefix caching, with chunked
prefill and with a KV cache small enough to force preemption.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from kvops.worker.config import EngineConfig, ModelConfig
from kvops.worker.engine import LLMEngine
from kvops.worker.request import SamplingParams
from kvops.worker.weights import load_model_weights

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a GPU is to a ten year old.",
    "List three prime numbers greater than 50.",
    "Translate 'good morning' into Spanish and German.",
    "Why is the sky blue? Answer briefly.",
    "Give me a Python function that reverses a string.",
    "What are the benefits of regular exercise?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
]


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate() for one unpadded prompt, EOS disabled."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    return out[0, len(prompt_ids) :].tolist()


def hf_model_with_weights(config: ModelConfig, state_dict: dict[str, torch.Tensor]):
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_config())
    model = transformers.AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model.eval()


@pytest.mark.slow
def test_smollm2_chat_prompts_equal_transformers(smollm2_engine):
    engine = smollm2_engine
    tokenizer = engine.tokenizer
    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template([{"role": "user", "content": text}]),
            add_special_tokens=False,
        )
        for text in CHAT_PROMPTS
    ]
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    outputs = engine.generate(prompt_token_ids=prompts, sampling_params=params)

    # The same dequantized weights, loaded again: the runner's own linear layers are packed for
    # oneDNN and no longer hold dense matrices.
    hf = hf_model_with_weights(engine.model_config, load_model_weights("default").state_dict)
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.finish_reason == "length"
        assert output.token_ids == hf_greedy(hf, prompt, 64)
    assert engine.kv_cache.usage == 0


# GQA ratios 1, 3 and 4; head_dim 64 and 128; llama3 rope scaling; Qwen2's qkv bias.
RANDOM_CONFIGS = {
    "llama-gqa1-d64": dict(
        architecture="LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=4, head_dim=64
    ),
    "mistral-gqa3-d64": dict(
        architecture="MistralForCausalLM", num_attention_heads=6, num_key_value_heads=2, head_dim=64
    ),
    "qwen2-gqa4-d128": dict(
        architecture="Qwen2ForCausalLM",
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=128,
        attention_bias=True,
    ),
    "llama3-rope-gqa4-d128": dict(
        architecture="LlamaForCausalLM",
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
}

ENGINE_VARIANTS = {
    "prefix-caching": dict(enable_prefix_caching=True),
    "no-prefix-caching": dict(enable_prefix_caching=False),
    "chunked-prefill": dict(max_num_batched_tokens=24),
    "no-chunking": dict(enable_chunked_prefill=False, max_num_batched_tokens=256),
    # 18 blocks of 8 hold 144 tokens: the batch needs far more, so requests get preempted.
    "preemption": dict(num_kv_blocks=18, max_model_len=144),
}


@pytest.fixture(scope="module", params=list(RANDOM_CONFIGS))
def random_model_folder(request, tmp_path_factory, default_tokenizer_json):
    """A Hugging Face folder (config.json, model.safetensors, tokenizer.json) of random weights."""
    config = ModelConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        **RANDOM_CONFIGS[request.param],
    )
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_config())
    # Larger than the default init so logits are spread out and greedy has no near-ties.
    hf_config.initializer_range = 0.08
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, torch_dtype=torch.float32)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(default_tokenizer_json)
    return folder, model.eval()


def mixed_prompts(seed: int = 0) -> list[list[int]]:
    """Mixed lengths; several share a 20-token prefix so prefix caching has something to hit."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 512) for _ in range(20)]
    prompts = []
    for length in (1, 5, 17, 33, 48, 64, 23, 40):
        tokens = [rng.randrange(3, 512) for _ in range(length)]
        prompts.append(shared + tokens if length in (17, 33, 40) else tokens)
    return prompts


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(ENGINE_VARIANTS))
def test_random_weights_equal_transformers(random_model_folder, variant):
    folder, hf = random_model_folder
    config = EngineConfig(model=str(folder), block_size=8, max_num_seqs=8)
    for key, value in ENGINE_VARIANTS[variant].items():
        setattr(config, key, value)
    engine = LLMEngine(config)
    prompts = mixed_prompts()
    max_tokens = 16
    outputs = engine.generate(
        prompt_token_ids=prompts,
        sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
    )
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.token_ids == hf_greedy(hf, prompt, max_tokens), f"prompt of {len(prompt)}"
    stats = engine.stats()
    if variant == "preemption":
        assert stats.num_preemptions > 0
    if variant == "prefix-caching":
        # Run the shared-prefix prompts again: now their prefixes are cached.
        again = engine.generate(
            prompt_token_ids=prompts[2:4],
            sampling_params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
        )
        assert all(o.num_cached_tokens > 0 for o in again)
        assert [o.token_ids for o in again] == [o.token_ids for o in outputs[2:4]]
    if variant == "no-prefix-caching":
        assert stats.prefix_cache_hits == 0
    assert engine.kv_cache.usage == 0


def test_model_config_round_trips_through_hf_config():
    config = ModelConfig(**RANDOM_CONFIGS["llama3-rope-gqa4-d128"], vocab_size=10, hidden_size=64)
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_config())
    back = ModelConfig.from_hf_config(json.loads(hf_config.to_json_string()))
    assert back.rope_scaling["rope_type"] == "llama3"
    assert back.rope_theta == 500000.0
    assert back.head_dim == 128
    assert back.num_key_value_heads == 2
