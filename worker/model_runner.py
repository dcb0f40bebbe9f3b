"""KV-cache tensors, flattening a scheduled step into one batch, the forward pass and sampling."""

from __future__ import annotations

import math
import random

import numpy as np
import torch

from kvops.worker.config import EngineConfig, ModelConfig
from kvops.worker.model import AttentionMetadata, build_model
from kvops.worker.ops.attention import get_attention_backend
from kvops.worker.ops.cpu_linear import pack_linear_layers, packing_available
from kvops.worker.request import Request, TokenLogprob
from kvops.worker.sampler import sample
from kvops.worker.scheduler import ScheduledRequest, SchedulerOutput

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# On CUDA, memory kept free for activations besides the KV cache and the weights.
CUDA_ACTIVATION_RESERVE_BYTES = 1 << 30


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        max_model_len: int,
    ):
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = TORCH_DTYPES[config.dtype]
        self.block_size = config.block_size
        backend = get_attention_backend(config.attention_backend, self.device)
        self.model = build_model(model_config, state_dict, backend, max_model_len, self.device)
        if packing_available(self.device, self.dtype):
            pack_linear_layers(self.model)
        self.num_blocks = self._num_kv_blocks()
        # kv-head major, the layout every attention backend takes (see ops/attention.py).
        shape = (
            model_config.num_key_value_heads,
            self.num_blocks,
            self.block_size,
            model_config.head_dim,
        )
        self.kv_caches = [
            (self._zeros(shape), self._zeros(shape)) for _ in range(model_config.num_hidden_layers)
        ]
        self._generators: dict[str, torch.Generator] = {}
        self._seed_source = random.Random(config.seed)

    @property
    def kv_bytes_per_block(self) -> int:
        mc = self.model_config
        element = torch.tensor([], dtype=self.dtype).element_size()
        return (
            2
            * mc.num_hidden_layers
            * self.block_size
            * mc.num_key_value_heads
            * mc.head_dim
            * element
        )

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = free * self.config.kv_cache_memory_fraction - CUDA_ACTIVATION_RESERVE_BYTES
        else:
            budget = self.config.cpu_kv_cache_bytes
        return max(int(budget // self.kv_bytes_per_block), 0)

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A zeroed KV tensor (the attention reference needs finite values in unused slots).

        On the CPU it comes from calloc (through numpy), so its pages are committed only when a
        block is first written: a 2 GiB cache costs what it holds, not 2 GiB. torch.zeros
        would memset, and so commit, all of it at start.
        """
        if self.device.type != "cpu":
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        element = torch.tensor([], dtype=self.dtype).element_size()
        raw = torch.from_numpy(np.zeros(math.prod(shape) * element, dtype=np.uint8))
        return raw.view(self.dtype).view(shape)

    def release(self, request_ids: list[str]) -> None:
        """Forget the sampling state of finished requests."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    def _generator(self, request: Request) -> torch.Generator:
        generator = self._generators.get(request.request_id)
        if generator is None:
            seed = request.sampling_params.seed
            if seed is None:
                seed = self._seed_source.getrandbits(63)
            generator = torch.Generator(self.device).manual_seed(seed)
            self._generators[request.request_id] = generator
        return generator

    @torch.inference_mode()
    def execute(
        self, scheduler_output: SchedulerOutput
    ) -> dict[str, tuple[int, TokenLogprob | None]]:
        """Run one step; return the sampled token (and logprobs) of each request that completed
        all its known tokens this step. Prefill chunks that stop mid-prompt sample nothing."""
        # Decodes first: the attention layer runs the decode kernel on that prefix of the batch.
        decodes = [s for s in scheduler_output.scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduler_output.scheduled if s.num_new_tokens != 1]
        batch = decodes + prefills
        if not batch:
            return {}
        tables = [np.asarray(s.block_ids, dtype=np.int64) for s in batch]
        input_ids, positions, slots = [], [], []
        sample_rows, samplers = [], []
        num_tokens = 0
        for s, table in zip(batch, tables, strict=True):
            start = s.num_computed_tokens
            end = start + s.num_new_tokens
            pos = np.arange(start, end)
            input_ids.append(_token_slice(s.request, start, end))
            positions.append(pos)
            slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            num_tokens += s.num_new_tokens
            if s.needs_sampling:
                sample_rows.append(num_tokens - 1)
                samplers.append(s)
        meta = AttentionMetadata(
            slot_mapping=self._tensor(np.concatenate(slots), torch.int64),
            num_decode_tokens=len(decodes),
            decode_block_tables=self._block_tables(tables[: len(decodes)]),
            decode_seq_lens=self._seq_lens(decodes),
            prefill_block_tables=self._block_tables(tables[len(decodes) :]),
            prefill_seq_lens=self._seq_lens(prefills),
            prefill_query_start_loc=self._tensor(
                np.cumsum([0] + [s.num_new_tokens for s in prefills]), torch.int32
            ),
        )
        hidden = self.model(
            self._tensor(np.concatenate(input_ids), torch.int64),
            self._tensor(np.concatenate(positions), torch.int64),
            self.kv_caches,
            meta,
        )
        if not samplers:
            return {}
        logits = self.model.compute_logits(hidden[self._tensor(sample_rows, torch.int64)])
        tokens, logprobs = sample(
            logits,
            [s.request.sampling_params for s in samplers],
            [self._generator(s.request) for s in samplers],
        )
        return {
            s.request.request_id: (token, lp)
            for s, token, lp in zip(samplers, tokens, logprobs, strict=True)
        }

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values), dtype=dtype).to(self.device, non_blocking=True)

    def _block_tables(self, tables: list[np.ndarray]) -> torch.Tensor:
        width = max((len(t) for t in tables), default=0)
        padded = np.zeros((len(tables), width), dtype=np.int32)
        for row, table in enumerate(tables):
            padded[row, : len(table)] = table
        return self._tensor(padded, torch.int32)

    def _seq_lens(self, scheduled: list[ScheduledRequest]) -> torch.Tensor:
        return self._tensor(
            [s.num_computed_tokens + s.num_new_tokens for s in scheduled], torch.int32
        )


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    """Tokens [start, end) of prompt + output without concatenating the whole sequence."""
    prompt = request.prompt_token_ids
    if start >= len(prompt):
        n = len(prompt)
        return request.output_token_ids[start - n : end - n]
    if end <= len(prompt):
        return prompt[start:end]
    return prompt[start:] + request.output_token_ids[: end - len(prompt)]
