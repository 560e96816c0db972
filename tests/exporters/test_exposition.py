from __future__ import annotations

import http.client
import math
import socket
import time
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from collector.config import PrometheusConfig
from collector.exporters.exposition import Family, TextRenderer, format_value, to_metric
from collector.exporters.prometheus import ExpositionCache, PrometheusExporter, SamplerCollector
from collector.readings import DeviceInfo, DeviceKind, DeviceReading
from collector.sampler import Sampler
from collector.sources.base import Source
from collector.sources.simulated import SimulatedSource


def demo_families(value: float) -> list[Family]:
    counter = Family("demo_energy_joules", "counter", 'Energy with "quotes" \\ and\nnewline.', ("a", "b"))
    counter.add(("x", 'va"l\\ue\nz'), value)
    counter.add(("y", ""), 0.0)
    gauge = Family("demo_power_watts", "gauge", "Power.", ("zeta", "alpha"))
    gauge.add(("1", "2"), math.inf)
    gauge.add(("3", "4"), -math.inf)
    gauge.add(("5", "6"), 3.45e8)
    plain = Family("demo_nan", "gauge", "Not a number.", ())
    plain.add((), math.nan)
    histogram = Family("demo_seconds", "histogram", "Durations.", ("source",))
    histogram.add_histogram(("s",), [("0.5", 1), ("+Inf", 3)], 2.25)
    return [counter, gauge, plain, histogram]


class Fixed(Collector):
    def __init__(self, value: float) -> None:
        self.value = value

    def collect(self) -> list[Metric]:
        return [to_metric(family) for family in demo_families(self.value)]


def parsed(text: str) -> list[tuple[str, str, list[tuple[str, dict[str, str], str]]]]:
    out = []
    for family in text_string_to_metric_families(text):
        samples = [(s.name, s.labels, format_value(s.value)) for s in family.samples]
        out.append((family.name, family.type, samples))
    return out


@pytest.mark.parametrize("value", [0.0, 1.5, 123456789.125, 1e-9, 7.0])
def test_same_text_as_prometheus_client_for_the_same_families(value: float) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed(value))
    ours = TextRenderer().render(demo_families(value)).decode()
    theirs = generate_latest(registry).decode()
    assert parsed(ours) == parsed(theirs)
    # headers byte for byte, so HELP escaping and TYPE names match too
    assert [line for line in ours.splitlines() if line.startswith("#")] == [
        line for line in theirs.splitlines() if line.startswith("#")
    ]
    assert "demo_seconds_bucket" in ours and 'le="+Inf"' in ours


def test_cached_prefixes_still_follow_new_values() -> None:
    renderer = TextRenderer()
    first = renderer.render(demo_families(1.0)).decode()
    second = renderer.render(demo_families(2.5)).decode()
    assert 'demo_energy_joules_total{a="x",b="va\\"l\\\\ue\\nz"} 1.0' in first
    assert 'demo_energy_joules_total{a="x",b="va\\"l\\\\ue\\nz"} 2.5' in second


def test_special_values() -> None:
    assert [format_value(v) for v in (math.inf, -math.inf, math.nan, 2.0)] == ["+Inf", "-Inf", "NaN", "2.0"]


def test_the_cache_serves_what_the_registry_collector_would() -> None:
    sampler = Sampler([SimulatedSource(gpus=2)])
    state = sampler.states[0]
    state.source.open()
    sampler.mark_opened(state)
    sampler._read_once(state)
    sampler._status_once(state)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SamplerCollector(sampler))
    assert parsed(ExpositionCache(sampler).body().decode()) == parsed(generate_latest(registry).decode())


class OneGpu(Source):
    name = "one"

    def devices(self) -> Sequence[DeviceInfo]:
        return [DeviceInfo("gpu0", DeviceKind.GPU, "one", "NVIDIA", "H100", 0, uuid="GPU-1")]

    def read(self) -> Sequence[DeviceReading]:
        return [DeviceReading("gpu0", 10.0, 100.0, time.monotonic_ns(), time.time_ns())]


def test_each_response_leaves_in_one_write_on_a_kept_alive_connection() -> None:
    """Headers and body in separate writes make a kept-alive scrape wait for the peer's delayed ACK (~40 ms)."""
    sampler = Sampler([OneGpu()])
    sampler.mark_opened(sampler.states[0])
    sampler._read_once(sampler.states[0])
    exporter = PrometheusExporter(sampler, PrometheusConfig(listen="127.0.0.1:0"))
    sends: list[int] = []
    original = socket.socket.sendall

    def counting_sendall(self: socket.socket, data: bytes, *args: object) -> None:
        sends.append(len(data))
        original(self, data, *args)  # type: ignore[arg-type]

    exporter.start()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", exporter.port, timeout=5)
        socket.socket.sendall = counting_sendall  # type: ignore[method-assign]
        try:
            for _ in range(3):
                connection.request("GET", "/metrics")
                response = connection.getresponse()
                body = response.read()
                assert response.status == 200 and b"wattmeter_gpu_energy_joules_total" in body
        finally:
            socket.socket.sendall = original  # type: ignore[method-assign]
        server_sends = [n for n in sends if n > len(body)]  # the client's requests are far smaller than a response
        assert len(server_sends) == 3, sends
        connection.close()
    finally:
        exporter.stop()
