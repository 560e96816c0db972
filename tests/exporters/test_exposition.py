from __future__ import annotations

import http.client
import math
import socket
import time
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from collector.config import PrometheusConfig
from collector.exporters.exposition import TextRenderer, format_value
from collector.exporters.prometheus import PrometheusExporter
from collector.readings import DeviceInfo, DeviceKind, DeviceReading
from collector.sampler import Sampler
from collector.sources.base import Source


class Fixed(Collector):
    def __init__(self, value: float) -> None:
        self.value = value

    def collect(self) -> list[Metric]:
        counter = CounterMetricFamily("demo_energy_joules", 'Energy with "quotes" \\ and\nnewline.', labels=["a", "b"])
        counter.add_metric(["x", 'va"l\\ue\nz'], self.value)
        counter.add_metric(["y", ""], 0.0)
        gauge = GaugeMetricFamily("demo_power_watts", "Power.", labels=["zeta", "alpha"])
        gauge.add_metric(["1", "2"], math.inf)
        gauge.add_metric(["3", "4"], -math.inf)
        gauge.add_metric(["5", "6"], 3.45e8)
        plain = GaugeMetricFamily("demo_nan", "Not a number.")
        plain.add_metric([], math.nan)
        histogram = HistogramMetricFamily("demo_seconds", "Durations.", labels=["source"])
        histogram.add_metric(["s"], [("0.5", 1.0), ("+Inf", 3.0)], 2.25)
        return [counter, gauge, plain, histogram]


def parsed(text: str) -> list[tuple[str, str, list[tuple[str, dict[str, str], str]]]]:
    out = []
    for family in text_string_to_metric_families(text):
        samples = [(s.name, s.labels, format_value(s.value)) for s in family.samples]
        out.append((family.name, family.type, samples))
    return out


@pytest.mark.parametrize("value", [0.0, 1.5, 123456789.125, 1e-9, 7.0])
def test_same_series_and_values_as_prometheus_client(value: float) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed(value))
    ours = TextRenderer().render(registry.collect()).decode()
    theirs = generate_latest(registry).decode()
    assert parsed(ours) == parsed(theirs)
    # headers byte for byte, so HELP escaping and TYPE names match too
    assert [line for line in ours.splitlines() if line.startswith("#")] == [
        line for line in theirs.splitlines() if line.startswith("#")
    ]


def test_cached_prefixes_still_follow_new_values() -> None:
    registry = CollectorRegistry(auto_describe=False)
    fixed = Fixed(1.0)
    registry.register(fixed)
    renderer = TextRenderer()
    first = renderer.render(registry.collect()).decode()
    fixed.value = 2.5
    second = renderer.render(registry.collect()).decode()
    assert 'demo_energy_joules_total{a="x",b="va\\"l\\\\ue\\nz"} 1.0' in first
    assert 'demo_energy_joules_total{a="x",b="va\\"l\\\\ue\\nz"} 2.5' in second


def test_special_values() -> None:
    assert [format_value(v) for v in (math.inf, -math.inf, math.nan, 2.0)] == ["+Inf", "-Inf", "NaN", "2.0"]


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
