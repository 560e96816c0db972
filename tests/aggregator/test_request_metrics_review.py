"""Review of the per-request metrics: counting across status changes, the exposition of odd label values, the
histogram's bounds and the label caps."""

from __future__ import annotations

import numpy as np
import pytest

from collector.aggregator.config import RequestsConfig
from collector.aggregator.request_engine import RequestEngine
from collector.aggregator.request_metrics import ENERGY_BUCKETS_J, RequestMetrics
from collector.exporters.exposition import TextRenderer
from collector.store.base import SpanRow, Store
from tests.aggregator.test_request_engine import Clock, constant_host, result
from tests.fakes.request_world import T0, WORKLOAD, HostWriter, S


def _values(metrics: RequestMetrics) -> dict[str, float]:
    out = {}
    for line in TextRenderer().render(metrics.families()).decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_histogram_bounds_are_1_j_to_100_kj_and_a_bound_falls_in_its_own_bucket() -> None:
    assert ENERGY_BUCKETS_J[0] == 1.0 and ENERGY_BUCKETS_J[-1] == 1e5
    assert list(ENERGY_BUCKETS_J) == sorted(set(ENERGY_BUCKETS_J))
    metrics = RequestMetrics()
    metrics.finished("m", "t", 1.0, 1e5, 3)
    values = _values(metrics)
    assert values['wattmeter_request_energy_joules_bucket{le="1.0",model="m",view="active"}'] == 1.0
    assert values['wattmeter_request_energy_joules_bucket{le="50000.0",model="m",view="full"}'] == 0.0
    assert values['wattmeter_request_energy_joules_bucket{le="100000.0",model="m",view="full"}'] == 1.0
    assert values['wattmeter_request_energy_joules_bucket{le="+Inf",model="m",view="full"}'] == 1.0


def test_label_values_with_quotes_backslashes_and_newlines_are_escaped() -> None:
    metrics = RequestMetrics()
    metrics.finished('a"b\\c\nd', "t\n", 5.0, 6.0, 7)
    text = TextRenderer().render(metrics.families()).decode()
    assert 'wattmeter_requests_total{model="a\\"b\\\\c\\nd",tenant="t\\n"} 1.0' in text
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(text)
    labels = [s.labels for f in families for s in f.samples if s.name == "wattmeter_requests_total"]
    assert labels == [{"model": 'a"b\\c\nd', "tenant": "t\n"}]


def test_a_flood_of_models_is_capped() -> None:
    metrics = RequestMetrics(max_label_values=3)
    n = 1000
    metrics.finished_many(
        [f"m{i}" for i in range(n)], [f"t{i}" for i in range(n)], np.ones(n), np.ones(n), np.ones(n, dtype=np.int64)
    )
    for i in range(n):
        metrics.finished(f"x{i}", f"y{i}", 1.0, 1.0, 1)
    series = [k for k in _values(metrics) if k.startswith("wattmeter_requests_total")]
    assert len(series) == 4  # m0-m2 with t0-t2, and other/other
    assert sum(v for k, v in _values(metrics).items() if k.startswith("wattmeter_requests_total")) == 2 * n


