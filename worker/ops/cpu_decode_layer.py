"""A decode step's decoder layers as one C++ call each on the CPU (csrc/decode_layer_cpu.cpp).

Once the weights are quantized, a small model's decode step spends about as long in Python
between its tensor operations as in the weight GEMMs: SmolLM2-135M at one thread, about 110 us
a layer around 250 us of GEMMs. The C++ op runs the operations of `DecoderLayer.forward` in the
same order with the same kernels, so it gives the same bits (tests/test_decode_fusions.py). It
takes steps whose rows are all decodes (a prompt's attention stays in Python), in layers whose
four projections are quantized without a bias and whose attention runs on the C++ CPU kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from kvops.worker.model import DecoderLayer
from kvops.worker.ops import cpu_attention
from kvops.worker.ops.quant_linear import QuantizedLinear

if TYPE_CHECKING:
    from kvops.worker.model import AttentionMetadata, CausalLM, RotaryTables

__all__ = ["FusedDecodeLayer", "fuse_decode_layers"]


class FusedDecodeLayer:
    """`DecoderLayer.forward` for an all-decode step, as one torch op."""

    def __init__(self, layer: DecoderLayer):
        attn = layer.self_attn
        quantized = [p for p in projections(layer) if isinstance(p, QuantizedLinear)]
        assert len(quantized) == 4, "fuse_decode_layers takes only quantized projections"
        self.norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        self.eps = layer.input_layernorm.eps
        self.weights = [p.weight for p in quantized]
        self.scales = [p.scale for p in quantized]
        self.formats = [p.code for p in quantized]
        self.out_features = [p.out_features for p in quantized]
        self.num_heads, self.num_kv_heads = attn.num_heads, attn.num_kv_heads
        self.scale = attn.scale

    def __call__(
        self,
        x: torch.Tensor,
        rope: RotaryTables,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        return torch.ops.kvops.decode_layer_cpu(
            x,
            self.norms,
            self.weights,
            self.scales,
            self.formats,
            self.out_features,
            self.eps,
            rope.cos,
            rope.signed_sin,
            self.num_heads,
            self.num_kv_heads,
            k_cache,
            v_cache,
            meta.slot_mapping,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            self.scale,
        )


def projections(layer: DecoderLayer) -> list[torch.nn.Module | None]:
    """The layer's qkv, o, gate_up and down projections, in the C++ op's order."""
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj]


def fuse_decode_layers(model: CausalLM, kv_dtype: torch.dtype) -> None:
    """Set `model.fused_decode_layers` where every layer qualifies (see the module docstring)."""
    if kv_dtype != torch.float32 or not cpu_attention.extension_available():
        return
    config = model.config
    if not (
        config.head_dim in cpu_attention.HEAD_DIMS
        and config.num_attention_heads // config.num_key_value_heads <= cpu_attention.MAX_GROUP
    ):
        return
    layers = [layer for layer in model.model.layers if isinstance(layer, DecoderLayer)]
    for layer in layers:
        if not (
            layer.self_attn.backend.name == "cpu"
            and all(type(p) is QuantizedLinear and p.bias is None for p in projections(layer))
            and layer.input_layernorm.weight.dtype == torch.float32
            and layer.input_layernorm.eps == layer.post_attention_layernorm.eps
        ):
            return
    model.fused_decode_layers = [FusedDecodeLayer(layer) for layer in layers]
