"""The decode step's fusions give the numbers of the code they replace: stacked projections
(ops/merged_linear.py), the rotary embedding by roll, the fused float32 RMSNorm."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kvops.worker.config import EngineConfig, ModelConfig
from kvops.worker.engine import LLMEngine
from kvops.worker.model import RMSNorm, RotaryEmbedding, rope_inverse_frequencies
from kvops.worker.ops.merged_linear import ConcatLinear, merge_linears
from kvops.worker.ops.quant_formats import quantize
from kvops.worker.ops.quant_linear import QuantizedLinear, QuantizedTensor, kernel_missing
from kvops.worker.request import SamplingParams

needs_kernel = pytest.mark.skipif(
    kernel_missing(torch.device("cpu")) is not None, reason="the C++ CPU kernels did not build"
)


def linears(sizes: list[int], bias: bool) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(64, n, bias=bias) for n in sizes]


@pytest.mark.parametrize("bias", [False, True])
def test_merged_dense_projections_equal_the_separate_ones(bias):
    layers = linears([64, 32, 32], bias)
    merged = merge_linears(layers)
    assert type(merged) is nn.Linear and merged.weight.shape == (128, 64)
    x = torch.randn(5, 64)
    with torch.inference_mode():
        expected = torch.cat([layer(x) for layer in layers], dim=-1)
        torch.testing.assert_close(merged(x), expected)


@needs_kernel
@pytest.mark.parametrize("fmt", ["q8_0", "q4_1", "int8"])
def test_merged_quantized_projections_are_bit_exact(fmt):
    layers = []
    for layer in linears([96, 32, 32], bias=False):
        data, scale = quantize(layer.weight.detach(), fmt)
        layers.append(QuantizedLinear(QuantizedTensor(fmt, data, (layer.out_features, 64), scale)))
    merged = merge_linears(layers)
    assert type(merged) is QuantizedLinear and merged.out_features == 160
    x = torch.randn(3, 64)
    with torch.inference_mode():
        expected = torch.cat([layer(x) for layer in layers], dim=-1)
        assert torch.equal(merged(x), expected)


def test_layers_that_cannot_stack_run_one_by_one():
    # One with a bias and one without: no single matrix-plus-bias computes both.
    layers = [*linears([32], bias=True), *linears([16], bias=False)]
    merged = merge_linears(layers)
    assert isinstance(merged, ConcatLinear)
    x = torch.randn(2, 64)
    with torch.inference_mode():
        expected = torch.cat([layers[0](x), layers[1](x)], dim=-1)
        assert torch.equal(merged(x), expected)


def test_rotary_by_roll_is_bit_exact():
    config = ModelConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    rotary = RotaryEmbedding(config, 64)
    positions = torch.tensor([0, 7, 63])
    x = torch.randn(3, 3, 32)
    # transformers' formulation, written out.
    freqs = positions.float()[:, None] * rope_inverse_frequencies(config)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)
    rotate_half = torch.cat((-x[..., 16:], x[..., :16]), dim=-1)
    expected = x * emb.cos() + rotate_half * emb.sin()
    assert torch.equal(rotary(positions, torch.float32).apply(x), expected)


def test_fused_rms_norm_is_bit_exact_in_float32():
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
    for rows in (1, 7, 300):
        x = torch.randn(rows, 576) * 3
        expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))
        with torch.inference_mode():
            assert torch.equal(norm(x), expected)


@needs_kernel
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_the_fused_decode_layers_give_the_python_layers_bits(fmt):
    """Steps of three decodes (prompts of 3, 17 and 40 tokens) through the C++ layers leave the
    same tokens and log-probabilities as DecoderLayer.forward, so the same KV cache too."""
    engine = LLMEngine(
        EngineConfig(
            model="dummy:smollm2-135m",
            quantization=fmt,
            enable_prefix_caching=False,  # the second run recomputes every prompt as the first
            max_model_len=128,
            num_kv_blocks=64,
        )
    )
    model = engine.runner.model
    assert model.fused_decode_layers is not None
    prompts = [list(range(100, 100 + n)) for n in (3, 17, 40)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=4)
    calls = 0
    fused = model.fused_decode_layers

    def counted(layer):
        def call(*args):
            nonlocal calls
            calls += 1
            return layer(*args)

        return call

    model.fused_decode_layers = [counted(layer) for layer in fused]
    with_fused = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    assert calls == len(fused) * 7  # every decode step after the prompts' went through them
    model.fused_decode_layers = None
    in_python = engine.generate(prompt_token_ids=prompts, sampling_params=params)
    for a, b in zip(with_fused, in_python, strict=True):
        assert a.token_ids == b.token_ids
        assert [lp.top for lp in a.logprobs] == [lp.top for lp in b.logprobs]
