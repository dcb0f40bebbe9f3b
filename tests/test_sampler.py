"""The sampler on hand-made logits: greedy, temperature, top-k, top-p, per-request seeds and the
model's own logprobs, each checked against the distribution it must draw from."""

from __future__ import annotations

import math

import pytest
import torch

from kvops.worker.request import SamplingParams
from kvops.worker.sampler import sample

LOGITS = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))


def draws(params: SamplingParams, n: int = 2000, seed: int = 0) -> torch.Tensor:
    """How often each token is drawn in `n` single-row calls sharing one generator."""
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(len(LOGITS))
    for _ in range(n):
        [token], _ = sample(LOGITS.unsqueeze(0), [params], [generator])
        counts[token] += 1
    return counts / n


def test_greedy_takes_the_argmax_of_every_row():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    generators = [torch.Generator(), torch.Generator()]
    tokens, logprobs = sample(logits, [SamplingParams(temperature=0)] * 2, generators)
    assert tokens == [1, 0] and logprobs == [None, None]


def test_temperature_one_draws_from_the_softmax():
    frequencies = draws(SamplingParams(temperature=1.0))
    assert torch.allclose(frequencies, LOGITS.softmax(-1), atol=0.04)


def test_top_k_and_top_p_keep_only_the_head_of_the_distribution():
    assert draws(SamplingParams(temperature=1.0, top_k=2))[2:].sum() == 0
    # top_p 0.6: 0.5 alone is not enough, 0.5 + 0.3 is: tokens 0 and 1 stay, renormalised.
    frequencies = draws(SamplingParams(temperature=1.0, top_p=0.6))
    assert frequencies[2:].sum() == 0
    assert frequencies[0] == pytest.approx(0.5 / 0.8, abs=0.04)


def test_a_seeded_request_draws_the_same_tokens_whatever_shares_its_batch():
    params, others = SamplingParams(temperature=1.0, seed=7), SamplingParams(temperature=1.0)
    alone_generator = torch.Generator().manual_seed(7)
    batch_generators = [torch.Generator().manual_seed(s) for s in (1, 7, 2)]
    alone, in_batch = [], []
    for _ in range(30):
        alone += sample(LOGITS.unsqueeze(0), [params], [alone_generator])[0]
        tokens, _ = sample(LOGITS.repeat(3, 1), [others, params, others], batch_generators)
        in_batch.append(tokens[1])
    assert in_batch == alone and len(set(alone)) > 1


def test_logprobs_are_the_models_own_with_the_top_alternatives():
    params = SamplingParams(temperature=0.5, top_k=1, logprobs=2)
    [token], [logprob] = sample(LOGITS.unsqueeze(0), [params], [torch.Generator()])
    assert token == 0  # top_k 1 leaves only the argmax
    # Before temperature and truncation, as OpenAI reports them.
    assert logprob.logprob == pytest.approx(math.log(0.5), abs=1e-5)
    assert list(logprob.top) == [0, 1]
    assert logprob.top[1] == pytest.approx(math.log(0.3), abs=1e-5)
