"""KV-cache tensors, flattening a Step (step.py) into one batch, the forward pass and sampling.

The runner knows nothing of the scheduler or of requests: it is handed plain Step records.
"""

from __future__ import annotations

import math
import mmap
import random

import numpy as np
import torch

from kvops.worker.config import EngineConfig, ModelConfig, torch_dtype
from kvops.worker.model import AttentionMetadata, build_model
from kvops.worker.ops.attention import get_attention_backend
from kvops.worker.ops.cpu_decode_layer import fuse_decode_layers
from kvops.worker.ops.cpu_linear import PackedLinear, pack_linear_layers, packing_available
from kvops.worker.ops.quant_linear import QuantizedTensor
from kvops.worker.request import TokenLogprob
from kvops.worker.sampler import sample
from kvops.worker.step import Step, StepRow

# On CUDA, memory kept free for activations besides the KV cache and the weights.
CUDA_ACTIVATION_RESERVE_BYTES = 1 << 30


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        max_model_len: int,
        quantized: dict[str, QuantizedTensor] | None = None,
    ):
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.dtype = torch_dtype(config.dtype)
        self.block_size = config.block_size
        backend = get_attention_backend(config.attention_backend, self.device)
        self.model = build_model(
            model_config, state_dict, backend, max_model_len, self.device, quantized
        )
        if packing_available(self.device, self.dtype):
            pack_linear_layers(self.model)
        if self.device.type == "cpu":
            fuse_decode_layers(self.model, self.dtype)
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
        self.weight_bytes = model_weight_bytes(self.model)
        self._generators: dict[str, torch.Generator] = {}
        self._seed_source = random.Random(config.seed)

    @property
    def kv_cache_bytes(self) -> int:
        """The cache's size (on the CPU its pages are committed as blocks are first written)."""
        return self.num_blocks * self.kv_bytes_per_block

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

        On the CPU it is an anonymous mapping, whose pages are committed only when a block is
        first written: a 2 GiB cache costs what it holds, not 2 GiB (torch.zeros would memset,
        and so commit, all of it at start). Not numpy's calloc, which madvises large arrays
        into 2 MiB huge pages: the first request then committed 2 MiB for every layer, K/V and
        head it touched, 240 MiB for one short prompt on SmolLM2-135M (a fifth of the replica).
        """
        if self.device.type != "cpu":
            return torch.zeros(shape, dtype=self.dtype, device=self.device)
        size = math.prod(shape) * torch.tensor([], dtype=self.dtype).element_size()
        if size == 0:
            return torch.zeros(shape, dtype=self.dtype)
        pages = mmap.mmap(-1, size)  # anonymous: zero-filled, committed on first write
        return torch.frombuffer(pages, dtype=torch.uint8).view(self.dtype).view(shape)

    def release(self, request_ids: list[str]) -> None:
        """Forget the sampling state of finished requests."""
        for request_id in request_ids:
            self._generators.pop(request_id, None)

    def _generator(self, row: StepRow) -> torch.Generator:
        generator = self._generators.get(row.request_id)
        if generator is None:
            seed = row.sampling_params.seed
            if seed is None:
                seed = self._seed_source.getrandbits(63)
            generator = torch.Generator(self.device).manual_seed(seed)
            self._generators[row.request_id] = generator
        return generator

    @torch.inference_mode()
    def execute(self, step: Step) -> dict[str, tuple[int, TokenLogprob | None]]:
        """Run one step; return the sampled token (and logprobs) of each row that samples, by
        request id."""
        logits = self.compute_logits(step)
        samplers = [row for row in step.rows if row.sample]
        if not samplers:
            return {}
        tokens, logprobs = sample(
            logits,
            [row.sampling_params for row in samplers],
            [self._generator(row) for row in samplers],
        )
        return {
            row.request_id: (token, lp)
            for row, token, lp in zip(samplers, tokens, logprobs, strict=True)
        }

    @torch.inference_mode()
    def compute_logits(self, step: Step) -> torch.Tensor:
        """Run the model over the step (writing its keys and values into the cache); return the
        logits [rows that sample, vocab] after each such row's last token, in step order."""
        # Decodes first: the attention layer runs the decode kernel on that prefix of the batch.
        order = sorted(range(len(step.rows)), key=lambda i: step.rows[i].num_tokens != 1)
        batch = [step.rows[i] for i in order]
        hidden = self._forward(batch) if batch else None
        sampling = [j for j, row in enumerate(batch) if row.sample]  # positions in the batch
        if hidden is None or not sampling:  # hidden is None only for an empty batch
            return torch.empty(0, self.model_config.vocab_size, device=self.device)
        last_tokens = np.cumsum([row.num_tokens for row in batch]) - 1
        logits = self.model.compute_logits(hidden[self._tensor(last_tokens[sampling], torch.int64)])
        # The rows ran in batch order; hand them back in step order.
        return logits[self._tensor(np.argsort([order[j] for j in sampling]), torch.int64)]

    def _forward(self, batch: list[StepRow]) -> torch.Tensor:
        """The model over the batch (decodes first), writing its keys and values into the cache;
        the final hidden state of every token."""
        decodes = [row for row in batch if row.num_tokens == 1]
        prefills = batch[len(decodes) :]
        meta = AttentionMetadata(
            slot_mapping=self._tensor(np.concatenate([row.slots for row in batch]), torch.int64),
            num_decode_tokens=len(decodes),
            decode_block_tables=self._block_tables(decodes),
            decode_seq_lens=self._context_lens(decodes),
            prefill_block_tables=self._block_tables(prefills),
            prefill_seq_lens=self._context_lens(prefills),
            prefill_query_start_loc=self._tensor(
                np.cumsum([0] + [row.num_tokens for row in prefills]), torch.int32
            ),
        )
        return self.model(
            self._tensor(np.concatenate([row.token_ids for row in batch]), torch.int64),
            self._tensor(np.concatenate([row.positions for row in batch]), torch.int64),
            self.kv_caches,
            meta,
        )

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values), dtype=dtype).to(self.device, non_blocking=True)

    def _block_tables(self, rows: list[StepRow]) -> torch.Tensor:
        width = max((len(row.block_table) for row in rows), default=0)
        padded = np.zeros((len(rows), width), dtype=np.int32)
        for i, row in enumerate(rows):
            padded[i, : len(row.block_table)] = row.block_table
        return self._tensor(padded, torch.int32)

    def _context_lens(self, rows: list[StepRow]) -> torch.Tensor:
        return self._tensor([row.context_len for row in rows], torch.int32)


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as it holds them: parameters and buffers (a tied matrix
    once), quantized blocks as stored, oneDNN-packed weights as float32."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    for module in model.modules():
        if isinstance(module, PackedLinear):
            total += module.out_features * module.in_features * 4
    return total
