"""LLMEngine, the synchronous engine: add_request / step / abort_request.

AsyncLLMEngine (worker/async_engine.py) steps it on a background thread for the servers; the
output processor (worker/output_processor.py) turns its sampled tokens into text and outputs.
"""

from __future__ import annotations

import itertools
import logging
import time

from kvops.worker.block_manager import KVCacheManager
from kvops.worker.config import EngineConfig
from kvops.worker.model_runner import ModelRunner
from kvops.worker.output_processor import OutputState, check_stop, make_output
from kvops.worker.request import (
    EngineStats,
    Request,
    RequestOutput,
    SamplingParams,
    resident_memory_bytes,
)
from kvops.worker.scheduler import Scheduler
from kvops.worker.weights import load_model_weights

log = logging.getLogger(__name__)


class LLMEngine:
    """The synchronous engine: one `step()` schedules, runs the model once and reports outputs."""

    def __init__(self, config: EngineConfig):
        config.validate()
        self.config = config
        loaded = load_model_weights(
            config.model,
            config.dtype,
            config.device,
            model_overrides=config.model_overrides,
            quantization=config.quantization or "auto",
        )
        self.model_name = loaded.name
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.max_model_len = config.max_model_len or loaded.config.max_position_embeddings
        self.quantization = loaded.quantization
        self.runner = ModelRunner(
            config, loaded.config, loaded.state_dict, self.max_model_len, loaded.quantized
        )
        del loaded
        capacity = self.runner.num_blocks * config.block_size
        # Every request must fit alone, so that preempting the others always lets it finish.
        if capacity < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {capacity} tokens ({self.runner.num_blocks} blocks of "
                f"{config.block_size}), less than max_model_len={self.max_model_len}: "
                "give it more memory or lower max_model_len"
            )
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({config.max_num_batched_tokens}) must be at least "
                f"max_model_len ({self.max_model_len}) when chunked prefill is off"
            )
        self.kv_cache = KVCacheManager(
            self.runner.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(config, self.kv_cache)
        log.info(
            "model %s: weights %.1f MiB (quantization %s), KV cache %.1f MiB (%d blocks), "
            "process resident %.1f MiB",
            self.model_name,
            self.runner.weight_bytes / 2**20,
            self.quantization,
            self.runner.kv_cache_bytes / 2**20,
            self.runner.num_blocks,
            resident_memory_bytes() / 2**20,
        )
        self._outputs: dict[str, OutputState] = {}
        self._ids = itertools.count()

    # -- requests -----------------------------------------------------------------------------

    def make_request(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Validate and tokenize, touching no engine state; raise ValueError naming the problem."""
        params = sampling_params or SamplingParams()
        params.validate()
        if prompt_token_ids is None:
            if not isinstance(prompt, str):
                raise ValueError("prompt must be a string or a list of token ids")
            if self.tokenizer is None:
                raise ValueError(
                    f"the model {self.model_name!r} has no tokenizer: send prompt token ids"
                )
            prompt_token_ids = self.tokenizer.encode(prompt) if prompt else []
        if params.stop and self.tokenizer is None:
            raise ValueError(
                f"stop strings need text, and the model {self.model_name!r} has no tokenizer: "
                "use stop_token_ids"
            )
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt has {len(prompt_token_ids)} tokens and max_tokens is {params.max_tokens}: "
                f"together more than the model's context length (max_model_len="
                f"{self.max_model_len})"
            )
        return Request(
            request_id if request_id is not None else f"req-{next(self._ids)}",
            prompt_token_ids,
            params,
            eos_token_ids=self.tokenizer.eos_token_ids if self.tokenizer else frozenset(),
        )

    def add_request(
        self,
        prompt: str | None = None,
        sampling_params: SamplingParams | None = None,
        prompt_token_ids: list[int] | None = None,
        request_id: str | None = None,
    ) -> Request:
        request = self.make_request(prompt, sampling_params, prompt_token_ids, request_id)
        self.enqueue(request)
        return request

    def enqueue(self, request: Request) -> None:
        """Admit a request from make_request()."""
        if self.scheduler.get_request(request.request_id) is not None:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self._outputs[request.request_id] = OutputState(
            self.tokenizer, request.prompt_token_ids, request.sampling_params.stop
        )
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request at once and free its KV blocks; its final output, or None if unknown."""
        request = self.scheduler.abort_request(request_id)
        if request is None:
            return None
        self.runner.release([request_id])
        return make_output(request, self._outputs.pop(request_id))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests

    # -- the step -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduler_output = self.scheduler.schedule()
        sampled = {}
        if scheduler_output.scheduled:
            sampled = self.runner.execute(scheduler_output.step)
        self.scheduler.update_from_output(scheduler_output)
        now = time.monotonic()
        outputs, finished = [], []
        for scheduled in scheduler_output.scheduled:
            request = scheduled.request
            if request.request_id not in sampled:
                continue
            token, logprob = sampled[request.request_id]
            request.output_token_ids.append(token)
            if logprob is not None:
                request.output_logprobs.append(logprob)
            if request.first_token_time is None:
                request.first_token_time = now
            state = self._outputs[request.request_id]
            status, stop_reason = check_stop(request, state, token, self.max_model_len)
            if status is not None:
                self.scheduler.finish_request(request.request_id, status)
                finished.append(request.request_id)
                del self._outputs[request.request_id]
            outputs.append(make_output(request, state, stop_reason))
        self.runner.release(finished)
        return outputs

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv_cache.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.kv_cache.prefix_cache_queries,
            prefix_cache_hits=self.kv_cache.prefix_cache_hits,
            weight_bytes=self.runner.weight_bytes,
            kv_cache_bytes=self.runner.kv_cache_bytes,
            quantization=self.quantization,
        )

    def generate(
        self,
        prompts: list[str] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        prompt_token_ids: list[list[int]] | None = None,
    ) -> list[RequestOutput]:
        """Submit all prompts at once, run until each finishes; final outputs in input order."""
        texts = prompts or []
        count = len(prompt_token_ids) if prompt_token_ids is not None else len(texts)
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params or SamplingParams()] * count
        if prompt_token_ids is not None:
            requests = [
                self.make_request(sampling_params=params, prompt_token_ids=ids)
                for ids, params in zip(prompt_token_ids, sampling_params, strict=True)
            ]
        else:
            requests = [
                self.make_request(prompt=text, sampling_params=params)
                for text, params in zip(texts, sampling_params, strict=True)
            ]
        for request in requests:
            self.enqueue(request)
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished_requests():
            for output in self.step():
                if output.finished:
                    final[output.request_id] = output
        return [final[r.request_id] for r in requests]
