"""Review of a request's energy views and parts: hand-computed scenarios through ``request_split`` (pure) and the
engine (real stores), and the defects the review found."""

from __future__ import annotations

import numpy as np
import pytest

from collector.aggregator.config import RequestsConfig
from collector.aggregator.request_engine import RequestEngine
from collector.aggregator.request_split import Device, Series, SpanEnergy, split, summed
from collector.aggregator.request_weights import WeightMode, stretches
from collector.store.base import (
    DeviceChunk,
    HostInfo,
    RequestResult,
    RollupIncrement,
    SpanRow,
    Store,
    StoredBatch,
    WorkloadChunk,
)
from tests.fakes.request_world import IDLE, T0, WORKLOAD, HostWriter, S, _rollups

SYSTEM = ("system", "", "")
TENTH = S // 10
TIMES = T0 + np.arange(0, 201, dtype=np.int64) * TENTH  # 20 s at 10 Hz


def ramp(watts: float, t: np.ndarray = TIMES) -> Series:
    return Series(t.copy(), watts * (t - T0) / S)


def device(kind: str = "gpu", idle_w: float = 0.0, t: np.ndarray = TIMES, power: np.ndarray | None = None) -> Device:
    p = np.full(t.size, 100.0) if power is None else power
    return Device(kind, t.copy(), t.copy(), p, ramp(idle_w, t))


def run_split(
    spans: list[tuple[float, float, str, float, float, int, int]],
    series: dict[tuple[str, str], Series],
    devices: dict[str, Device],
    mode: WeightMode = "equal",
) -> SpanEnergy:
    """spans: (start s, end s, workload, queue end s or 0, prefill end s or 0, input tokens, output tokens)."""

    def ns(values: list[float]) -> np.ndarray:
        return np.array([T0 + round(v * S) if v else 0 for v in values], dtype=np.int64)

    start, end, workload, queue, prefill, tokens_in, tokens_out = (list(c) for c in zip(*spans, strict=True))
    s, e = ns(start), ns(end)
    weights = stretches(
        s, e, ns(queue), ns(prefill), np.array(tokens_in, np.int64), np.array(tokens_out, np.int64), mode
    )
    return split(s, e, workload, weights, series, devices)


# -- pure scenarios (request_split + request_weights)


def test_idle_of_a_device_two_workloads_share_goes_to_all_their_requests() -> None:
    # gpu0: A 30 W, B 30 W, idle 40 W. a on A [2, 4] s, b on B [3, 4] s.
    got = run_split(
        [(2, 4, "A", 0, 0, 0, 0), (3, 4, "B", 0, 0, 0, 0)],
        {("A", "gpu0"): ramp(30), ("B", "gpu0"): ramp(30)},
        {"gpu0": device(idle_w=40)},
    )
    assert got.by_kind["gpu"].tolist() == pytest.approx([60, 30], rel=1e-12)
    assert got.idle_j.tolist() == pytest.approx([40 + 20, 20], rel=1e-12)


def test_token_weights_queue_prefill_decode_and_no_boundary() -> None:
    # a: queue [2, 3], prefill [3, 4] with 300 in, decode [4, 8] with 100 out; b: [2, 8], no boundary, 50 + 50
    got = run_split(
        [(2, 8, "A", 3, 4, 300, 100), (2, 8, "A", 0, 0, 50, 50)],
        {("A", "gpu0"): ramp(100)},
        {"gpu0": device(idle_w=40)},
        "tokens",
    )
    assert got.by_kind["gpu"].tolist() == pytest.approx([75 + 200, 100 + 25 + 200], rel=1e-12)
    assert got.idle_j.tolist() == pytest.approx([30 + 80, 40 + 10 + 80], rel=1e-12)


def test_zero_output_tokens_weigh_one_during_decode() -> None:
    # both prefill [2, 4] with 300 in; decode [4, 8]: 0 output tokens (weighs 1) against 99
    got = run_split(
        [(2, 8, "A", 0, 4, 300, 0), (2, 8, "A", 0, 4, 300, 99)],
        {("A", "gpu0"): ramp(100)},
        {"gpu0": device()},
        "tokens",
    )
    assert got.by_kind["gpu"].tolist() == pytest.approx([100 + 4, 100 + 396], rel=1e-12)


def test_power_shapes_the_energy_between_rare_counter_updates() -> None:
    # the counter updates at 0 and 10 s only; power ramps 0 -> 200 W over [0, 10] s: [0, 5] holds 250 J, [5, 10] 750
    t = TIMES[TIMES <= T0 + 12 * S]
    counter = Series(np.array([T0, T0 + 10 * S]), np.array([5.0, 1005.0]))
    power = np.minimum(200.0 * (t - T0) / (10 * S), 200.0)
    got = run_split(
        [(0, 5, "A", 0, 0, 0, 0), (5, 10, "A", 0, 0, 0, 0)],
        {("A", "gpu0"): counter},
        {"gpu0": device(t=t, power=power)},
    )
    assert got.by_kind["gpu"].tolist() == pytest.approx([250, 750], rel=1e-9)


