"""One engine step as the model runner takes it: plain rows, one per scheduled request.

The scheduler builds a Step for each step it schedules; the runner reads nothing else. No live
Request objects and no live block tables go in (a row holds copies), so the runner can be driven
by hand in tests, and a step is a fixed record that later stages (CUDA graphs) can lay out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from kvops.worker.request import SamplingParams


@dataclass(eq=False)
class StepRow:
    """One request's tokens in a step, and where their keys and values go."""

    request_id: str
    token_ids: list[int]
    positions: np.ndarray  # int64, consecutive: the first is the number of tokens already cached
    block_table: np.ndarray  # int64, a copy of the request's block ids
    slots: np.ndarray  # int64, the cache slot of each token: block * block_size + offset
    # Whether the model samples a token after this row: its last token is the request's last
    # known one (a decode, or the last chunk of a prompt). Earlier prefill chunks sample nothing.
    sample: bool
    sampling_params: SamplingParams

    @classmethod
    def build(
        cls,
        request_id: str,
        token_ids: list[int],
        start: int,
        block_table: Sequence[int],
        block_size: int,
        sample: bool,
        sampling_params: SamplingParams,
    ) -> StepRow:
        """The row feeding `token_ids` at positions start, start + 1, ..."""
        positions = np.arange(start, start + len(token_ids), dtype=np.int64)
        table = np.array(block_table, dtype=np.int64)  # a copy, never a view of the caller's
        slots = table[positions // block_size] * block_size + positions % block_size
        return cls(request_id, token_ids, positions, table, slots, sample, sampling_params)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens in the cache once this row ran: the ones before it and its own."""
        return int(self.positions[-1]) + 1


@dataclass(eq=False)
class Step:
    rows: list[StepRow] = field(default_factory=list)
