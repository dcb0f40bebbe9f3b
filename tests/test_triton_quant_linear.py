"""The Triton weight-only matmul against a torch dequantize-then-matmul reference.

Without a GPU the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1), so
the shapes are small; the real SmolLM2 slice checks the block layout against the GGUF file and
the project's numpy dequantizer.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvops.worker.gguf_file import gguf_tensor, read_gguf
from kvops.worker.ops import triton_quant_linear as tq
from kvops.worker.weights import resolve_model

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
FORMATS = ["q8_0", "q4_0", "q4_1"]


def random_blocks(fmt: str, out_features: int, in_features: int, gen: torch.Generator):
    """Random blocks of `fmt` with realistic scales (fp16 d ~ 0.01, m ~ -0.08)."""
    n_blocks = out_features * in_features // 32
    raw = torch.randint(0, 256, (n_blocks, tq.BLOCK_BYTES[fmt]), dtype=torch.uint8, generator=gen)
    d = (torch.rand(n_blocks, generator=gen) * 0.02 + 0.001).to(torch.float16)
    raw[:, 0:2] = d.view(torch.uint8).view(n_blocks, 2)
    if fmt == "q4_1":
        m = (-torch.rand(n_blocks, generator=gen) * 0.16).to(torch.float16)
        raw[:, 2:4] = m.view(torch.uint8).view(n_blocks, 2)
    return raw.view(out_features, -1)


def reference_dequantize(blocks: torch.Tensor, fmt: str, in_features: int) -> torch.Tensor:
    """The float32 weight [out, in] that `blocks` encode, written from the format's definition."""
    out_features = blocks.shape[0]
    b = blocks.reshape(-1, tq.BLOCK_BYTES[fmt])
    d = b[:, 0:2].contiguous().view(torch.float16).float()  # [n_blocks, 1]
    if fmt == "q8_0":
        w = b[:, 2:].contiguous().view(torch.int8).float() * d
    else:
        packed = b[:, 2:] if fmt == "q4_0" else b[:, 4:]
        q = torch.cat([packed & 0x0F, packed >> 4], dim=1).float()
        if fmt == "q4_0":
            w = d * (q - 8)
        else:
            w = d * q + b[:, 2:4].contiguous().view(torch.float16).float()
    return w.reshape(out_features, in_features)


def assert_matches(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """`got` is x @ weight.T as the kernel may compute it. A compiled kernel rounds each
    dequantized weight to x's dtype before the dot (the interpreter does not), which moves each
    output by at most u * sum(|x * w|) (u: the dtype's unit roundoff); a fixed tolerance failed
    on an H200 where large products cancelled to a small output."""
    expected = x.float() @ weight.T
    assert got.dtype == x.dtype and got.shape == expected.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        return
    unit_roundoff = 2.0**-8 if x.dtype == torch.bfloat16 else 2.0**-11
    # Twice the bound: the float32 sums are ordered differently, and the result is rounded once.
    bound = 2 * unit_roundoff * (x.float().abs() @ weight.abs().T) + expected.abs() * unit_roundoff
    error = (got.float().cpu() - expected).abs()
    worst = int((error - bound).argmax())
    assert bool((error <= bound).all()), (
        f"output {worst}: off by {error.flatten()[worst]:.4g}, bound {bound.flatten()[worst]:.4g}"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("m", "n", "k", "split_k"), [(1, 96, 256, 1), (5, 70, 160, 2)])
def test_quant_matmul_matches_reference(device, fmt, dtype, m, n, k, split_k):
    gen = torch.Generator().manual_seed(FORMATS.index(fmt) * 1000 + m)
    blocks = random_blocks(fmt, n, k, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    got = tq.quant_matmul(x.to(device), blocks.to(device), fmt, n, k, split_k=split_k)
    assert_matches(got.cpu(), x, reference_dequantize(blocks, fmt, k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("m", "split_k"), [(1, None), (17, 3)])
def test_int8_matmul_matches_reference(device, dtype, m, split_k):
    gen = torch.Generator().manual_seed(m)
    n, k = 80, 200  # neither a multiple of the tile sizes: the masks are exercised
    weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, generator=gen) * 0.01
    x = torch.randn(m, k, generator=gen).to(dtype)
    got = tq.int8_matmul(x.to(device), weight.to(device), scale.to(device), split_k=split_k)
    assert_matches(got.cpu(), x, weight.float() * scale[:, None])
    # The same through quant_matmul's format dispatch (what QuantizedLinear calls).
    again = tq.quant_matmul(x.to(device), weight.to(device), "int8", n, k, scale=scale.to(device))
    torch.testing.assert_close(again, got)


@pytest.mark.parametrize("device", DEVICES)
def test_real_smollm2_q4_1_slice(device):
    """64 rows of layer 0's gate projection (1536 x 576) straight from the default GGUF file."""
    path = resolve_model("default")
    info = read_gguf(path).tensors["blk.0.ffn_gate.weight"]
    assert info.shape == (1536, 576) and info.type_name == "Q4_1"
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    raw = torch.from_numpy(np.array(blob[info.offset : info.offset + info.nbytes]))
    rows = 64
    blocks = raw.view(1536, -1)[:rows].contiguous()
    weight = torch.from_numpy(gguf_tensor(path, info))[:rows]
    torch.testing.assert_close(reference_dequantize(blocks, "q4_1", 576), weight)
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(0))
    got = tq.quant_matmul(x.to(device), blocks.to(device), "q4_1", rows, 576)
    torch.testing.assert_close(got.cpu(), x @ weight.T, atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_named():
    blocks = torch.zeros(8, 34, dtype=torch.uint8)
    x = torch.zeros(1, 32)
    with pytest.raises(ValueError, match="'q5_k' is not one of"):
        tq.quant_matmul(x, blocks, "q5_k", 8, 32)
    with pytest.raises(ValueError, match=r"q4_0 blocks must be uint8 \[8, 18\]"):
        tq.quant_matmul(x, blocks, "q4_0", 8, 32)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        tq.quant_matmul(torch.zeros(1, 48), blocks, "q8_0", 8, 48)
    with pytest.raises(ValueError, match=r"x must be \[M, 32\]"):
        tq.quant_matmul(torch.zeros(1, 64), blocks, "q8_0", 8, 32)
    with pytest.raises(ValueError, match="int8 weights need their per-row scale"):
        tq.quant_matmul(x, torch.zeros(8, 32, dtype=torch.int8), "int8", 8, 32)
    with pytest.raises(ValueError, match="scale must be float32 \\[8\\]"):
        tq.int8_matmul(x, torch.zeros(8, 32, dtype=torch.int8), torch.zeros(8, dtype=torch.float64))