def test_a_workload_without_cpu_or_dram_series_has_no_such_parts() -> None:
    got = run_split(
        [(2, 4, "A", 0, 0, 0, 0), (2, 4, "B", 0, 0, 0, 0)],
        {("A", "gpu0"): ramp(50), ("A", "cpu0"): ramp(20), ("B", "gpu0"): ramp(50)},
        {"gpu0": device(idle_w=10), "cpu0": device("cpu", idle_w=0)},
    )
    assert got.by_kind["gpu"].tolist() == pytest.approx([100, 100], rel=1e-12)
    assert got.by_kind["cpu"].tolist() == pytest.approx([40, 0], abs=1e-12)
    assert got.by_kind["dram"].tolist() == [0.0, 0.0]
    assert got.idle_j.tolist() == pytest.approx([10, 10], rel=1e-12)


# -- defects


def test_a_device_sample_stored_twice_does_not_stop_the_split() -> None:
    # The store may hand a sample twice (the workload and idle series are cleaned for that: ``_clean``); the
    # device's power series was passed to the kernel as it came, which raised "power_ns: times must be strictly
    # increasing", failing the host's whole window (its requests stayed pending, never even approximate).
    twice = np.concatenate([TIMES[:50], TIMES[49:]])
    got = run_split(
        [(2, 4, "A", 0, 0, 0, 0)], {("A", "gpu0"): ramp(60)}, {"gpu0": device(idle_w=40, t=twice, power=None)}
    )
    assert got.by_kind["gpu"].tolist() == pytest.approx([120], rel=1e-12)
    assert got.idle_j.tolist() == pytest.approx([80], rel=1e-12)
    assert got.ready.tolist() == [True]


def test_device_power_out_of_order_still_shapes() -> None:
    # two agent instances of one host reading one device interleave its samples: times go back
    t = TIMES[TIMES <= T0 + 12 * S]
    order = np.concatenate([np.arange(0, t.size, 2), np.arange(1, t.size, 2)])
    power = np.minimum(200.0 * (t - T0) / (10 * S), 200.0)
    dev = Device("gpu", t[order], t[order], power[order], ramp(0.0, t))
    counter = Series(np.array([T0, T0 + 10 * S]), np.array([5.0, 1005.0]))
    got = run_split([(0, 5, "A", 0, 0, 0, 0), (5, 10, "A", 0, 0, 0, 0)], {("A", "gpu0"): counter}, {"gpu0": dev})
    assert got.by_kind["gpu"].tolist() == pytest.approx([250, 750], rel=1e-9)


