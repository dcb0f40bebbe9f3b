"""oneDNN-packed linear layers: equal to F.linear, swapped in by the model runner, and the dense
matrices they replace are freed."""

from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kvops.worker.config import EngineConfig
from kvops.worker.model_runner import ModelRunner
from kvops.worker.ops.cpu_linear import PackedLinear, pack_linear_layers, packing_available
from kvops.worker.weights import DUMMY_PRESETS, dummy_state_dict


def test_packing_applies_to_float32_on_the_cpu_only():
    assert packing_available(torch.device("cpu"), torch.float32)
    assert not packing_available(torch.device("cpu"), torch.bfloat16)
    assert not packing_available(torch.device("cuda"), torch.float32)


@pytest.mark.parametrize("rows", [1, 7, 32, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(576, 192, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(192, 576, generator=gen) / 24)
        if bias:
            linear.bias.copy_(torch.randn(192, generator=gen))
    packed = PackedLinear.from_linear(linear)
    x = torch.randn(rows, 576, generator=gen)
    torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias))
    # A strided view (a slice of a step's rows) and a 3-D input.
    torch.testing.assert_close(packed(x[::2]), F.linear(x[::2], linear.weight, linear.bias))
    x3 = x.view(1, rows, 576)
    torch.testing.assert_close(packed(x3), F.linear(x3, linear.weight, linear.bias))


def test_pack_linear_layers_swaps_every_linear():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 8)))
    x = torch.randn(3, 8)
    expected = model(x)
    assert pack_linear_layers(model) == 2
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    torch.testing.assert_close(model(x), expected)


def test_model_runner_packs_and_frees_the_dense_matrices():
    config = dataclasses.replace(DUMMY_PRESETS["smollm2-135m"], num_hidden_layers=2, vocab_size=512)
    state_dict = dummy_state_dict(config, torch.float32)
    dense = weakref.ref(state_dict["model.layers.0.mlp.up_proj.weight"])
    embedding = state_dict["model.embed_tokens.weight"]
    runner = ModelRunner(EngineConfig(num_kv_blocks=4), config, state_dict, max_model_len=64)
    gc.collect()
    model = runner.model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert dense() is None  # the packed copy replaced it; nothing keeps the dense matrix
    # The tied head is packed from the embedding matrix, which the embedding still uses.
    assert model.model.embed_tokens.weight.data_ptr() == embedding.data_ptr()
    hidden = torch.randn(3, config.hidden_size)
    torch.testing.assert_close(model.compute_logits(hidden), F.linear(hidden, embedding))
