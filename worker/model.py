"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a paged KV cache.

Parameter names equal Hugging Face's, so a state dict from weights.py loads as it is. The math
mirrors transformers' implementation step for step (float32 RMSNorm, rotate_half rotary) because
greedy output must equal transformers' token for token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvops.worker.config import ModelConfig
from kvops.worker.ops.merged_linear import merge_linears
from kvops.worker.ops.quant_linear import (
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedTensor,
    prompt_rows_from,
)


@dataclass
class AttentionMetadata:
    """How one flattened step maps onto the paged KV cache.

    Tokens are ordered decodes first (one new token per sequence), then prefill chunks.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each new token
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32
    decode_seq_lens: torch.Tensor  # [num_decodes] int32, cached tokens incl. the new one
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32
    prefill_seq_lens: torch.Tensor  # [num_prefills] int32
    prefill_query_start_loc: (
        torch.Tensor
    )  # [num_prefills + 1] int32, offsets from the first prefill token


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # One fused op instead of six, with the same float32 results (checked bit for bit
            # against the lines below in tests/test_decode_fusions.py).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """Rotary inverse frequencies, with the llama3 or linear scaling a config may ask for."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    )
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    raise ValueError(f"rope_scaling: rope_type {rope_type!r} is not supported")


class RotaryEmbedding(nn.Module):
    """cos/sin tables per position, computed once in float32 exactly as transformers does."""

    # Buffers (register_buffer below), declared so that they read as tensors.
    cos: torch.Tensor
    signed_sin: torch.Tensor

    def __init__(self, config: ModelConfig, max_positions: int):
        super().__init__()
        inv_freq = rope_inverse_frequencies(config)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)

        # rotate_half(x) * sin == roll(x, D/2) * sin with its first half negated, bit for bit
        # (negation is exact): one roll instead of two slices, a negation and a cat.
        half = emb.shape[-1] // 2
        signed = emb.sin()
        signed[:, :half].neg_()
        self.register_buffer("signed_sin", signed, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryTables:
        """The tables of a step's tokens, gathered once for all layers."""
        return RotaryTables(
            self.cos[positions].to(dtype).unsqueeze(1),
            self.signed_sin[positions].to(dtype).unsqueeze(1),
        )


@dataclass
class RotaryTables:
    """cos and the half-negated sin of each token of a step: [T, 1, D]."""

    cos: torch.Tensor
    signed_sin: torch.Tensor

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, heads, D] (queries and keys together), as transformers'
        ``x * cos + rotate_half(x) * sin``."""
        return x * self.cos + x.roll(x.shape[-1] // 2, -1) * self.signed_sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.backend = backend
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # q, k and v stacked into one layer once the weights are loaded (merge_projections).
        self.qkv_proj: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: RotaryTables,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        assert self.qkv_proj is not None, "build_model merges the projections"
        heads = self.num_heads + self.num_kv_heads
        qkv = self.qkv_proj(x).view(num_tokens, heads + self.num_kv_heads, self.head_dim)
        qk = rope.apply(qkv[:, :heads])
        q, k, v = qk[:, : self.num_heads], qk[:, self.num_heads :], qkv[:, heads:]
        k_cache, v_cache = kv_cache
        self.backend.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode_tokens
        parts = []
        if nd:
            parts.append(
                self.backend.paged_decode_attention(
                    q[:nd],
                    k_cache,
                    v_cache,
                    meta.decode_block_tables,
                    meta.decode_seq_lens,
                    self.scale,
                )
            )
        if nd < num_tokens:
            parts.append(
                self.backend.paged_prefill_attention(
                    q[nd:],
                    k_cache,
                    v_cache,
                    meta.prefill_block_tables,
                    meta.prefill_seq_lens,
                    meta.prefill_query_start_loc,
                    self.scale,
                    # The new keys/values again: prompts without earlier context attend to them
                    # directly rather than gathering them back from the cache (torch backend).
                    key=k[nd:],
                    value=v[nd:],
                )
            )
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        # gate and up stacked into one layer once the weights are loaded (merge_projections).
        self.gate_up_proj: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.gate_up_proj is not None, "build_model merges the projections"
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend):
        super().__init__()
        self.self_attn = Attention(config, backend)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    def __init__(self, config: ModelConfig, backend):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, backend) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder plus its language-model head; forward() runs one flattened step."""

    def __init__(self, config: ModelConfig, backend, max_positions: int):
        super().__init__()
        self.config = config
        self.model = DecoderBody(config, backend)
        self.rotary = RotaryEmbedding(config, max_positions)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The layers as one C++ op each, for steps of decodes only (ops/cpu_decode_layer.py).
        self.fused_decode_layers: list[Callable[..., torch.Tensor]] | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] after the final norm."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rotary(positions, x.dtype)
        layers: Iterable[Callable[..., torch.Tensor]] = self.model.layers
        if self.fused_decode_layers and meta.num_decode_tokens == x.shape[0]:
            layers = self.fused_decode_layers
        # Quantized layers take a prompt's rows and a decode's rows their own ways.
        with prompt_rows_from(meta.num_decode_tokens):
            for layer, kv_cache in zip(layers, kv_caches, strict=True):
                x = layer(x, rope, kv_cache, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def build_model(
    config: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    backend,
    max_positions: int,
    device: torch.device,
    quantized: dict[str, QuantizedTensor] | None = None,
) -> CausalLM:
    """Instantiate without allocating random weights, then take the given tensors as they are
    (``state_dict`` is emptied: its tensors belong to the model). Weights in `quantized` (by
    parameter name) replace their layers with quantized ones (ops/quant_linear.py)."""
    with torch.device("meta"):
        model = CausalLM(config, backend, max_positions)
    quantized = quantized or {}
    _install_quantized(model, quantized, state_dict)
    # The rotary tables are computed, not loaded: build them for real on the target device.
    model.rotary = RotaryEmbedding(config, max_positions).to(device)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    # The model owns the tensors now. Dropping the dict's references lets a later transformation
    # (the CPU's packed linear layers) free each dense matrix instead of holding the whole
    # checkpoint twice.
    state_dict.clear()
    if unexpected:
        raise ValueError(f"weights have unexpected tensors: {sorted(unexpected)[:5]}")
    if missing:
        raise ValueError(f"weights are missing tensors: {sorted(missing)[:5]}")
    model = model.to(device).eval()
    if config.tie_word_embeddings and "model.embed_tokens.weight" in quantized:
        # The head computes on the embedding's quantized matrix.
        head = QuantizedLinear(quantized["model.embed_tokens.weight"])
        model.register_module("lm_head", head)
    elif config.tie_word_embeddings:
        # Tied checkpoints carry no lm_head.weight: the head is a view of the embedding matrix
        # (tied after loading, because load_state_dict(assign=True) would untie it).
        with torch.device("meta"):
            model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        model.lm_head.weight = model.model.embed_tokens.weight
    merge_projections(model)
    return model


def merge_projections(model: CausalLM) -> None:
    """Stack each layer's q/k/v and gate/up weights into one layer apiece (ops/merged_linear.py:
    fewer, larger GEMMs per decode step). Loading keeps the checkpoint's separate names."""
    for layer in model.model.layers:
        assert isinstance(layer, DecoderLayer)
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp.gate_up_proj = merge_linears([mlp.gate_proj, mlp.up_proj])
        del attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj


def _install_quantized(
    model: CausalLM, quantized: dict[str, QuantizedTensor], state_dict: dict[str, torch.Tensor]
) -> None:
    """Swap the modules whose weight is quantized for their quantized forms (a linear layer's
    float bias, if any, moves along from `state_dict`)."""
    for name, weight in quantized.items():
        path, _, leaf = name.rpartition(".")
        parent_path, _, child = path.rpartition(".")
        if leaf != "weight":
            raise ValueError(f"quantized tensor {name} is not a layer's weight")
        parent = model.get_submodule(parent_path)
        module = getattr(parent, child)
        if isinstance(module, nn.Embedding):
            # The meta model's dtype is the default one; the float weights carry the real one.
            dtype = state_dict["model.norm.weight"].dtype
            setattr(parent, child, QuantizedEmbedding(weight, dtype))
        elif isinstance(module, nn.Linear):
            setattr(parent, child, QuantizedLinear(weight, state_dict.pop(path + ".bias", None)))
        else:
            raise ValueError(f"quantized tensor {name} belongs to a {type(module).__name__}")
