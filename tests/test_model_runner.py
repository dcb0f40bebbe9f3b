"""The model runner on hand-built steps, against a dense (non-paged) forward of the same weights.

No scheduler and no engine: steps mix decodes and chunked prefills over scattered block tables,
and the cache and the logits must be what transformers computes over each whole sequence.
"""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
import transformers

from kvops.worker import model_runner
from kvops.worker.config import EngineConfig
from kvops.worker.model_runner import ModelRunner
from kvops.worker.request import SamplingParams, token_slice
from kvops.worker.step import Step, StepRow
from kvops.worker.weights import DUMMY_PRESETS, dummy_state_dict

CONFIG = DUMMY_PRESETS["tiny"]
BLOCK_SIZE = 8
NUM_BLOCKS = 16
GREEDY = SamplingParams(temperature=0, logprobs=0)
# Three sequences, their block tables (scattered on purpose) and lengths.
LENGTHS = {"a": 21, "b": 7, "c": 11}
TABLES = {"a": [9, 2, 14], "b": [5], "c": [11, 3]}


@pytest.fixture(scope="module")
def weights():
    return dummy_state_dict(CONFIG, torch.float32)


@pytest.fixture(scope="module")
def tokens():
    gen = torch.Generator().manual_seed(0)
    return {
        name: torch.randint(3, CONFIG.vocab_size, (n,), generator=gen).tolist()
        for name, n in LENGTHS.items()
    }


@pytest.fixture(scope="module")
def dense(weights, tokens):
    """transformers over each whole sequence: logits and per-layer keys and values."""
    hf_config = transformers.AutoConfig.for_model(**CONFIG.to_hf_config())
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    results = {}
    with torch.inference_mode():
        for name, ids in tokens.items():
            out = model.eval()(torch.tensor([ids]), use_cache=True)
            kv = [(layer.keys[0], layer.values[0]) for layer in out.past_key_values.layers]
            results[name] = (out.logits[0], kv)  # [seq, vocab]; [kv_heads, seq, head_dim]
    return results


def row(tokens, name: str, start: int, end: int, sample: bool = True) -> StepRow:
    """Tokens [start, end) of a sequence, over the blocks they need of its table."""
    table = TABLES[name][: -(-end // BLOCK_SIZE)]
    return StepRow.build(name, tokens[name][start:end], start, table, BLOCK_SIZE, sample, GREEDY)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_hand_built_steps_match_a_dense_forward(backend, weights, tokens, dense):
    config = EngineConfig(
        block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS, attention_backend=backend
    )
    weights = dict(weights)  # the runner may drop the dense matrices it packs
    runner = ModelRunner(config, CONFIG, weights, max_model_len=64)

    def expect_logits(step: Step) -> None:
        sampled = [r for r in step.rows if r.sample]
        got = runner.compute_logits(step)
        want = torch.stack([dense[r.request_id][0][r.context_len - 1] for r in sampled])
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    # A prompt chunk that samples nothing next to a whole short prompt.
    expect_logits(Step([row(tokens, "a", 0, 12, sample=False), row(tokens, "b", 0, 5)]))
    # A prefill listed before a decode: the runner runs decodes first, answers in step order.
    expect_logits(Step([row(tokens, "a", 12, 20), row(tokens, "b", 5, 6), row(tokens, "c", 0, 10)]))
    # Decodes only, through execute(): greedy tokens and their logprobs.
    sampled = runner.execute(Step([row(tokens, n, LENGTHS[n] - 1, LENGTHS[n]) for n in "bca"]))
    assert sorted(sampled) == ["a", "b", "c"]
    for name, (token, logprob) in sampled.items():
        logits = dense[name][0][-1]
        assert token == int(logits.argmax())
        assert logprob.token_id == token
        assert logprob.logprob == pytest.approx(float(logits.log_softmax(-1)[token]), abs=1e-4)

    # Every token's key and value sit in the slot its block table names; other blocks are unused.
    for layer, (k_cache, v_cache) in enumerate(runner.kv_caches):
        for name, table in TABLES.items():
            positions = torch.arange(LENGTHS[name])
            blocks = torch.tensor(table)[positions // BLOCK_SIZE]
            keys, values = dense[name][1][layer]
            got_k = k_cache[:, blocks, positions % BLOCK_SIZE]
            torch.testing.assert_close(got_k, keys, atol=1e-5, rtol=1e-5)
            got_v = v_cache[:, blocks, positions % BLOCK_SIZE]
            torch.testing.assert_close(got_v, values, atol=1e-5, rtol=1e-5)
        unused = sorted(set(range(NUM_BLOCKS)) - {b for t in TABLES.values() for b in t})
        assert not k_cache[:, unused].any() and not v_cache[:, unused].any()


def test_a_step_row_holds_copies_and_the_slots_of_its_positions():
    table = [7, 3]
    r = StepRow.build("r", [11, 12, 13], 2, table, 4, True, GREEDY)
    table.append(5)  # the scheduler grows its live list later
    assert r.block_table.tolist() == [7, 3]
    assert r.positions.tolist() == [2, 3, 4]
    assert r.slots.tolist() == [7 * 4 + 2, 7 * 4 + 3, 3 * 4 + 0]
    assert r.context_len == 5


@pytest.mark.parametrize("start, end", [(0, 2), (1, 3), (2, 5), (3, 5), (0, 5)])
def test_token_slice_spans_prompt_and_outputs(start, end):
    prompt, outputs = [1, 2, 3], [4, 5]
    assert token_slice(prompt, outputs, start, end) == (prompt + outputs)[start:end]


def test_the_runner_knows_no_scheduler_and_no_requests():
    imported = {}
    for node in ast.walk(ast.parse(inspect.getsource(model_runner))):
        if isinstance(node, ast.ImportFrom):
            imported.setdefault(node.module, set()).update(a.name for a in node.names)
    assert not {"kvops.worker.scheduler", "kvops.worker.block_manager"} & set(imported)
    assert imported.get("kvops.worker.request", set()) <= {"SamplingParams", "TokenLogprob"}
