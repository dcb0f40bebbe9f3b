"""Turning logits into tokens: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

import torch

from kvops.worker.request import SamplingParams, TokenLogprob


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
) -> tuple[list[int], list[TokenLogprob | None]]:
    """Pick one token per row of `logits` [N, vocab].

    Each request has its own generator, so a seeded request draws the same tokens whatever else
    is in the batch. Logprobs are those of the model's own distribution (before temperature and
    truncation), as OpenAI reports them.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        probs = _truncated_probs(logits[rows], [params[i] for i in sampled_rows])
        for j, i in enumerate(sampled_rows):
            # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p, and lets each
            # request use its own generator without a multinomial call per row.
            noise = torch.empty_like(probs[j]).exponential_(generator=generators[i])
            tokens[i] = (probs[j] / noise).argmax()
    token_list = tokens.tolist()
    return token_list, _logprobs(logits, token_list, params)


def _truncated_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
    logits = logits / temperatures.unsqueeze(1)
    vocab = logits.shape[1]
    top_ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    top_ps = [p.top_p for p in params]
    if min(top_ks) < vocab or min(top_ps) < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        remove = ranks >= torch.tensor(top_ks, device=logits.device).unsqueeze(1)
        sorted_probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p; the first always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        remove |= mass_before >= torch.tensor(top_ps, device=logits.device).unsqueeze(1)
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    return logits.softmax(dim=-1)


def _logprobs(
    logits: torch.Tensor, tokens: list[int], params: list[SamplingParams]
) -> list[TokenLogprob | None]:
    # Row index -> how many alternatives it wants, for the rows that want logprobs at all.
    counts = {i: p.logprobs for i, p in enumerate(params) if p.logprobs is not None}
    wanted = list(counts)
    results: list[TokenLogprob | None] = [None] * len(params)
    if not wanted:
        return results
    rows = torch.tensor(wanted, device=logits.device)
    logprobs = logits[rows].log_softmax(dim=-1)
    max_top = max(counts.values())
    top_k = logprobs.topk(max_top, dim=-1) if max_top else None
    chosen = logprobs.gather(1, torch.tensor([[tokens[i]] for i in wanted], device=logits.device))
    for j, i in enumerate(wanted):
        n = counts[i]
        top = {}
        if n and top_k is not None:  # n > 0 implies max_top > 0
            top = dict(
                zip(top_k.indices[j, :n].tolist(), top_k.values[j, :n].tolist(), strict=True)
            )
        results[i] = TokenLogprob(tokens[i], chosen[j, 0].item(), top)
    return results
