"""The request engine against real stores (SQLite and PostgreSQL): simulated hosts with a known truth, spans in every
order, statuses, revisions, the views and the metrics."""

from __future__ import annotations

import subprocess
from typing import Any

import numpy as np
import psycopg
import pytest

from collector.aggregator.config import RequestsConfig
from collector.aggregator.request_engine import STORE_CHECK_S, RequestEngine
from collector.aggregator.request_metrics import RequestMetrics
from collector.exporters.exposition import TextRenderer
from collector.store import open_store
from collector.store.base import ProcessBindingRow, RequestResult, SpanRow, Store
from tests.fakes.request_world import IDLE, T0, WORKLOAD, HostWriter, S, simulate, spans_of, write_simulation


class Clock:
    def __init__(self, now_ns: int) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns


def write_elsewhere(store_url: str, spans: list[SpanRow]) -> None:
    """``spans`` stored by another aggregator sharing the database (another open store)."""
    other = open_store(store_url)
    try:
        other.write_spans(spans)
    finally:
        other.close()


def engine_for(store: Store, clock: Clock, **config: object) -> RequestEngine:
    return RequestEngine(store, RequestsConfig.model_validate(config), clock_ns=clock)


def result(store: Store, request_id: str) -> RequestResult:
    found = store.request(request_id)
    assert found is not None, request_id
    return found


def result_after_the_grace(store: Store, now_ns: int, end_ns: int) -> RequestResult:
    """Request "r" run by an engine (a grace of 30 s) at ``now_ns`` and at the grace's last nanosecond after
    ``end_ns``: pending at both; then the result of a pass one nanosecond later."""
    clock = Clock(now_ns)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    assert result(store, "r").status == "pending"
    clock.now_ns = end_ns + 30 * S - 1
    engine.run_pass()
    assert result(store, "r").status == "pending"
    clock.now_ns += 1
    engine.run_pass()
    return result(store, "r")


def constant_host(
    store: Store,
    hostname: str = "host-a",
    watts: float = 100.0,
    seconds: int = 20,
    workloads: dict[tuple[str, str, str], float] | None = None,
    device_id: str = "gpu0",
    kind: str = "gpu",
    start_ns: int = T0,
) -> HostWriter:
    """``device_id`` at ``watts`` from ``start_ns`` for ``seconds`` at 10 Hz, split among ``workloads`` by
    fraction."""
    writer = HostWriter(store, hostname, instance=f"{hostname}-{device_id}")  # one agent instance per device here
    shares = workloads if workloads is not None else {WORKLOAD: 1.0}
    for second in range(seconds):
        t = start_ns + second * S + np.arange(10, dtype=np.int64) * (S // 10)
        if second == seconds - 1:
            t = np.append(t, start_ns + seconds * S)
        joules = watts * (t - start_ns) / S
        writer.write(
            device_id,
            kind,
            t,
            1000.0 + joules,
            np.full(t.size, watts),
            {identity: share * joules for identity, share in shares.items()},
        )
    return writer


# -- ground truth


@pytest.mark.parametrize("seed", [0, 1])
def test_ground_truth_within_one_percent_for_requests_of_a_second(store: Store, seed: int) -> None:
    sim = simulate(seed)
    write_simulation(HostWriter(store, "host-a"), sim)
    spans = spans_of(sim)
    store.write_spans(spans)
    clock = Clock(T0 + 61 * S)
    engine = engine_for(store, clock)
    engine.run_pass()
    got = np.array([result(store, s.request_id).active_j for s in spans], dtype=np.float64)
    assert all(result(store, s.request_id).status == "final" for s in spans)
    duration_s = (sim.end_ns - sim.start_ns) / S
    error = np.abs(got - sim.truth_j)
    long = duration_s >= 1.0
    assert np.count_nonzero(long) >= 10
    assert np.all(error[long] <= 0.01 * sim.truth_j[long]), (error / sim.truth_j)[long].max()
    # shorter ones: within one sample interval's power range over their time (reported, as the issue asks)
    assert np.all(error <= sim.bound_j + 1e-9)
    worst = float(np.max((error / sim.truth_j)[~long])) if np.any(~long) else 0.0
    longest = float((error / sim.truth_j)[long].max())
    print(f"seed {seed}: worst relative error, requests < 1 s: {worst:.4f}; >= 1 s: {longest:.5f}")


def test_equal_weights_split_overlap_evenly(store: Store) -> None:
    constant_host(store)  # 100 W
    store.write_spans(
        [
            SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm", model="m"),
            SpanRow("b", "s", "host-a", T0 + 4 * S, T0 + 8 * S, workload="vllm", model="m"),
        ]
    )
    engine_for(store, Clock(T0 + 30 * S)).run_pass()
    a, b = result(store, "a"), result(store, "b")
    assert (a.status, b.status) == ("final", "final")
    assert a.active_j == pytest.approx(200 + 100, rel=1e-9)
    assert b.active_j == pytest.approx(100 + 200, rel=1e-9)
    assert (a.gpu_j, a.cpu_j, a.dram_j) == (a.active_j, 0.0, 0.0)
    assert a.full_j == pytest.approx(a.active_j, rel=1e-12)  # no idle energy, PUE 1


def test_token_weights_prefill_by_input_decode_by_output_queue_gets_nothing(store: Store) -> None:
    constant_host(store)  # 100 W
    # a: queue [2, 3] s, prefill [3, 4] s with 300 input tokens, decode [4, 8] s with 100 output tokens
    # b: no boundary [2, 8] s with 50 + 50 tokens (one stretch of weight 100)
    store.write_spans(
        [
            SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 8 * S, workload="vllm", input_tokens=300,
                    output_tokens=100, queue_end_ns=T0 + 3 * S, prefill_end_ns=T0 + 4 * S),
            SpanRow("b", "s", "host-a", T0 + 2 * S, T0 + 8 * S, workload="vllm", input_tokens=50, output_tokens=50),
        ]
    )  # fmt: skip
    engine_for(store, Clock(T0 + 30 * S), weight="tokens").run_pass()
    # [2, 3]: b alone 100 J; [3, 4]: 300 : 100 -> 75 / 25; [4, 8]: 100 : 100 -> 200 / 200
    assert result(store, "a").active_j == pytest.approx(75 + 200, rel=1e-9)
    assert result(store, "b").active_j == pytest.approx(100 + 25 + 200, rel=1e-9)
    assert (result(store, "a").input_tokens, result(store, "a").output_tokens) == (300, 100)
    assert result(store, "a").joules_per_output_token == pytest.approx(2.75, rel=1e-9)


