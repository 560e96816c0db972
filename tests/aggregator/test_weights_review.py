"""Review of token weights (``request_weights.stretches``) and of the kernel (``request_energy.attribute_requests``)
at their edges, against hand computation and the exact rational reference of ``test_request_energy``."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from collector.aggregator.request_energy import RequestEnergy, attribute_requests
from collector.aggregator.request_weights import Stretches, WeightMode, stretches
from collector.aggregator.spans import MAX_TOKENS
from tests.aggregator.test_request_energy import UNIX, assert_conserved, attribute, reference, simulate

S = 1_000_000_000


def weights_of(
    spans: list[tuple[int, int, int, int, int, int]], mode: WeightMode = "tokens"
) -> list[tuple[int, int, int, int]]:
    """spans: (start, end, queue end or 0, prefill end or 0, input, output) -> sorted (span, start, end, weight)."""
    start, end, queue, prefill, tokens_in, tokens_out = (np.array(c, dtype=np.int64) for c in zip(*spans, strict=True))
    got: Stretches = stretches(start, end, queue, prefill, tokens_in, tokens_out, mode)
    rows = zip(got.span.tolist(), got.start_ns.tolist(), got.end_ns.tolist(), got.weight.tolist(), strict=True)
    return sorted(rows)


def assert_exact(result: RequestEnergy, expected: list[Fraction], unattributed: Fraction, rel: float = 1e-9) -> None:
    floor = 1e-12 * float(result.window_j)
    for got, want in zip(result.energy_j.tolist(), expected, strict=True):
        assert abs(got - float(want)) <= max(rel * float(want), floor), (got, float(want))
    assert abs(result.unattributed_j - float(unattributed)) <= max(rel * float(unattributed), floor)
    assert_conserved(result)


# -- request_weights: the stretches and their weights, by hand --------------------------------------------------


def test_boundary_at_start_gives_an_empty_prefill_and_decode_over_the_whole_span() -> None:
    assert weights_of([(10, 50, 0, 10, 300, 7)]) == [(0, 10, 10, 300), (0, 10, 50, 7)]


def test_boundary_at_end_gives_prefill_over_the_whole_span_and_an_empty_decode() -> None:
    assert weights_of([(10, 50, 20, 50, 300, 7)]) == [(0, 20, 50, 300), (0, 50, 50, 7)]


def test_queue_end_equal_to_prefill_end_leaves_no_prefill_time() -> None:
    assert weights_of([(10, 50, 30, 30, 300, 7)]) == [(0, 30, 30, 300), (0, 30, 50, 7)]


def test_queue_end_without_a_boundary_is_one_stretch_of_input_plus_output() -> None:
    assert weights_of([(10, 50, 30, 0, 300, 7)]) == [(0, 30, 50, 307)]
    assert weights_of([(10, 50, 30, 0, 300, 7)], "equal") == [(0, 30, 50, 1)]


def test_zero_tokens_weigh_one_on_each_side() -> None:
    assert weights_of([(10, 50, 0, 20, 0, 0)]) == [(0, 10, 20, 1), (0, 20, 50, 1)]
    assert weights_of([(10, 50, 0, 0, 0, 0)]) == [(0, 10, 50, 1)]
    # one side missing: the other side's count alone (no extra 1 for the missing one)
    assert weights_of([(10, 50, 0, 0, 0, 40)]) == [(0, 10, 50, 40)]


def test_huge_counts_are_capped_and_stay_exact_integers() -> None:
    got = weights_of([(10, 50, 0, 20, 2**40, 2**31), (10, 50, 0, 0, 2**31, 2**31)])
    assert got == [(0, 10, 20, MAX_TOKENS), (0, 20, 50, MAX_TOKENS), (1, 10, 50, 2 * MAX_TOKENS)]


def test_queue_end_and_boundary_outside_the_span_are_clipped() -> None:
    # ingest refuses these; the weights must still not produce a stretch outside the span or a reversed one
    assert weights_of([(10, 50, 60, 0, 3, 4)]) == [(0, 50, 50, 7)]
    assert weights_of([(10, 50, 30, 20, 3, 4)]) == [(0, 30, 30, 3), (0, 30, 50, 4)]
    assert weights_of([(10, 50, 0, 70, 3, 4)]) == [(0, 10, 50, 3), (0, 50, 50, 4)]


# -- the kernel against the exact reference -----------------------------------------------------------------------


def test_tokens_mode_edges_through_the_kernel_match_the_exact_reference() -> None:
    # every edge above at once, on a realistic epoch, 10 Hz samples over 5 s with an uneven power
    t0 = UNIX
    spans = [
        (t0 + S // 3, t0 + 4 * S, 0, t0 + S // 3, 1000, 20),  # boundary at start
        (t0 + S // 2, t0 + 3 * S, t0 + S, t0 + 3 * S, 700, 0),  # boundary at end, zero output
        (t0 + S, t0 + 2 * S, t0 + 3 * S // 2, t0 + 3 * S // 2, 50, 60),  # queue end == prefill end
        (t0 + 2 * S, t0 + 5 * S, t0 + 5 * S // 2, 0, 11, 13),  # queue end, no boundary
        (t0 + 2 * S, t0 + 4 * S, 0, 0, 0, 0),  # no tokens at all
        (t0 + 3 * S, t0 + 3 * S, 0, 0, 5, 5),  # zero length
        (t0 + 4 * S, t0 + 6 * S, 0, t0 + 5 * S, 3, 4),  # past the window
    ]
    rows = weights_of(spans)
    sample_ns = [t0 + k * S // 10 for k in range(51)]
    rng = np.random.default_rng(7)
    energy = [1e6 + float(v) for v in np.concatenate([[0.0], np.cumsum(np.round(rng.uniform(5, 40, 50), 3))])]
    expected, unattributed = reference(sample_ns, energy, rows, len(spans), None)
    result = attribute(sample_ns, energy, rows, len(spans))
    assert_exact(result, expected, unattributed)
    assert result.covered.tolist() == [True] * 6 + [False]


@pytest.mark.parametrize("offset", [0, UNIX])
def test_weights_of_2_pow_32_beside_weight_1_stay_exact(offset: int) -> None:
    # A long light period (weight 1 alone, F grows to ~1e7 J) then heavy and tiny weights together and apart.
    n = 2000
    sample_ns = [offset + k * (S // 10) for k in range(n + 1)]
    energy = [float(5_000 * k) for k in range(n + 1)]
    light, mid = sample_ns[n - 20], sample_ns[n - 10]
    rows = [
        (0, sample_ns[0], light, 1),
        (1, light, sample_ns[-1], 2 * MAX_TOKENS),
        (2, light + 12_345, mid, 1),
        (3, mid, sample_ns[-1] - 7, MAX_TOKENS - 1),
        (4, mid + 1, mid + 2, 1),  # 1 ns
    ]
    expected, _ = reference(sample_ns[-25:], energy[-25:], rows[1:], 5, None)
    result = attribute(sample_ns, energy, rows, 5)
    assert result.energy_j[0] == pytest.approx((n - 20) * 5_000.0, rel=1e-12)
    for i in range(1, 5):
        assert abs(result.energy_j[i] - float(expected[i])) <= 1e-9 * float(expected[i]), i
    assert_conserved(result)


def test_thousands_of_spans_sharing_one_boundary() -> None:
    # 3000 spans [1, 2] s and 2000 spans [2, 3] s (touching at 2 s, inside a counter interval), 1000 zero-length
    # ones at 2 s; 100 W; samples at 0, 1.5, 4 s.
    t = [UNIX, UNIX + 3 * S // 2, UNIX + 4 * S]
    a, b, c = 3000, 2000, 1000
    req = np.arange(a + b + c)
    start = np.concatenate([np.full(a, UNIX + S), np.full(b + c, UNIX + 2 * S)])
    end = np.concatenate([np.full(a, UNIX + 2 * S), np.full(b, UNIX + 3 * S), np.full(c, UNIX + 2 * S)])
    result = attribute_requests(np.array(t), np.array([7.0, 157.0, 407.0]), request=req, start_ns=start, end_ns=end)
    assert np.allclose(result.energy_j[:a], 100.0 / a, rtol=1e-12)
    assert np.allclose(result.energy_j[a : a + b], 100.0 / b, rtol=1e-12)
    assert np.all(result.energy_j[a + b :] == 0.0)
    assert result.unattributed_j == pytest.approx(200.0, rel=1e-12)
    assert_conserved(result)


def test_only_zero_weights_active_leaves_the_energy_unattributed_and_conserved() -> None:
    # [0, 1]: only weight 0 active -> unattributed; [1, 2]: weight 0 beside weight 3 -> all to the weight 3
    result = attribute([0, 2 * S], [0.0, 200.0], [(0, 0, 2 * S, 0), (1, S, 2 * S, 3)], 2)
    assert result.energy_j.tolist() == [0.0, pytest.approx(100.0, rel=1e-12)]
    assert result.unattributed_j == pytest.approx(100.0, rel=1e-12)
    assert_conserved(result)


def test_power_shaping_keeps_each_counter_interval_exactly() -> None:
    # one request per counter interval, exactly over it; power samples four times as often, very uneven
    rng = np.random.default_rng(3)
    sample_ns = [UNIX + k * S for k in range(21)]
    energy = list(np.concatenate([[123456.0], 123456.0 + np.cumsum(rng.uniform(0, 500, 20))]))
    power_ns = [UNIX - S // 3 + k * S // 4 for k in range(90)]
    power_w = list(rng.choice([0.0, 1e-3, 70.0, 700.0], 90))
    rows = [(k, sample_ns[k], sample_ns[k + 1], 1 + k) for k in range(20)]
    # and touching stretches at off-sample times: split the energy by the shape, conserving the counter
    rows += [(20 + k, sample_ns[k] + S // 8, sample_ns[k] + 5 * S // 8, 1) for k in range(20)]
    rows += [(40 + k, sample_ns[k] + 5 * S // 8, sample_ns[k + 1], 1) for k in range(20)]
    result = attribute(sample_ns, energy, rows, 60, (power_ns, power_w))
    expected, unattributed = reference(sample_ns, energy, rows, 60, (power_ns, power_w))
    assert_exact(result, expected, unattributed)
    per_interval = result.energy_j[:20] + result.energy_j[20:40] + result.energy_j[40:]
    assert np.allclose(per_interval, np.diff(energy), rtol=1e-12, atol=0)


# -- ground truth: short requests within their bound --------------------------------------------------------------


@pytest.mark.parametrize("with_power", [False, True])
@pytest.mark.parametrize("quantum_j", [1e-3, 2.0**-16])
@pytest.mark.parametrize("seed", [4, 5])
def test_short_requests_stay_within_their_bound(seed: int, quantum_j: float, with_power: bool) -> None:
    sim = simulate(seed, quantum_j, mean_concurrency=8.0, with_power=with_power)
    short = sim.duration_s < 0.1  # shorter than one sample interval
    assert np.count_nonzero(short) > 3
    error = np.abs(sim.result.energy_j - sim.truth_j)
    assert np.all(error <= sim.bound_j + 1e-9), float(np.max(error - sim.bound_j))
    long = sim.duration_s >= 1.0
    if with_power:
        assert np.all(error[long] <= 0.01 * sim.truth_j[long])
    assert_conserved(sim.result)


def test_many_sequential_spans_of_the_largest_counts_are_not_refused() -> None:
    # Ingest lets 2**31 + 2**31 tokens through (weight 2**32). Only the weight of the spans active at once must stay
    # under 2**53 for W to be exact; 2**21 spans one after another, never two at a time, are a valid input.
    n = 2**21
    start = UNIX + np.arange(n, dtype=np.int64) * 1000
    tokens = np.full(n, MAX_TOKENS, dtype=np.int64)
    got = stretches(start, start + 1000, np.zeros(n, np.int64), np.zeros(n, np.int64), tokens, tokens, "tokens")
    result = attribute_requests(
        np.array([UNIX, UNIX + n * 1000]),
        np.array([0.0, float(n)]),
        request=got.span,
        start_ns=got.start_ns,
        end_ns=got.end_ns,
        weight=got.weight,
        n_requests=n,
    )
    assert np.allclose(result.energy_j, 1.0, rtol=1e-9)
    assert_conserved(result)


def test_weights_active_together_beyond_2_pow_53_are_refused() -> None:
    # 2**21 + 1 weights of 2**32 active at once: W would no longer be an exact float
    n = 2**21 + 1
    with pytest.raises(ValueError, match="active at once add up to more than 9007199254740992"):
        attribute_requests(
            np.array([0, S]),
            np.array([0.0, 1.0]),
            request=np.arange(n),
            start_ns=np.zeros(n, np.int64),
            end_ns=np.full(n, S, np.int64),
            weight=np.full(n, 2 * MAX_TOKENS, np.int64),
        )