def test_summed_counters_are_exact_at_unix_times() -> None:
    # Two identities of one workload on one device: the sum at B's sample time is A interpolated there. At Unix ns
    # (~1.8e18, 256 ns apart in float64) the interpolation was done on float64 times: 1 ns past A's midpoint came
    # out as the midpoint (1e-7 J off at 100 W, up to 128 ns of power: 1.3e-5 J of a 1 ms request at 100 W).
    a = Series(np.array([T0, T0 + S]), np.array([0.0, 100.0]))
    b = Series(np.array([T0 + S // 2 + 1, T0 + S + 7]), np.array([5.0, 5.0]))
    total = summed([a, b])
    assert (total.time_ns - T0).tolist() == [0, S // 2 + 1, S, S + 7]
    assert total.energy_j[1] == pytest.approx(5.0 + 100.0 * (S // 2 + 1) / S, rel=1e-15, abs=0)


# -- through the engine, on both stores


class Clock:
    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns


def result(store: Store, request_id: str) -> RequestResult:
    found = store.request(request_id)
    assert found is not None, request_id
    return found


def run_engine(store: Store, **config: object) -> None:
    RequestEngine(store, RequestsConfig.model_validate(config), clock_ns=Clock(T0 + 60 * S)).run_pass()


def constant(
    store: Store, hostname: str, device_id: str, kind: str, watts: float, shares: dict[tuple[str, str, str], float]
) -> None:
    writer = HostWriter(store, hostname, instance=f"{hostname}-{device_id}")
    for second in range(20):
        t = T0 + second * S + np.arange(10, dtype=np.int64) * TENTH
        if second == 19:
            t = np.append(t, T0 + 20 * S)
        joules = watts * (t - T0) / S
        writer.write(
            device_id, kind, t, 1000.0 + joules, np.full(t.size, watts), {k: f * joules for k, f in shares.items()}
        )


def test_views_and_parts_of_a_request_on_two_hosts(store: Store) -> None:
    constant(store, "host-a", "gpu0", "gpu", 100.0, {WORKLOAD: 0.6, IDLE: 0.4})
    constant(store, "host-a", "cpu0", "cpu", 40.0, {WORKLOAD: 0.5, SYSTEM: 0.5})
    constant(store, "host-a", "dram0", "dram", 10.0, {WORKLOAD: 0.2, SYSTEM: 0.8})
    constant(store, "host-b", "gpu0", "gpu", 300.0, {WORKLOAD: 0.5, IDLE: 0.5})
    store.write_spans(
        [
            SpanRow("r", "p", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm", input_tokens=10),
            SpanRow("r", "d", "host-b", T0 + 5 * S, T0 + 7 * S, workload="vllm", output_tokens=20),
            SpanRow("o", "s", "host-a", T0 + 3 * S, T0 + 4 * S, workload="vllm"),
        ]
    )
    run_engine(store, pue=1.5)
    r = result(store, "r")
    assert r.status == "final"
    # host-a: gpu 60 W -> 60 + 30, cpu 20 W -> 20 + 10, dram 2 W -> 2 + 1, gpu idle 40 W -> 40 + 20;
    # host-b: gpu 150 W x 2 s, idle 150 W x 2 s
    assert (r.gpu_j, r.cpu_j, r.dram_j) == pytest.approx((90 + 300, 30, 3), rel=1e-9)
    assert r.active_j == pytest.approx(423, rel=1e-9)
    assert r.full_j == pytest.approx((423 + 60 + 300) * 1.5, rel=1e-9)
    assert r.joules_per_output_token == pytest.approx(423 / 20, rel=1e-9)
    o = result(store, "o")
    assert (o.active_j, o.full_j) == pytest.approx((30 + 10 + 1, (41 + 20) * 1.5), rel=1e-9)


def test_power_shaping_through_the_engine(store: Store) -> None:
    # the workload's counter is sent at 0, 10 and 20 s only; the device's power ramps 0 -> 200 W over [0, 10] s
    t = TIMES
    power = np.minimum(200.0 * (t - T0) / (10 * S), 200.0)
    device_j = np.where(t <= T0 + 10 * S, 10.0 * ((t - T0) / S) ** 2, 1000.0 + 200.0 * (t - T0 - 10 * S) / S)
    w_t, w_j = np.array([T0, T0 + 10 * S, T0 + 20 * S]), np.array([0.0, 1000.0, 3000.0])
    store.write_batch(
        StoredBatch(
            "i",
            1,
            1,
            HostInfo("host-a"),
            int(t[-1]),
            devices=[DeviceChunk("gpu0", "gpu", "simulated", True, t, device_j, power)],
            workloads=[WorkloadChunk(*WORKLOAD, "gpu0", w_t, w_j)],
            rollups=[
                RollupIncrement(*r)
                for r in [*_rollups("gpu0", t, device_j, ("", "", "")), *_rollups("gpu0", w_t, w_j, WORKLOAD)]
            ],
        )
    )
    store.write_spans(
        [
            SpanRow("a", "s", "host-a", T0 + 1 * S, T0 + 5 * S, workload="vllm"),
            SpanRow("b", "s", "host-a", T0 + 5 * S, T0 + 9 * S, workload="vllm"),
        ]
    )
    run_engine(store)
    assert result(store, "a").active_j == pytest.approx(10 * (25 - 1), rel=1e-9)
    assert result(store, "b").active_j == pytest.approx(10 * (81 - 25), rel=1e-9)


def test_a_device_sample_stored_twice_leaves_no_request_pending_for_ever(store: Store) -> None:
    # Each batch here repeats the previous batch's last sample (same time, same values), a sample stored twice as
    # ``_clean`` allows for: the store hands both. The host's window raised in the kernel at every pass (the device's
    # power was not cleaned) and its requests stayed pending past any grace, never even approximate.
    writer = HostWriter(store, "host-a")
    for second in range(20):
        t = T0 + second * S + np.arange(11, dtype=np.int64) * TENTH  # [s, s + 1] both ends
        joules = 100.0 * (t - T0) / S
        writer.write(
            "gpu0", "gpu", t, 1000.0 + joules, np.full(t.size, 100.0), {WORKLOAD: 0.6 * joules, IDLE: 0.4 * joules}
        )
    store.write_spans([SpanRow("r", "s", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm")])
    run_engine(store)
    r = result(store, "r")
    assert r.status == "final"
    assert (r.active_j, r.full_j) == pytest.approx((120, 200), rel=1e-9)
