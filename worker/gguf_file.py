"""GGUF files: a small parser of our own, dequantization, tensor names and model config.

The format is a header of typed key/value pairs, a table of tensors and an aligned data section.
Our parser reads the header in well under a tenth of a second where gguf.GGUFReader takes about
two; Q8_0/Q4_0/Q4_1 are dequantized with numpy here, every other type with `gguf.quants`.
llama.cpp's converter stores the rows of Llama's q and k projections permuted for interleaved
("GPT-J style") rotary embeddings; `unpermute_rotary` undoes that so the weights work with the
rotate-half rotary embedding of Hugging Face's Llama. Qwen2 files are stored unpermuted.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from kvops.worker.config import ModelConfig

logger = logging.getLogger(__name__)

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


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
        return ggml_type_name(self.ggml_type)


def ggml_type_name(ggml_type: int) -> str:
    """ggml's name of a tensor type ("Q4_1"), or "type <n>" for one gguf does not know."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


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


def gguf_tensor_bytes(blob: np.ndarray, info: GGUFTensorInfo) -> torch.Tensor:
    """A matrix's stored bytes, unconverted: uint8 [rows, bytes per row] (quantized blocks are
    kept as they are, see ops/quant_formats.py)."""
    raw = np.array(blob[info.offset : info.offset + info.nbytes])  # a copy: the file is a memmap
    return torch.from_numpy(raw).view(info.shape[0], -1)


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
GGUF_IGNORED = re.compile(r"^(rope_freqs\.weight|blk\.\d+\.attn_rot_embd(\.weight)?)$")


def gguf_to_hf_name(name: str) -> str | None:
    """The Hugging Face Llama name of a GGUF tensor name (None: not a decoder parameter)."""
    if name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[name]
    match = re.fullmatch(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)", name)
    if match and match.group(2) in _GGUF_LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"
    return None


def unpermute_rotary(weight: ArrayT, n_heads: int) -> ArrayT:
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