def test_a_request_on_two_hosts_sums_its_spans(store: Store) -> None:
    constant_host(store, "host-a", watts=100.0)
    constant_host(store, "host-b", watts=300.0)
    store.write_spans(
        [
            SpanRow("r", "prefill", "host-a", T0 + 2 * S, T0 + 3 * S, workload="vllm", input_tokens=10),
            SpanRow("r", "decode", "host-b", T0 + 3 * S, T0 + 7 * S, workload="vllm", output_tokens=20),
            SpanRow("other", "s", "host-b", T0 + 5 * S, T0 + 7 * S, workload="vllm"),
        ]
    )
    engine_for(store, Clock(T0 + 30 * S)).run_pass()
    r = result(store, "r")
    assert r.status == "final"
    assert r.hosts == ("host-a", "host-b")
    assert r.active_j == pytest.approx(100 + 300 * 2 + 150 * 2, rel=1e-9)
    assert (r.spans, r.input_tokens, r.output_tokens) == (2, 10, 20)


def test_spans_before_their_samples_wait_then_final(store: Store) -> None:
    sim = simulate(3, seconds=30)
    spans = spans_of(sim)
    store.write_spans(spans)
    clock = Clock(T0 + 10 * S)
    engine = engine_for(store, clock)
    writer = HostWriter(store, "host-a")
    write_simulation(writer, sim, upto_ns=T0 + 10 * S)
    engine.run_pass()
    # samples up to 10 s: requests that ended by then are final, the others wait
    ended_late = [s.request_id for s in spans if s.end_ns > T0 + 10 * S]
    early = [s.request_id for s in spans if s.end_ns <= T0 + 10 * S - S // 5]
    assert ended_late and early
    assert all(result(store, rid).status == "pending" for rid in ended_late)
    assert all(result(store, rid).status == "final" for rid in early)
    # the rest of the samples arrive (the same agent: a restart would leave a stretch unmeasured); past every retry
    # backoff the engine finishes them all
    keep = sim.sample_ns > T0 + 10 * S
    sim_rest = type(sim)(sim.sample_ns[keep], sim.counter_j[keep], sim.power_w[keep], sim.start_ns, sim.end_ns,
                         sim.truth_j, sim.bound_j, sim.watts_events)  # fmt: skip
    write_simulation(writer, sim_rest)
    clock.now_ns = T0 + 31 * S
    engine.run_pass()
    assert all(result(store, s.request_id).status == "final" for s in spans)


def test_spans_after_their_samples(store: Store) -> None:
    constant_host(store)
    engine = engine_for(store, Clock(T0 + 30 * S))
    assert engine.run_pass().pending == 0
    store.write_spans([SpanRow("late", "s", "host-a", T0 + S, T0 + 3 * S, workload="vllm")])
    engine.run_pass()
    assert result(store, "late").active_j == pytest.approx(200.0, rel=1e-9)


def test_no_samples_is_never_zero_joules(store: Store) -> None:
    store.write_spans([SpanRow("r", "s", "silent-host", T0 + S, T0 + 2 * S, workload="vllm")])
    clock = Clock(T0 + 10 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    assert result(store, "r").status == "pending"
    clock.now_ns = T0 + 2 * S + 30 * S  # the grace ran out
    engine.run_pass()
    r = result(store, "r")
    assert r.status == "no_samples"
    assert (r.active_j, r.full_j, r.gpu_j, r.cpu_j, r.dram_j) == (None, None, None, None, None)


def test_approximate_after_the_grace_when_samples_stop(store: Store) -> None:
    constant_host(store, seconds=5)  # samples stop at 5 s
    store.write_spans([SpanRow("r", "s", "host-a", T0 + 2 * S, T0 + 8 * S, workload="vllm")])
    r = result_after_the_grace(store, T0 + 9 * S, T0 + 8 * S)
    assert r.status == "approximate"
    assert r.active_j == pytest.approx(300.0, rel=1e-9)  # [2, 5] s of 100 W: a lower bound


def test_duplicate_spans_are_idempotent(store: Store) -> None:
    constant_host(store)
    span = SpanRow("r", "s", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm")
    assert store.write_spans([span, span]) == 1
    engine = engine_for(store, Clock(T0 + 30 * S))
    engine.run_pass()
    first = result(store, "r")
    assert store.write_spans([span]) == 0
    assert engine.run_pass().pending == 0
    assert result(store, "r") == first
    assert first.spans == 1 and first.active_j == pytest.approx(200.0, rel=1e-9)


def test_a_late_neighbour_revises_a_final_request(store: Store) -> None:
    constant_host(store)
    metrics = RequestMetrics()
    engine = RequestEngine(store, RequestsConfig(), metrics, clock_ns=Clock(T0 + 30 * S))
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
    engine.run_pass()
    assert result(store, "a").active_j == pytest.approx(400.0, rel=1e-9)
    store.write_spans([SpanRow("b", "s", "host-a", T0 + 4 * S, T0 + 8 * S, workload="vllm")])
    stats = engine.run_pass()
    assert (stats.finished, stats.revised) == (1, 1)
    assert result(store, "a").active_j == pytest.approx(300.0, rel=1e-9)
    assert result(store, "b").active_j == pytest.approx(300.0, rel=1e-9)
    text = TextRenderer().render(metrics.families()).decode()
    assert "wattmeter_request_revisions_total 1.0" in text
    assert 'wattmeter_requests_total{model="",tenant=""} 2.0' in text  # counted once each


def test_workload_found_by_pid_then_by_service_name(store: Store) -> None:
    shares = {WORKLOAD: 0.75, ("batch-job", "training", "j1"): 0.25}
    constant_host(store, workloads=shares)  # vllm 75 W, batch-job 25 W
    store.write_process_bindings(
        [
            ProcessBindingRow("host-a", 4242, "batch-job", "training", "j1", T0),
            ProcessBindingRow("host-a", 4242, "vllm", "inference", "", T0 + 10 * S),  # pid reused later
        ]
    )
    store.write_spans(
        [
            SpanRow("by-pid-early", "s", "host-a", T0 + 2 * S, T0 + 4 * S, pid=4242),
            SpanRow("by-pid-late", "s", "host-a", T0 + 12 * S, T0 + 14 * S, pid=4242),
            SpanRow("by-service", "s", "host-a", T0 + 2 * S, T0 + 4 * S, service_name="VLLM"),
            SpanRow("unknown", "s", "host-a", T0 + 2 * S, T0 + 4 * S, service_name="nothing-here"),
        ]
    )
    clock = Clock(T0 + 30 * S)
    engine_for(store, clock, finalize_grace_s=10).run_pass()
    assert result(store, "by-pid-early").active_j == pytest.approx(50.0, rel=1e-9)  # batch-job alone, 2 s x 25 W
    assert result(store, "by-pid-late").active_j == pytest.approx(150.0, rel=1e-9)  # vllm alone, 2 s x 75 W
    assert result(store, "by-service").active_j == pytest.approx(150.0, rel=1e-9)
    assert result(store, "unknown").status == "no_samples"  # no workload of that name: unknown, not 0 J


def test_full_view_adds_the_idle_share_and_the_pue(store: Store) -> None:
    # gpu0 at 100 W: 60 W to vllm and 40 W "idle" (a GPU idle part of each interval, as the agent reports it)
    constant_host(store, workloads={WORKLOAD: 0.6, IDLE: 0.4})
    store.write_spans(
        [
            SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm"),
            SpanRow("b", "s", "host-a", T0 + 3 * S, T0 + 4 * S, workload="vllm"),
        ]
    )
    engine_for(store, Clock(T0 + 30 * S), pue=1.5).run_pass()
    a = result(store, "a")
    assert a.active_j == pytest.approx(60 + 30, rel=1e-9)
    assert a.full_j == pytest.approx((60 + 30 + 40 + 20) * 1.5, rel=1e-9)


def test_cpu_and_dram_parts(store: Store) -> None:
    constant_host(store, device_id="cpu0", kind="cpu", watts=40.0)
    constant_host(store, device_id="dram0", kind="dram", watts=10.0)
    constant_host(store, watts=100.0)
    store.write_spans([SpanRow("r", "s", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm")])
    engine_for(store, Clock(T0 + 30 * S)).run_pass()
    r = result(store, "r")
    assert (r.gpu_j, r.cpu_j, r.dram_j) == pytest.approx((200.0, 80.0, 20.0), rel=1e-9)
    assert r.active_j == pytest.approx(300.0, rel=1e-9)


def test_metrics_render_and_pass_promtool(store: Store) -> None:
    constant_host(store)
    metrics = RequestMetrics(max_label_values=1)
    engine = RequestEngine(store, RequestsConfig(), metrics, clock_ns=Clock(T0 + 30 * S))
    store.write_spans(
        [
            SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm", model="llama", tenant="acme",
                    output_tokens=10),
            SpanRow("b", "s", "host-a", T0 + 5 * S, T0 + 6 * S, workload="vllm", model="qwen", tenant="beta",
                    output_tokens=5),
        ]
    )  # fmt: skip
    engine.run_pass()
    text = TextRenderer().render(metrics.families()).decode()
    assert 'wattmeter_request_energy_joules_total{model="llama",tenant="acme"} 200.0' in text
    assert 'wattmeter_request_energy_joules_total{model="other",tenant="other"} 100.0' in text  # past the cap
    assert 'wattmeter_request_energy_joules_bucket{le="250.0",model="llama",view="active"} 1.0' in text
    assert 'wattmeter_request_energy_joules_bucket{le="100.0",model="llama",view="full"} 0.0' in text
    assert 'wattmeter_output_tokens_total{model="llama"} 10.0' in text
    assert "wattmeter_requests_pending 0.0" in text
    checked = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_co2_and_cost_at_the_intensity_over_the_request_not_at_its_end(store: Store) -> None:
    """Intensity 100 g/kWh until T0 + 4 s, then 500; price 0.1, then 0.3; PUE 1.5. A request from T0 + 2 s to T0 + 6 s
    draws 400 J, half at each intensity: 400 J / 3.6e6 x (100 + 500) / 2 x 1.5 (priced at its end it would be 500)."""
    from collector.carbon.series import IntensitySeries
    from collector.carbon.steps import TableSteps

    constant_host(store)  # 100 W
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm", model="m")])
    series = IntensitySeries(
        TableSteps([T0, T0 + 4 * S], [100.0, 500.0], 4 * S),
        TableSteps([T0, T0 + 4 * S], [0.1, 0.3], 4 * S),
        pue=1.5,
    )
    engine = RequestEngine(store, RequestsConfig(), clock_ns=Clock(T0 + 30 * S), carbon=lambda: series)
    engine.run_pass()
    a = result(store, "a")
    assert (a.status, a.active_j) == ("final", pytest.approx(400.0, rel=1e-9))
    assert a.co2_g == pytest.approx(400.0 / 3.6e6 * 300.0 * 1.5, rel=1e-9)
    assert a.cost == pytest.approx(400.0 / 3.6e6 * 0.2 * 1.5, rel=1e-9)


def test_no_co2_without_carbon_or_without_energy(store: Store) -> None:
    from collector.carbon.series import IntensitySeries
    from collector.carbon.steps import ConstantSteps

    constant_host(store)
    store.write_spans(
        [
            SpanRow("measured", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm"),
            SpanRow("unmeasured", "s", "host-z", T0 + 2 * S, T0 + 6 * S, workload="vllm"),
        ]
    )
    series = IntensitySeries(ConstantSteps(400.0), None)
    engine = RequestEngine(store, RequestsConfig(), clock_ns=Clock(T0 + 300 * S), carbon=lambda: series)
    engine.run_pass()
    measured, unmeasured = result(store, "measured"), result(store, "unmeasured")
    assert measured.co2_g == pytest.approx(400.0 / 3.6e6 * 400.0, rel=1e-9) and measured.cost is None
    assert (unmeasured.status, unmeasured.co2_g, unmeasured.cost) == ("no_samples", None, None)
    constant_host(store, hostname="host-b")
    store.write_spans([SpanRow("plain", "s", "host-b", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
    engine_for(store, Clock(T0 + 300 * S)).run_pass()
    assert result(store, "plain").co2_g is None


def test_late_samples_reopen_an_approximate_request_which_then_comes_out_final(store: Store) -> None:
    """An agent that replays its spool after an outage brings the samples past the grace: the request finalised as
    approximate on a lower bound is computed again (``reopen_requests``, called by ingest for such batches)."""
    writer = constant_host(store, seconds=5)  # samples stop at 5 s
    store.write_spans(
        [
            SpanRow("r", "s", "host-a", T0 + 2 * S, T0 + 8 * S, workload="vllm"),
            SpanRow("other-host", "s", "host-b", T0 + 2 * S, T0 + 8 * S, workload="vllm"),
        ]
    )
    clock = Clock(T0 + 8 * S + 30 * S)
    engine = engine_for(store, clock, finalize_grace_s=30)
    engine.run_pass()
    assert (result(store, "r").status, result(store, "r").active_j) == ("approximate", pytest.approx(300.0))
    assert result(store, "other-host").status == "no_samples"
    for second in range(5, 20):  # the rest of the samples, late
        t = T0 + second * S + np.arange(1, 11, dtype=np.int64) * (S // 10)
        joules = 100.0 * (t - T0) / S
        writer.write("gpu0", "gpu", t, 1000.0 + joules, np.full(t.size, 100.0), {WORKLOAD: joules})
    assert len(store.reopen_requests("host-a", T0 + 5 * S + S // 10, T0 + 20 * S)) == 1
    assert (result(store, "r").status, result(store, "r").active_j) == ("pending", None)
    assert result(store, "other-host").status == "no_samples"  # another host's: not touched
    assert len(store.reopen_requests("host-a", T0 + 9 * S, T0 + 20 * S)) == 0  # none of its spans there
    clock.now_ns += S
    engine.run_pass()  # the engine knows of no pending request: the store's list is read every few seconds
    assert result(store, "r").status == "pending"
    engine.note_requests_reopened()  # as the aggregator does after a reopen
    engine.run_pass()
    r = result(store, "r")
    assert (r.status, r.active_j) == ("final", pytest.approx(600.0, rel=1e-9))  # [2, 8] s of 100 W


# -- which requests are pending: the engine's memory and the store's list


def _counted(metrics: RequestMetrics) -> tuple[str, str]:
    text = TextRenderer().render(metrics.families()).decode()
    lines = text.splitlines()
    return (
        next(line for line in lines if line.startswith("wattmeter_request_revisions_total ")),
        next((line for line in lines if line.startswith("wattmeter_requests_total{")), "no requests_total"),
    )


@pytest.mark.parametrize("elsewhere", [False, True], ids=["restarted", "another-aggregator"])
def test_a_final_neighbour_this_engine_did_not_write_is_revised_once_even_in_a_full_pass(
    store: Store, store_url: str, elsewhere: bool
) -> None:
    """a was written final (400 J) by an engine before a restart, or by another aggregator's; b, later, overlaps it
    2 s. This engine's passes are full (the store's list is cut at max_per_pass = 1): a is revised all the same (to
    300 J: 100 W over [2, 8] s, all of it to a and b), and counted as a revision, not as a request again."""
    constant_host(store)  # 100 W
    first_store = open_store(store_url) if elsewhere else store
    try:
        first_store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
        engine_for(first_store, Clock(T0 + 30 * S)).run_pass()
    finally:
        if elsewhere:
            first_store.close()
    assert result(store, "a").active_j == pytest.approx(400.0, rel=1e-9)
    seconds = [1000.0]
    metrics = RequestMetrics()
    engine = RequestEngine(
        store, RequestsConfig(max_per_pass=1), metrics, clock_ns=Clock(T0 + 30 * S), monotonic=lambda: seconds[0]
    )
    store.write_spans([SpanRow("b", "s", "host-a", T0 + 4 * S, T0 + 8 * S, workload="vllm")])
    assert engine.run_pass().full
    a, b = result(store, "a"), result(store, "b")
    assert (a.status, b.status) == ("final", "final")
    assert (a.active_j, b.active_j) == (pytest.approx(300.0, rel=1e-9), pytest.approx(300.0, rel=1e-9))
    assert _counted(metrics) == (
        "wattmeter_request_revisions_total 1.0",
        'wattmeter_requests_total{model="",tenant=""} 1.0',  # b; a was counted when first written
    )
    assert engine.run_pass().finished == 0  # nothing left, nothing rewritten
    assert _counted(metrics)[0] == "wattmeter_request_revisions_total 1.0"


def test_a_late_span_revises_an_approximate_neighbour(store: Store) -> None:
    """Samples stop at 5 s: n [2, 8] s is approximate with 300 J (all of [2, 5]). A late p [2.5, 3] s is final
    with 25 J (half of [2.5, 3]), and n's approximate share drops by as much: 275 + 25 = 300 J measured."""
    constant_host(store, seconds=5)
    metrics = RequestMetrics()
    engine = RequestEngine(store, RequestsConfig(finalize_grace_s=30), metrics, clock_ns=Clock(T0 + 38 * S))
    store.write_spans([SpanRow("n", "s", "host-a", T0 + 2 * S, T0 + 8 * S, workload="vllm")])
    engine.run_pass()
    assert (result(store, "n").status, result(store, "n").active_j) == ("approximate", pytest.approx(300.0))
    store.write_spans([SpanRow("p", "s", "host-a", T0 + 2 * S + S // 2, T0 + 3 * S, workload="vllm")])
    engine.run_pass()
    p, n = result(store, "p"), result(store, "n")
    assert (p.status, p.active_j) == ("final", pytest.approx(25.0, rel=1e-9))
    assert (n.status, n.active_j) == ("approximate", pytest.approx(275.0, rel=1e-9))
    assert _counted(metrics)[0] == "wattmeter_request_revisions_total 1.0"
    engine.run_pass()
    assert _counted(metrics)[0] == "wattmeter_request_revisions_total 1.0"  # not rewritten pass after pass


def test_a_no_samples_neighbour_is_not_rewritten_pass_after_pass(store: Store) -> None:
    """n has no samples (its host sent none): no_samples, no energy. A late p on the same host is no_samples too,
    and n, its neighbour, is left as it is (no energy to compare: the same status is the same result)."""
    metrics = RequestMetrics()
    engine = RequestEngine(store, RequestsConfig(finalize_grace_s=30), metrics, clock_ns=Clock(T0 + 60 * S))
    store.write_spans([SpanRow("n", "s", "host-z", T0 + 2 * S, T0 + 8 * S, workload="vllm")])
    engine.run_pass()
    assert (result(store, "n").status, result(store, "n").active_j) == ("no_samples", None)
    store.write_spans([SpanRow("p", "s", "host-z", T0 + 3 * S, T0 + 4 * S, workload="vllm")])
    engine.run_pass()
    assert (result(store, "p").status, result(store, "n").status) == ("no_samples", "no_samples")
    assert _counted(metrics)[0] == "wattmeter_request_revisions_total 0.0"


def pending_metric(engine: RequestEngine) -> str:
    text = TextRenderer().render(engine.metrics.families()).decode()
    return next(line for line in text.splitlines() if line.startswith("wattmeter_requests_pending "))


def test_a_request_reopened_behind_the_engine_s_back_is_found_at_the_next_check_of_the_store(store: Store) -> None:
    """A request made pending in the store with no word to the engine (not through the aggregator's reopen) is in
    the store's list, read again STORE_CHECK_S after the last time."""
    writer = constant_host(store, seconds=5)
    store.write_spans([SpanRow("r", "s", "host-a", T0 + 2 * S, T0 + 8 * S, workload="vllm")])
    clock = Clock(T0 + 8 * S + 30 * S)
    seconds = [1000.0]
    engine = RequestEngine(store, RequestsConfig(finalize_grace_s=30), clock_ns=clock, monotonic=lambda: seconds[0])
    engine.run_pass()
    assert result(store, "r").status == "approximate"
    for second in range(5, 20):  # the rest of the samples, late
        t = T0 + second * S + np.arange(1, 11, dtype=np.int64) * (S // 10)
        joules = 100.0 * (t - T0) / S
        writer.write("gpu0", "gpu", t, 1000.0 + joules, np.full(t.size, 100.0), {WORKLOAD: joules})
    assert len(store.reopen_requests("host-a", T0 + 5 * S, T0 + 20 * S)) == 1
    seconds[0] += STORE_CHECK_S - 0.1
    engine.run_pass()
    assert result(store, "r").status == "pending"  # the engine's memory knows of no pending request
    seconds[0] += 0.1
    engine.run_pass()
    assert (result(store, "r").status, result(store, "r").active_j) == ("final", pytest.approx(600.0, rel=1e-9))


def test_a_request_the_engine_knows_as_pending_but_settled_elsewhere_is_forgotten(store: Store, store_url: str) -> None:
    constant_host(store)
    clock = Clock(T0 + 60 * S)
    engine = engine_for(store, clock)
    store.write_spans([SpanRow("late", "s", "host-a", T0 + 2 * S, T0 + 70 * S, workload="vllm")])  # past the samples
    engine.run_pass()
    assert result(store, "late").status == "pending"
    assert pending_metric(engine) == "wattmeter_requests_pending 1.0"
    other = open_store(store_url)  # another aggregator settles it
    try:
        other.write_request_results([RequestResult("late", "approximate", spans=1, start_ns=T0, end_ns=T0 + S)])
    finally:
        other.close()
    engine.note_requests_reopened()  # the next pass reads the store's list: all of it, without "late"
    engine.run_pass()
    assert pending_metric(engine) == "wattmeter_requests_pending 0.0"
    assert result(store, "late").status == "approximate"


def test_more_pending_requests_than_memory_keeps_are_taken_from_the_store(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("collector.aggregator.request_engine.KNOWN_PER_PASS", 2)
    constant_host(store)
    clock = Clock(T0 + 60 * S)
    engine = engine_for(store, clock, max_per_pass=5)
    ids = [f"r{i:02d}" for i in range(30)]
    store.write_spans([SpanRow(rid, "s", "host-a", T0 + S + i * S // 4, T0 + 2 * S + i * S // 4, workload="vllm")
                       for i, rid in enumerate(ids)])  # fmt: skip
    passes = 0
    while passes < 20 and engine.run_pass().full:
        passes += 1
    assert [result(store, rid).status for rid in ids] == ["final"] * len(ids)
    assert store.pending_requests(10) == []
    assert pending_metric(engine) == "wattmeter_requests_pending 0.0"
    total = sum(result(store, rid).active_j or 0.0 for rid in ids)
    assert total == pytest.approx(100.0 * (2 + 29 / 4 - 1), rel=1e-9)  # every second some request ran: all of it


def _apart(n: int) -> list[SpanRow]:
    """n requests of 0.3 s, 1.5 s apart (one cluster each: no neighbours)."""
    return [SpanRow(f"r{i:02d}", "s", "host-a", T0 + S + i * 3 * S // 2, T0 + S + i * 3 * S // 2 + 3 * S // 10,
                    workload="vllm") for i in range(n)]  # fmt: skip


def test_a_backlog_stored_before_the_engine_began_is_taken_pass_after_pass(store: Store) -> None:
    """12 pending requests stored before the engine began, 5 per pass: the store's list is cut at 5, so more are
    pending than taken (full), and the next passes take the rest, back to back."""
    constant_host(store, seconds=30)
    store.write_spans(_apart(12))
    now = [1000.0]  # the monotonic clock does not move: passes back to back
    engine = RequestEngine(store, RequestsConfig(max_per_pass=5), clock_ns=Clock(T0 + 90 * S), monotonic=lambda: now[0])
    assert engine.run_pass().full
    for _ in range(5):
        engine.run_pass()
    assert store.pending_requests(20) == []


def test_a_request_whose_host_window_failed_once_is_retried_at_the_next_pass(store: Store) -> None:
    """A transient failure attributing one host's window (caught in run_pass) leaves its requests uncollected: the
    engine forgets them, and reads the store's list at the next pass, which has them."""
    constant_host(store)
    now = [1000.0]
    engine = RequestEngine(store, RequestsConfig(), clock_ns=Clock(T0 + 60 * S), monotonic=lambda: now[0])
    engine.run_pass()  # the first pass: the store's list (empty)
    store.write_spans([SpanRow("r", "s", "host-a", T0 + 2 * S, T0 + 4 * S, workload="vllm")])
    real = engine._attribute_window
    calls = [0]

    def flaky(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 1:
            raise OSError("transient: the database went away")
        return real(*args, **kwargs)

    engine._attribute_window = flaky  # type: ignore[method-assign]
    engine.run_pass()
    assert result(store, "r").status == "pending"
    engine.run_pass()
    engine.run_pass()
    assert result(store, "r").status == "final"


def test_a_reopen_told_while_the_store_s_list_is_being_read_is_not_lost(store: Store) -> None:
    """note_requests_reopened() (the aggregator's executor thread) while the store's list is read: the next pass
    reads it again."""
    writer = constant_host(store, seconds=5)
    store.write_spans([SpanRow("r", "s", "host-a", T0 + 2 * S, T0 + 8 * S, workload="vllm")])
    now = [1000.0]
    engine = RequestEngine(store, RequestsConfig(finalize_grace_s=30), clock_ns=Clock(T0 + 40 * S),
                           monotonic=lambda: now[0])  # fmt: skip
    engine.run_pass()
    assert result(store, "r").status == "approximate"
    for second in range(5, 20):
        t = T0 + second * S + np.arange(1, 11, dtype=np.int64) * (S // 10)
        joules = 100.0 * (t - T0) / S
        writer.write("gpu0", "gpu", t, 1000.0 + joules, np.full(t.size, 100.0), {WORKLOAD: joules})
    now[0] += 10  # a store check is due at the next pass
    real = store.pending_request_counts

    def racing(limit: int):  # type: ignore[no-untyped-def]
        got = real(limit)
        assert len(store.reopen_requests("host-a", T0 + 5 * S, T0 + 20 * S)) == 1  # committed after the query...
        engine.note_requests_reopened()  # ...and told before _pending sets _store_check_at
        return got

    store.pending_request_counts = racing  # type: ignore[method-assign]
    engine.run_pass()
    store.pending_request_counts = real  # type: ignore[method-assign]
    engine.run_pass()  # the next pass should read the store's list
    assert result(store, "r").status == "final"


def test_neighbours_stored_by_another_aggregator_share_the_energy(store: Store, store_url: str) -> None:
    """Two aggregators share the database and each was sent half of a host's spans: the spans this one's memory was
    handed are not all the host's, so the split reads the store (a and b overlap 2 s: 100 W shared)."""
    constant_host(store)  # 100 W
    engine = engine_for(store, Clock(T0 + 30 * S))  # begun before any span: its memory covers every host
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm", model="m")])
    write_elsewhere(store_url, [SpanRow("b", "s", "host-a", T0 + 4 * S, T0 + 8 * S, workload="vllm", model="m")])
    engine.run_pass()
    a, b = result(store, "a"), result(store, "b")
    assert (a.status, b.status) == ("final", "final")
    assert a.active_j == pytest.approx(200 + 100, rel=1e-9)
    assert b.active_j == pytest.approx(100 + 200, rel=1e-9)


def test_late_samples_reopened_while_a_pass_computes_do_not_leave_it_approximate(store: Store) -> None:
    """r [2, 8] s is past its grace with samples to 5 s only; while the pass computes it (after it read the samples),
    the rest arrive and are reopened: r is still pending then, so the store has nothing to reopen, and the pass's
    approximate result (300 J) must not be written; the next pass finds the whole 600 J."""
    writer = constant_host(store, seconds=5)  # 100 W
    store.write_spans([SpanRow("r", "s", "host-a", T0 + 2 * S, T0 + 8 * S, workload="vllm")])
    engine = engine_for(store, Clock(T0 + 40 * S), finalize_grace_s=30)
    read_samples = store.device_series

    def late_samples_meanwhile(*args: Any, **kwargs: Any) -> Any:
        samples = read_samples(*args, **kwargs)
        store.device_series = read_samples  # type: ignore[method-assign]
        for second in range(5, 20):
            t = T0 + second * S + np.arange(1, 11, dtype=np.int64) * (S // 10)
            joules = 100.0 * (t - T0) / S
            writer.write("gpu0", "gpu", t, 1000.0 + joules, np.full(t.size, 100.0), {WORKLOAD: joules})
        with engine.reopening("host-a", T0 + 5 * S, T0 + 20 * S):
            assert len(store.reopen_requests("host-a", T0 + 5 * S, T0 + 20 * S)) == 0  # r is pending still
        return samples

    store.device_series = late_samples_meanwhile  # type: ignore[method-assign]
    stats = engine.run_pass()
    assert stats.finished == 0
    assert result(store, "r").status == "pending"
    engine.run_pass()
    assert (result(store, "r").status, result(store, "r").active_j) == ("final", pytest.approx(600.0, rel=1e-9))


def test_a_reopen_elsewhere_does_not_hold_back_a_pass_s_results(store: Store) -> None:
    """A reopen of another host during the pass: the approximate result of this host is written."""
    constant_host(store, seconds=5)
    store.write_spans([SpanRow("r", "s", "host-a", T0 + 2 * S, T0 + 8 * S, workload="vllm")])
    engine = engine_for(store, Clock(T0 + 40 * S), finalize_grace_s=30)
    read_samples = store.device_samples

    def reopen_meanwhile(*args: Any, **kwargs: Any) -> Any:
        store.device_samples = read_samples  # type: ignore[method-assign]
        with engine.reopening("host-b", T0, T0 + 20 * S):
            store.reopen_requests("host-b", T0, T0 + 20 * S)
        return read_samples(*args, **kwargs)

    store.device_samples = reopen_meanwhile  # type: ignore[method-assign]
    engine.run_pass()
    assert (result(store, "r").status, result(store, "r").active_j) == ("approximate", pytest.approx(300.0))


def test_a_pending_neighbour_is_settled_by_its_own_pass_with_its_neighbours(store: Store) -> None:
    """a [2, 6] s is final (400 J); then z [1, 1.5] s and b [1, 8] s come, one taken a pass. z's pass computes b (its
    neighbour) but leaves it pending: written then, b would be final while a, b's neighbour but not z's, kept 400 J.
    b's own pass revises a (100 W: z 25 J, b 25 + 50 + 200 + 200 J, a 200 J, together the 700 J of [1, 8] s)."""
    constant_host(store)
    engine = RequestEngine(store, RequestsConfig(max_per_pass=1), clock_ns=Clock(T0 + 30 * S), monotonic=lambda: 1e3)
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
    engine.run_pass()
    store.write_spans([SpanRow("z", "s", "host-a", T0 + S, T0 + 3 * S // 2, workload="vllm")])
    store.write_spans([SpanRow("b", "s", "host-a", T0 + S, T0 + 8 * S, workload="vllm")])
    engine.run_pass()
    assert (result(store, "z").status, result(store, "b").status) == ("final", "pending")
    engine.run_pass()
    a, b, z = (result(store, rid) for rid in ("a", "b", "z"))
    assert (a.status, b.status) == ("final", "final")
    assert (z.active_j, b.active_j, a.active_j) == (
        pytest.approx(25.0, rel=1e-9),
        pytest.approx(475.0, rel=1e-9),
        pytest.approx(200.0, rel=1e-9),
    )


def test_spans_of_a_write_whose_commit_was_lost_are_read_from_the_store(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL (SQLite commits in process: its outcome is never lost): the connection drops just after the
    server committed b's write; the store writes again and finds b stored (nothing new to hand the engine's memory),
    so the memory cannot vouch for host-a up to b's end: the engine reads the store there, and a and b share their
    2 s (100 W)."""
    store = open_store(postgres_url)
    store.migrate()
    try:
        _lost_commit(store, monkeypatch)
    finally:
        store.close()


def _lost_commit(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    constant_host(store)
    engine = engine_for(store, Clock(T0 + 30 * S))
    store.write_spans([SpanRow("a", "s", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
    commit = psycopg.Connection.commit
    drops = [1]

    def commit_then_drop(self: psycopg.Connection[Any]) -> None:
        commit(self)
        if drops[0]:
            drops[0] -= 1
            self.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(psycopg.Connection, "commit", commit_then_drop)
    assert store.write_spans([SpanRow("b", "s", "host-a", T0 + 4 * S, T0 + 8 * S, workload="vllm")]) == 0
    monkeypatch.setattr(psycopg.Connection, "commit", commit)
    assert drops == [0]
    engine.run_pass()  # the first: it reads the store's list of pending requests, where b is
    a, b = result(store, "a"), result(store, "b")
    assert (a.status, b.status) == ("final", "final")
    assert (a.active_j, b.active_j) == (pytest.approx(300.0, rel=1e-9), pytest.approx(300.0, rel=1e-9))


def test_a_reopen_of_a_time_none_of_a_neighbour_s_spans_touch_keeps_its_revision(store: Store) -> None:
    """n has spans on host-a at [2, 6] s and [30, 32] s (samples to 20 s: approximate, 400 J); a late x [4, 8] s
    takes half of [4, 6]. During x's pass host-a [15, 18] s is reopened: none of n's spans is there (the store
    reopens what has a span in the time, not what spans it), so n's revision to 300 J is written."""
    constant_host(store)  # 100 W, 20 s
    store.write_spans(
        [
            SpanRow("n", "s1", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm"),
            SpanRow("n", "s2", "host-a", T0 + 30 * S, T0 + 32 * S, workload="vllm"),
        ]
    )
    engine = engine_for(store, Clock(T0 + 70 * S), finalize_grace_s=30)
    engine.run_pass()
    assert (result(store, "n").status, result(store, "n").active_j) == ("approximate", pytest.approx(400.0))
    store.write_spans([SpanRow("x", "s", "host-a", T0 + 4 * S, T0 + 8 * S, workload="vllm")])
    read_samples = store.device_samples

    def reopen_meanwhile(*args: Any, **kwargs: Any) -> Any:
        store.device_samples = read_samples  # type: ignore[method-assign]
        with engine.reopening("host-a", T0 + 15 * S, T0 + 18 * S):
            assert len(store.reopen_requests("host-a", T0 + 15 * S, T0 + 18 * S)) == 0
        return read_samples(*args, **kwargs)

    store.device_samples = reopen_meanwhile  # type: ignore[method-assign]
    engine.run_pass()
    x, n = result(store, "x"), result(store, "n")
    assert (x.status, x.active_j) == ("final", pytest.approx(300.0, rel=1e-9))
    assert (n.status, n.active_j) == ("approximate", pytest.approx(300.0, rel=1e-9))  # [2, 8] s: 600 J


def test_a_neighbour_with_a_span_another_aggregator_stored_is_revised_from_all_its_spans(
    store: Store, store_url: str
) -> None:
    """n has a span on host-a (stored here) and one on host-b (stored by another aggregator): 800 J. A late x on
    host-a takes half of [4, 6] s: n is recomputed from both its spans (memory holds one of the two the store
    counts), 300 J on host-a and 400 on host-b."""
    constant_host(store)  # host-a 100 W
    constant_host(store, hostname="host-b")
    engine = engine_for(store, Clock(T0 + 30 * S))
    store.write_spans([SpanRow("n", "s1", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
    write_elsewhere(store_url, [SpanRow("n", "s2", "host-b", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
    engine.run_pass()
    assert (result(store, "n").status, result(store, "n").active_j) == ("final", pytest.approx(800.0))
    store.write_spans([SpanRow("x", "s", "host-a", T0 + 4 * S, T0 + 8 * S, workload="vllm")])
    engine.run_pass()
    x, n = result(store, "x"), result(store, "n")
    assert (x.active_j, n.active_j) == (pytest.approx(300.0, rel=1e-9), pytest.approx(700.0, rel=1e-9))


def test_a_neighbour_another_aggregator_settled_is_not_rewritten_from_this_one_s_partial_memory(
    store: Store, store_url: str
) -> None:
    """b [18, 22] s is approximate here (samples to 20 s). Another aggregator stores b's other span [5, 19] s and
    settles b (1500 J: all of [5, 20] s). z [18, 19] s comes here: b, its neighbour, is computed from both its
    spans (the store counts two, memory holds one): in [18, 19] s three spans share 100 J (a third each, two of
    them b's), and b + z keep the 1500 J."""
    constant_host(store)  # 100 W, 20 s
    config = RequestsConfig(finalize_grace_s=30)
    engine = RequestEngine(store, config, clock_ns=Clock(T0 + 60 * S), monotonic=lambda: 1e3)
    store.write_spans([SpanRow("b", "s1", "host-a", T0 + 18 * S, T0 + 22 * S, workload="vllm")])
    engine.run_pass()
    other = open_store(store_url)
    try:
        other.write_spans([SpanRow("b", "s2", "host-a", T0 + 5 * S, T0 + 19 * S, workload="vllm")])
        RequestEngine(other, config, clock_ns=Clock(T0 + 60 * S)).run_pass()
        assert result(store, "b").active_j == pytest.approx(1500.0, rel=1e-9)
    finally:
        other.close()
    store.write_spans([SpanRow("z", "s", "host-a", T0 + 18 * S, T0 + 19 * S, workload="vllm")])
    engine.run_pass()
    b, z = result(store, "b"), result(store, "z")
    assert (z.status, z.active_j) == ("final", pytest.approx(100.0 / 3, rel=1e-9))
    assert b.active_j == pytest.approx(1500.0 - 100.0 / 3, rel=1e-9)


def test_a_pending_request_with_a_span_memory_lacks_is_computed_again_from_the_store(
    store: Store, store_url: str
) -> None:
    """p's first span [2, 6] s is stored here, its second [4, 20] s by another aggregator. A pass takes p from memory
    (one span), and reads the host's time from the store (another aggregator wrote there): it meets both spans,
    but drew p's clusters from one ([2, 6] s), so it would compute [4, 20] s over part of its samples; p is not
    written, and the next pass reads its spans from the store: all of [2, 20] s, 1800 J."""
    constant_host(store, seconds=30)  # 100 W
    engine = engine_for(store, Clock(T0 + 60 * S))
    engine.run_pass()  # the first pass reads the store's list; the next ones take what memory knows
    store.write_spans([SpanRow("p", "s1", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
    write_elsewhere(store_url, [SpanRow("p", "s2", "host-a", T0 + 4 * S, T0 + 20 * S, workload="vllm")])
    engine.run_pass()
    assert result(store, "p").status == "pending"
    engine.run_pass()
    assert (result(store, "p").status, result(store, "p").active_j) == ("final", pytest.approx(1800.0, rel=1e-9))


def test_a_neighbour_a_late_span_made_pending_beyond_memory_is_left_to_its_own_pass(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a [2, 6] s and q [10, 14] s are final (400 J each). p [1, 3] s and a late span of a, [9, 11] s, come while more
    is pending than memory keeps (it forgets, and reads the store's list cut at 1): a, p's neighbour, is pending in
    the store though this engine wrote it final, so it is left to its own pass, which revises q too. 100 W over
    [1, 6] and [9, 14] s: 1000 J, p 150, a 500, q 350."""
    monkeypatch.setattr("collector.aggregator.request_engine.KNOWN_PER_PASS", 1)
    constant_host(store)  # 100 W
    engine = RequestEngine(store, RequestsConfig(max_per_pass=1), clock_ns=Clock(T0 + 60 * S), monotonic=lambda: 1e3)
    store.write_spans([SpanRow("a", "s1", "host-a", T0 + 2 * S, T0 + 6 * S, workload="vllm")])
    engine.run_pass()
    store.write_spans([SpanRow("q", "s", "host-a", T0 + 10 * S, T0 + 14 * S, workload="vllm")])
    engine.run_pass()
    store.write_spans(
        [
            SpanRow("p", "s", "host-a", T0 + S, T0 + 3 * S, workload="vllm"),
            SpanRow("a", "s2", "host-a", T0 + 9 * S, T0 + 11 * S, workload="vllm"),
        ]
    )
    for _ in range(20):
        if not engine.run_pass().full and not store.pending_requests(1):
            break
    assert store.pending_requests(10) == []
    got = {rid: result(store, rid).active_j for rid in ("a", "p", "q")}
    assert got == {"p": pytest.approx(150.0), "a": pytest.approx(500.0), "q": pytest.approx(350.0)}
