"""The stretches a span is active during, and their weights, for ``attribute_requests`` (``[requests] weight``).

A span runs from its queue end (``queue_end_ns``; its start when it reported none) to its end: queue time gets no
energy in either mode.

- ``equal``: one stretch, weight 1. Running requests share the workload's energy equally.
- ``tokens``: with a prefill/decode boundary (``prefill_end_ns``), a prefill stretch [queue end, prefill end]
  weighted by input tokens and a decode stretch [prefill end, end] weighted by output tokens; without one, a single
  stretch [queue end, end] weighted by input + output tokens. A stretch whose count is 0 (the sender reported no
  tokens) weighs 1, as one token: it still gets a share, a small one next to requests that report thousands.

Times are Unix ns; weights are integers (the kernel's exactness rests on them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from collector.aggregator.spans import MAX_TOKENS
from collector.store.base import Int64Array

WeightMode = Literal["equal", "tokens"]


@dataclass(frozen=True)
class Stretches:
    """Parallel arrays, one entry per stretch: the span it belongs to (index into the spans given), its start
    and end (Unix ns) and its weight."""

    span: Int64Array
    start_ns: Int64Array
    end_ns: Int64Array
    weight: Int64Array


def stretches(
    start: Int64Array,
    end: Int64Array,
    queue_end: Int64Array,
    prefill_end: Int64Array,
    input_tokens: Int64Array,
    output_tokens: Int64Array,
    mode: WeightMode,
) -> Stretches:
    """The stretches of n spans given as parallel columns (times Unix ns, tokens as sent)."""
    n = start.size
    index = np.arange(n, dtype=np.int64)
    # a queue end outside the span (ingest refuses those) would only shorten it to nothing
    begin = np.clip(np.where(queue_end > 0, queue_end, start), start, end)
    if mode == "equal":
        return Stretches(index, begin, end, np.ones(n, dtype=np.int64))
    # capped as ingest caps them (OTLP's mapping lets larger counts through): the weights stay exact integers
    input_tokens = np.minimum(input_tokens, MAX_TOKENS)
    output_tokens = np.minimum(output_tokens, MAX_TOKENS)
    split = prefill_end > 0
    boundary = np.clip(prefill_end, begin, end)
    whole = ~split
    return Stretches(
        np.concatenate([index[split], index[split], index[whole]]),
        np.concatenate([begin[split], boundary[split], begin[whole]]),
        np.concatenate([boundary[split], end[split], end[whole]]),
        np.concatenate(
            [
                np.maximum(input_tokens[split], 1),
                np.maximum(output_tokens[split], 1),
                np.maximum(input_tokens[whole] + output_tokens[whole], 1),
            ]
        ),
    )