def _late_samples(writer: HostWriter, first_second: int, last_second: int) -> None:
    for second in range(first_second, last_second):
        t = T0 + second * S + np.arange(1, 11, dtype=np.int64) * (S // 10)
        joules = 100.0 * (t - T0) / S
        writer.write("gpu0", "gpu", t, 1000.0 + joules, np.full(t.size, 100.0), {WORKLOAD: joules})


def reopen(
    store: Store, engine: RequestEngine, writer: HostWriter, first_second: int, host: str = "host-a"
) -> dict[str, str]:
    """Late samples of ``host`` from ``first_second`` to 20 s, and the reopen the service makes of them."""
    _late_samples(writer, first_second, 20)
    since, until = T0 + first_second * S + S // 10, T0 + 20 * S
    with engine.reopening(host, since, until) as counted:
        counted.update(store.reopen_requests(host, since, until))
    engine.note_requests_reopened()
    return counted


def span(rid: str, host: str = "host-a", start_s: int = 2, end_s: int = 8) -> SpanRow:
    return SpanRow(rid, "s", host, T0 + start_s * S, T0 + end_s * S, workload="vllm", model="m", tenant="t")


def engine_and_metrics(store: Store, clock: Clock, **config: object) -> tuple[RequestEngine, RequestMetrics]:
    metrics = RequestMetrics()
    engine = RequestEngine(store, RequestsConfig(finalize_grace_s=30, **config), metrics, clock_ns=clock)  # type: ignore[arg-type]
    return engine, metrics


def test_a_no_samples_request_that_late_samples_make_final_is_counted_as_a_request(store: Store) -> None:
    """r has no samples by the end of its grace: no_samples (no energy, not in wattmeter_requests_total). Its host's
    spool is replayed (late samples, a reopen): r comes out final with 600 J, as the API says. It has now become
    final for the first time, so wattmeter_requests_total, the energy counter and the histogram must count it."""
    writer = constant_host(store, seconds=1)  # host-a's samples stop at 1 s
    store.write_spans([span("r")])
    clock = Clock(T0 + 8 * S + 30 * S)
    engine, metrics = engine_and_metrics(store, clock)
    engine.run_pass()
    assert result(store, "r").status == "no_samples"
    assert _values(metrics)["wattmeter_requests_no_samples_total"] == 1.0
    assert reopen(store, engine, writer, 1) == {"r": "no_samples"}
    clock.now_ns += S
    engine.run_pass()
    r = result(store, "r")
    assert (r.status, r.active_j) == ("final", pytest.approx(600.0, rel=1e-9))
    values = _values(metrics)
    assert values.get('wattmeter_requests_total{model="m",tenant="t"}') == 1.0, values
    assert values['wattmeter_request_energy_joules_total{model="m",tenant="t"}'] == pytest.approx(600.0)
    assert values['wattmeter_request_energy_joules_count{model="m",view="active"}'] == 1.0
    assert values['wattmeter_output_tokens_total{model="m"}'] == 0.0


def test_an_approximate_request_made_final_counts_once(store: Store) -> None:
    """approximate (300 J) then final (600 J) after late samples: one request, never two; counters never go down."""
    writer = constant_host(store, seconds=5)
    store.write_spans([span("r")])
    clock = Clock(T0 + 8 * S + 30 * S)
    engine, metrics = engine_and_metrics(store, clock)
    engine.run_pass()
    before = _values(metrics)
    assert before['wattmeter_requests_total{model="m",tenant="t"}'] == 1.0
    assert reopen(store, engine, writer, 5) == {"r": "approximate"}
    clock.now_ns += S
    engine.run_pass()
    assert result(store, "r").status == "final"
    after = _values(metrics)
    assert after['wattmeter_requests_total{model="m",tenant="t"}'] == 1.0
    assert after["wattmeter_request_revisions_total"] == 1.0
    assert all(after[k] >= v for k, v in before.items() if "pending" not in k)


def test_a_request_reopened_after_many_later_writes_is_not_counted_twice(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REMEMBERED made 1 to stand for 200,000 requests written between r's first write and its reopen."""
    from collector.aggregator import request_engine

    monkeypatch.setattr(request_engine, "REMEMBERED", 1)
    writer = constant_host(store, seconds=5)
    store.write_spans([span("r")])
    clock = Clock(T0 + 8 * S + 30 * S)
    engine, metrics = engine_and_metrics(store, clock)
    engine.run_pass()
    store.write_spans([span("q", "host-q")])
    engine.run_pass()  # q: no_samples, written after r
    assert _values(metrics)['wattmeter_requests_total{model="m",tenant="t"}'] == 1.0
    assert reopen(store, engine, writer, 5) == {"r": "approximate"}
    clock.now_ns += S
    engine.run_pass()
    assert result(store, "r").status == "final"
    assert _values(metrics)['wattmeter_requests_total{model="m",tenant="t"}'] == 1.0  # r, once
