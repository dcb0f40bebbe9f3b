"""Quantized weights: the formats against gguf's own code, the C++ kernel against the reference,
the real SmolLM2 file's blocks, and the combinations that are refused before anything loads."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from kvops.worker import weights
from kvops.worker.config import EngineConfig
from kvops.worker.gguf_file import gguf_tensor, gguf_tensor_bytes, read_gguf
from kvops.worker.ops.cpu_attention import extension_available
from kvops.worker.ops.quant_formats import BLOCK, FORMATS, dequantize, quantize
from kvops.worker.ops.quant_linear import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedTensor,
    bfloat16_gemm,
    dense_from_rows,
    prompt_rows_from,
)
from kvops.worker.weights import load_model_weights, resolve_model

GGML = {"q8_0": GGMLQuantizationType.Q8_0, "q4_0": GGMLQuantizationType.Q4_0}
GGML["q4_1"] = GGMLQuantizationType.Q4_1
SHAPES = [(1, 192, 576), (7, 1536, 576), (3, 576, 1536), (33, 64, 96)]  # (M, N, K)


def weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # Rows of different magnitude and an outlier or two, as real projections have.
    w = torch.randn(rows, cols, generator=generator) * 0.05
    w *= torch.rand(rows, 1, generator=generator) * 2 + 0.1
    w[0, 3] = 0.9
    return w


@pytest.mark.parametrize("fmt", list(GGML))
def test_the_torch_reference_reads_gguf_blocks_as_gguf_does(fmt):
    w = weight(48, 256).numpy()
    blocks = gguf_quantize(w, GGML[fmt])
    expected = gguf_dequantize(blocks, GGML[fmt])
    got = dequantize(torch.from_numpy(blocks), fmt, 256)
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("fmt", list(GGML))
def test_quantizing_gives_llamas_blocks(fmt):
    w = weight(48, 256)
    ours, _ = quantize(w, fmt)
    theirs = torch.from_numpy(gguf_quantize(w.numpy(), GGML[fmt]))
    assert ours.shape == theirs.shape == (48, FORMATS[fmt].row_bytes(256))
    # Both round the same way except where a value sits on a rounding boundary (their numpy
    # rounds halves away from zero in places where torch rounds them to even).
    differing = (dequantize(ours, fmt, 256) != dequantize(theirs, fmt, 256)).float().mean()
    assert differing < 1e-3


def test_int8_is_per_row_and_symmetric():
    w = weight(16, 64)
    q, scale = quantize(w, "int8")
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert q.abs().amax(dim=1).eq(127).all()  # each row uses its whole range
    error = (dequantize(q, "int8", 64, scale) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """x as the kernel sees it: rounded per 256 values (the last chunk may be shorter) to int16
    with scale amax / 32767."""
    chunks = []
    for chunk in x.split(8 * BLOCK, dim=-1):
        d = chunk.abs().amax(dim=-1, keepdim=True) / 32767
        chunks.append(torch.round(chunk / torch.where(d > 0, d, 1)) * d)
    return torch.cat(chunks, dim=-1)


needs_kernel = pytest.mark.skipif(not extension_available(), reason="no C++ compiler")


@needs_kernel
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_kernel_equals_the_reference_on_the_same_rounded_activations(fmt, m, n, k):
    w = weight(n, k, seed=m)
    data, scale = quantize(w, fmt)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(n))
    got = torch.empty(m, n)  # the integer kernel itself, whatever the rows (no dense path)
    torch.ops.kvops.quant_linear_cpu(
        x, data, torch.empty(0) if scale is None else scale, FORMATS[fmt].code, got
    )
    expected = quantized_activations(x) @ dequantize(data, fmt, k, scale).T
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=5e-5)  # float32 sum order
    # And against the float matmul: the activations' rounding costs next to nothing.
    exact = x @ dequantize(data, fmt, k, scale).T
    assert (got - exact).norm() / exact.norm() < 1e-4


@needs_kernel
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_kernel_expands_a_weight_as_the_reference_does(fmt):
    data, scale = quantize(weight(96, 576), fmt)
    scale = torch.empty(0) if scale is None else scale
    expected = dequantize(data, fmt, 576, scale)
    for dtype in (torch.float32, torch.bfloat16):
        dense = torch.empty(96, 576, dtype=dtype)
        torch.ops.kvops.dequantize_cpu(data, scale, FORMATS[fmt].code, dense)
        assert torch.equal(dense, expected.to(dtype))  # bit for bit, rounded as torch rounds


def dots(x: torch.Tensor, linear: QuantizedLinear) -> torch.Tensor:
    y = torch.empty(x.shape[0], linear.out_features)
    torch.ops.kvops.quant_linear_cpu(x, linear.weight, linear.scale, linear.code, y)
    return y


@needs_kernel
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_prompt_rows_expand_the_weight_where_the_build_says_it_pays(fmt):
    data, scale = quantize(weight(96, 576), fmt)
    linear = QuantizedLinear(QuantizedTensor(fmt, data, (96, 576), scale))
    expected = dequantize(data, fmt, 576, scale)
    if bfloat16_gemm(fmt):
        # Every prompt row, however few, through one bfloat16 GEMM.
        x = torch.randn(3, 576)
        with prompt_rows_from(0):
            got = linear(x)
        assert torch.equal(got, F.linear(x.bfloat16(), expected.bfloat16()).float())
        return
    expands_from = dense_from_rows()
    x = torch.randn(expands_from, 576)
    with prompt_rows_from(0):
        got = linear(x)
    torch.testing.assert_close(got, x @ expected.T, rtol=1e-5, atol=1e-5)
    # Below it, the integer dots; and decode rows (outside prompt_rows_from) always.
    with prompt_rows_from(1):
        assert torch.equal(linear(x), dots(x, linear))
    assert torch.equal(linear(x), dots(x, linear))


@needs_kernel
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_a_rows_result_depends_on_its_kind_and_not_on_its_batch(fmt):
    """A decode row is the integer dots', a prompt row its prompt's alone, whatever they are
    batched with: concurrent requests get the answers each gets alone."""
    data, scale = quantize(weight(256, 576), fmt)
    linear = QuantizedLinear(QuantizedTensor(fmt, data, (256, 576), scale))
    x = torch.randn(5 + 40, 576)
    with prompt_rows_from(5):
        batched = linear(x)
    for i in range(5):
        assert torch.equal(batched[i : i + 1], linear(x[i : i + 1]))
    with prompt_rows_from(0):
        assert torch.equal(batched[5:], linear(x[5:]))
        for start, end in [(5, 7), (20, 45)]:
            assert torch.equal(batched[start:end], linear(x[start:end]))


@needs_kernel
def test_bias_leading_dimensions_and_dtype_are_kept():
    data, _ = quantize(weight(64, 96), "q8_0")
    bias = torch.randn(64)
    linear = QuantizedLinear(QuantizedTensor("q8_0", data, (64, 96)), bias)
    x = torch.randn(2, 3, 96)
    torch.testing.assert_close(linear(x), linear(x.reshape(6, 96)).reshape(2, 3, 64))
    without = QuantizedLinear(QuantizedTensor("q8_0", data, (64, 96)))
    torch.testing.assert_close(linear(x) - without(x), bias.expand(2, 3, 64))
    assert linear(x.bfloat16()).dtype == torch.bfloat16


@needs_kernel
@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "token_embd.weight"])
def test_the_real_smollm2_blocks(name):
    """SmolLM2's file holds Q4_1 layers and a Q8_0 embedding: computed on as stored, they agree
    with the float32 matrix the file dequantizes to."""
    path = resolve_model("default")
    info = read_gguf(path).tensors[name]
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    fmt = {2: "q4_0", 3: "q4_1", 8: "q8_0"}[info.ggml_type]
    rows = slice(0, 2048)  # of the 49152-row embedding, enough
    dense = torch.from_numpy(gguf_tensor(blob, info))[rows]
    blocks = gguf_tensor_bytes(blob, info)[rows].contiguous()
    n, k = dense.shape
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(1))
    got = torch.empty(4, n)
    torch.ops.kvops.quant_linear_cpu(x, blocks, torch.empty(0), FORMATS[fmt].code, got)
    torch.testing.assert_close(got, quantized_activations(x) @ dense.T, rtol=1e-4, atol=1e-4)
    ids = torch.tensor([[0, 5], [n - 1, 17]])
    embedded = QuantizedEmbedding(QuantizedTensor(fmt, blocks, (n, k)), torch.float32)(ids)
    assert torch.equal(embedded, dense[ids])


def test_the_default_file_runs_as_stored_or_dequantized():
    gguf = read_gguf(resolve_model("default"))
    assert weights.gguf_quantization("f.gguf", gguf, "auto") == "q4_1"
    assert weights.gguf_quantization("f.gguf", gguf, "none") == "none"
    assert weights.gguf_quantization("f.gguf", gguf, "q4_1") == "q4_1"


@pytest.mark.parametrize("asked", ["q4_0", "q8_0", "int8"])
def test_a_format_the_file_cannot_give_is_refused_before_reading_weights(asked, monkeypatch):
    def no_reads(*args):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(weights, "gguf_tensor", no_reads)
    monkeypatch.setattr(weights, "gguf_tensor_bytes", no_reads)
    with pytest.raises(ValueError) as error:
        load_model_weights("default", quantization=asked)
    message = str(error.value)
    assert f"quantization {asked}" in message and "Q4_1" in message
    assert "q4_1 (as stored) or none" in message


def test_a_device_without_a_kernel_is_refused_naming_both():
    with pytest.raises(ValueError, match="quantization q8_0 cannot run on device meta"):
        load_model_weights("dummy:smollm2-135m", device="meta", quantization="q8_0")
    with pytest.raises(ValueError, match="quantization q4_1 cannot run on device meta"):
        load_model_weights("default", device="meta", quantization="auto")
    # Unquantized, the same device is fine (shapes only).
    assert load_model_weights("dummy:smollm2-135m", device="meta").quantized == {}


def test_serve_check_refuses_a_format_the_file_cannot_give():
    """`kvops serve --check` (what the operator's contract tests and an admission check run)
    reads the file's header and refuses what the load would; a good combination passes."""

    def check(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "kvops.worker.serve.cli", "serve", "--check", *flags],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    refused = check("--quantization", "q8_0")
    assert refused.returncode == 2, refused.stderr
    assert "quantization q8_0 cannot be given by this file, whose weights are Q4_1" in (
        refused.stderr
    )
    for flags in [("--quantization", "none"), ()]:  # dequantized, and the file's own format
        accepted = check(*flags)
        assert accepted.returncode == 0, accepted.stderr
        assert "configuration OK" in accepted.stdout


def test_unknown_quantizations_are_refused():
    with pytest.raises(ValueError, match="quantization must be one of none, q8_0"):
        EngineConfig(quantization="q5_k").validate()
    with pytest.raises(ValueError, match="quantization must be auto or one of"):
        load_model_weights("default", quantization="fp4")


@needs_kernel
def test_a_float_model_is_quantized_at_load_to_any_format():
    for fmt in FORMATS:
        loaded = load_model_weights(
            "dummy:smollm2-135m", quantization=fmt, model_overrides={"num_hidden_layers": 1}
        )
        assert loaded.quantization == fmt
        assert set(loaded.quantized) == {
            "model.embed_tokens.weight",
            *(f"model.layers.0.{p}.weight" for p in ("self_attn.q_proj", "self_attn.k_proj")),
            *(f"model.layers.0.{p}.weight" for p in ("self_attn.v_proj", "self_attn.o_proj")),
            *(f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")),
        }
        assert all(q.fmt == fmt for q in loaded.quantized.values())
        assert "model.norm.weight" in loaded.state_dict  # norms stay float


def test_the_operator_passes_quantization_to_the_worker():
    from kvops.operator.api import LLMDeploymentSpec
    from kvops.operator.llmdeployment import engine_arguments

    spec = LLMDeploymentSpec.model_validate(
        {"model": {"source": "builtin://smollm2", "quantization": "q4_1"}}
    )
    args = engine_arguments("chat", spec)
    assert args[args.index("--quantization") + 1] == "q4_1"
