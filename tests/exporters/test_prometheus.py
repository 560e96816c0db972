"""The Prometheus exposition: metric names, labels and values, the render cache, and the HTTP server."""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import bcrypt
import pytest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from collector import __version__
from collector.config import BasicAuthConfig, PrometheusConfig
from collector.errors import SourceError
from collector.exporters.prometheus import ExpositionCache, PrometheusExporter, check_password
from collector.readings import DeviceInfo, DeviceKind, DeviceReading, DeviceStatus, EnergyMethod, GpuProcess
from collector.sampler import READ_DURATION_BUCKETS_S, Sampler, SourceState
from collector.sources.base import Source
from collector.sources.simulated import SimulatedSource

GPU_MODEL = "Fake H100 80GB HBM3"


class FakeClock:
    def __init__(self) -> None:
        self.ns = 5_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * 1e9)


class FakeGpuSource(Source):
    """Two GPUs with fixed readings; ``answering`` picks which answer, ``fail`` makes the whole read fail."""

    name = "fakegpu"
    slow_interval_s = 1.0

    def __init__(self) -> None:
        self.infos = [
            DeviceInfo(
                device_id=f"gpu{i}",
                kind=DeviceKind.GPU,
                source=self.name,
                vendor="NVIDIA",
                model=GPU_MODEL,
                index=i,
                uuid=f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd",
                method=EnergyMethod.COUNTER,
                attributes=(("mig_mode", "disabled"), ("power_scope", "gpu")),
            )
            for i in range(2)
        ]
        self.energy = {"gpu0": 1000.5, "gpu1": 2000.25}
        self.power: dict[str, float | None] = {"gpu0": 350.0, "gpu1": 410.5}
        self.answering = {"gpu0", "gpu1"}
        self.fail = False
        self.fail_status = False

    def devices(self) -> Sequence[DeviceInfo]:
        return self.infos

    def read(self) -> Sequence[DeviceReading]:
        if self.fail:
            raise SourceError("fake GPU driver exploded")
        return [
            DeviceReading(i.device_id, self.energy[i.device_id], self.power[i.device_id], 1, 2)
            for i in self.infos
            if i.device_id in self.answering
        ]

    def read_status(self) -> Sequence[DeviceStatus]:
        if self.fail_status:
            raise SourceError("status read failed")
        return [
            DeviceStatus(
                device_id="gpu0",
                power_limit_w=700.0,
                utilization_ratio=0.75,
                memory_used_bytes=1024,
                temperature_c=55.0,
                sm_clock_hz=1.98e9,
                processes=(GpuProcess(pid=42), GpuProcess(pid=43)),
            ),
            DeviceStatus(device_id="gpu1", power_limit_w=650.0, utilization_ratio=0.0),
        ]

    def device_errors(self) -> dict[str, str]:
        return {i.device_id: "lost" for i in self.infos if i.device_id not in self.answering}


class FakeCpuSource(Source):
    name = "rapl"

    def __init__(self) -> None:
        self.infos = [
            DeviceInfo("cpu0", DeviceKind.CPU, "rapl", "GenuineIntel", "Xeon", 0, package="0", domain="package"),
            DeviceInfo("dram0", DeviceKind.DRAM, "rapl", "GenuineIntel", "Xeon", 0, package="0", domain="dram"),
        ]
        self.fail = False

    def devices(self) -> Sequence[DeviceInfo]:
        return self.infos

    def read(self) -> Sequence[DeviceReading]:
        if self.fail:
            raise SourceError("rapl gone")
        return [DeviceReading("cpu0", 123.5, 95.0, 1, 2), DeviceReading("dram0", 12.25, None, 1, 2)]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(body: bytes) -> tuple[dict[str, str], Samples]:
    """Return ({family name: type}, {(sample name, labels): value})."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names_with_labels(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for sample_name, labels in samples if sample_name == name]


def gpu_labels(i: int) -> dict[str, str]:
    return {"gpu": str(i), "uuid": f"GPU-0000000{i}-aaaa-bbbb-cccc-dddddddddddd", "model": GPU_MODEL}


def make_sampler(*sources: Source) -> tuple[Sampler, list[SourceState]]:
    sampler = Sampler(list(sources))
    for state in sampler.states:
        state.source.open()
        sampler.mark_opened(state)
    return sampler, sampler.states


def make_cache(sampler: Sampler) -> ExpositionCache:
    return ExpositionCache(sampler)


@pytest.fixture
def fake() -> tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache]:
    gpu, cpu = FakeGpuSource(), FakeCpuSource()
    sampler, states = make_sampler(gpu, cpu)
    for state in states:
        sampler._read_once(state)
    sampler._status_once(states[0])
    return sampler, gpu, cpu, make_cache(sampler)


# --- names and labels over the simulated source -----------------------------------------------------------


def test_every_required_metric_with_its_labels_from_the_simulated_source() -> None:
    clock = FakeClock()
    source = SimulatedSource(gpus=2, interval_s=0.1, seed=3, cpu=True, monotonic_ns=clock)
    sampler, (state,) = make_sampler(source)
    reads = 5
    for _ in range(reads):
        clock.advance(0.1)
        sampler._read_once(state)
    sampler._status_once(state)
    types, samples = parse(make_cache(sampler).body())

    gpu_families = {
        "wattmeter_gpu_energy_joules": "counter",
        "wattmeter_gpu_power_watts": "gauge",
        "wattmeter_gpu_power_limit_watts": "gauge",
        "wattmeter_gpu_utilization_ratio": "gauge",
        "wattmeter_gpu_up": "gauge",
    }
    for family, kind in gpu_families.items():
        assert types[family] == kind, family
        sample = f"{family}_total" if kind == "counter" else family
        labels = names_with_labels(samples, sample)
        assert len(labels) == 2, (family, labels)
        assert {frozenset(label) for label in map(dict.keys, labels)} == {frozenset({"gpu", "uuid", "model"})}
        assert sorted(label["gpu"] for label in labels) == ["0", "1"]
        assert all(label["model"] == "Simulated H100 80GB HBM3" for label in labels)
        assert all(label["uuid"].startswith("GPU-") for label in labels)

    assert types["wattmeter_cpu_energy_joules"] == "counter"
    assert types["wattmeter_cpu_power_watts"] == "gauge"
    cpu = {"package": "0", "domain": "package", "source": "simulated"}
    assert value(samples, "wattmeter_cpu_energy_joules_total", **cpu) > 0
    assert value(samples, "wattmeter_cpu_power_watts", **cpu) > 0

    assert types["wattmeter_source_up"] == "gauge"
    assert value(samples, "wattmeter_source_up", source="simulated") == 1.0
    assert types["wattmeter_source_errors"] == "counter"  # the parser strips _total
    assert value(samples, "wattmeter_source_errors_total", source="simulated") == 0.0
    assert types["wattmeter_source_read_duration_seconds"] == "histogram"
    assert value(samples, "wattmeter_source_read_duration_seconds_count", source="simulated") == reads
    assert types["wattmeter_build_info"] == "gauge"
    assert value(samples, "wattmeter_build_info", version=__version__) == 1.0

    for gpu in names_with_labels(samples, "wattmeter_gpu_up"):
        assert value(samples, "wattmeter_gpu_up", **gpu) == 1.0
        assert value(samples, "wattmeter_gpu_energy_joules_total", **gpu) > 0
        assert 60.0 <= value(samples, "wattmeter_gpu_power_watts", **gpu) <= 700.0
        assert value(samples, "wattmeter_gpu_power_limit_watts", **gpu) == 700.0
        assert 0.0 <= value(samples, "wattmeter_gpu_utilization_ratio", **gpu) <= 1.0


# --- exact values from a fake source ----------------------------------------------------------------------


def test_exact_gpu_values(fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache]) -> None:
    _, _, _, cache = fake
    _, samples = parse(cache.body())
    g0, g1 = gpu_labels(0), gpu_labels(1)
    assert value(samples, "wattmeter_gpu_energy_joules_total", **g0) == 1000.5
    assert value(samples, "wattmeter_gpu_energy_joules_total", **g1) == 2000.25
    assert value(samples, "wattmeter_gpu_power_watts", **g0) == 350.0
    assert value(samples, "wattmeter_gpu_power_watts", **g1) == 410.5
    assert value(samples, "wattmeter_gpu_power_limit_watts", **g0) == 700.0
    assert value(samples, "wattmeter_gpu_power_limit_watts", **g1) == 650.0
    assert value(samples, "wattmeter_gpu_utilization_ratio", **g0) == 0.75
    assert value(samples, "wattmeter_gpu_utilization_ratio", **g1) == 0.0
    assert value(samples, "wattmeter_gpu_memory_used_bytes", **g0) == 1024.0
    assert value(samples, "wattmeter_gpu_temperature_celsius", **g0) == 55.0
    assert value(samples, "wattmeter_gpu_sm_clock_hertz", **g0) == 1.98e9
    assert value(samples, "wattmeter_gpu_processes", **g0) == 2.0
    assert value(samples, "wattmeter_gpu_processes", **g1) == 0.0
    # fields a status leaves as None are not exported at all
    assert ("wattmeter_gpu_memory_used_bytes", frozenset(g1.items())) not in samples
    assert names_with_labels(samples, "wattmeter_gpu_module_power_watts") == []
    assert value(samples, "wattmeter_gpu_up", **g0) == 1.0
    assert value(samples, "wattmeter_gpu_up", **g1) == 1.0
    info = value(
        samples,
        "wattmeter_gpu_info",
        **g0,
        source="fakegpu",
        energy_method="counter",
        mig_mode="disabled",
        mig_instances="0",
        power_scope="gpu",
    )
    assert info == 1.0


def test_exact_cpu_values(fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache]) -> None:
    _, _, _, cache = fake
    _, samples = parse(cache.body())
    package = {"package": "0", "domain": "package", "source": "rapl"}
    dram = {"package": "0", "domain": "dram", "source": "rapl"}
    assert value(samples, "wattmeter_cpu_energy_joules_total", **package) == 123.5
    assert value(samples, "wattmeter_cpu_energy_joules_total", **dram) == 12.25
    assert value(samples, "wattmeter_cpu_power_watts", **package) == 95.0
    assert ("wattmeter_cpu_power_watts", frozenset(dram.items())) not in samples  # power None: left out
    # CPU domains never show up as GPU series
    assert len(names_with_labels(samples, "wattmeter_gpu_energy_joules_total")) == 2


def test_source_series(fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache]) -> None:
    _, _, _, cache = fake
    _, samples = parse(cache.body())
    for source in ("fakegpu", "rapl"):
        assert value(samples, "wattmeter_source_up", source=source) == 1.0
        assert value(samples, "wattmeter_source_errors_total", source=source) == 0.0
    assert value(samples, "wattmeter_build_info", version=__version__) == 1.0


def test_read_duration_histogram_is_cumulative_and_counts_reads() -> None:
    gpu, cpu = FakeGpuSource(), FakeCpuSource()
    sampler, (gpu_state, cpu_state) = make_sampler(gpu, cpu)
    for _ in range(7):
        sampler._read_once(gpu_state)
    gpu.fail = True
    sampler._read_once(gpu_state)  # a failed read is timed too
    sampler._read_once(cpu_state)
    _, samples = parse(make_cache(sampler).body())
    for source, reads in (("fakegpu", 8), ("rapl", 1)):
        buckets = [
            (float(labels["le"]), samples[("wattmeter_source_read_duration_seconds_bucket", frozenset(items))])
            for name, items in samples
            if name == "wattmeter_source_read_duration_seconds_bucket"
            for labels in [dict(items)]
            if labels["source"] == source
        ]
        buckets.sort()
        bounds = [bound for bound, _ in buckets]
        assert bounds == [*READ_DURATION_BUCKETS_S, float("inf")]
        counts = [count for _, count in buckets]
        assert counts == sorted(counts), "buckets must be cumulative"
        assert counts[-1] == reads
        assert value(samples, "wattmeter_source_read_duration_seconds_count", source=source) == reads
        total = value(samples, "wattmeter_source_read_duration_seconds_sum", source=source)
        assert 0.0 < total < 1.0


def test_histogram_bucket_bounds_are_inclusive() -> None:
    sampler, (state,) = make_sampler(FakeCpuSource())
    for seconds in (0.0005, 0.001, 0.3, 5.0):
        state.read_durations.observe(seconds)
    _, samples = parse(make_cache(sampler).body())

    def bucket(le: str) -> float:
        return value(samples, "wattmeter_source_read_duration_seconds_bucket", source="rapl", le=le)

    assert bucket("0.0005") == 1
    assert bucket("0.001") == 2
    assert bucket("0.25") == 2
    assert bucket("0.5") == 3
    assert bucket("2.5") == 3
    assert bucket("+Inf") == 4
    assert value(samples, "wattmeter_source_read_duration_seconds_sum", source="rapl") == pytest.approx(5.3015)


def test_missing_gpu_is_down_but_keeps_its_energy(
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache],
) -> None:
    sampler, gpu, _, cache = fake
    gpu.answering = {"gpu0"}
    gpu.energy["gpu0"] = 1100.0
    sampler._read_once(sampler.states[0])
    _, samples = parse(cache.body())
    g0, g1 = gpu_labels(0), gpu_labels(1)
    assert value(samples, "wattmeter_gpu_up", **g0) == 1.0
    assert value(samples, "wattmeter_gpu_up", **g1) == 0.0
    assert value(samples, "wattmeter_gpu_energy_joules_total", **g0) == 1100.0
    assert value(samples, "wattmeter_gpu_energy_joules_total", **g1) == 2000.25  # last known, still exported
    assert value(samples, "wattmeter_source_up", source="fakegpu") == 1.0
    assert value(samples, "wattmeter_source_errors_total", source="fakegpu") == 1.0  # device_errors counted

    gpu.answering = {"gpu0", "gpu1"}
    gpu.energy["gpu1"] = 2100.0
    sampler._read_once(sampler.states[0])
    _, samples = parse(cache.body())
    assert value(samples, "wattmeter_gpu_up", **g1) == 1.0
    assert value(samples, "wattmeter_gpu_energy_joules_total", **g1) == 2100.0


def test_failing_source_is_down_and_counted_and_others_stay_up(
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache],
) -> None:
    sampler, gpu, _, cache = fake
    gpu.fail = True
    sampler._read_once(sampler.states[0])
    sampler._read_once(sampler.states[0])
    sampler._read_once(sampler.states[1])
    _, samples = parse(cache.body())
    assert value(samples, "wattmeter_source_up", source="fakegpu") == 0.0
    assert value(samples, "wattmeter_source_errors_total", source="fakegpu") == 2.0
    assert value(samples, "wattmeter_source_up", source="rapl") == 1.0
    assert value(samples, "wattmeter_source_errors_total", source="rapl") == 0.0
    for i in range(2):
        assert value(samples, "wattmeter_gpu_up", **gpu_labels(i)) == 0.0
    # last energies are kept, so rate() over the outage does not see a reset
    assert value(samples, "wattmeter_gpu_energy_joules_total", **gpu_labels(0)) == 1000.5
    assert sampler.states[0].last_error == "fake GPU driver exploded"
    assert sampler.any_up()

    gpu.fail = False
    sampler._read_once(sampler.states[0])
    _, samples = parse(cache.body())
    assert value(samples, "wattmeter_source_up", source="fakegpu") == 1.0
    assert value(samples, "wattmeter_source_errors_total", source="fakegpu") == 2.0
    assert value(samples, "wattmeter_gpu_up", **gpu_labels(0)) == 1.0


def test_unexpected_exception_in_read_is_also_a_down_source() -> None:
    class Broken(FakeCpuSource):
        name = "broken"

        def read(self) -> Sequence[DeviceReading]:
            raise RuntimeError("bug in a source")

    sampler, states = make_sampler(Broken(), FakeCpuSource())
    for state in states:
        sampler._read_once(state)
    _, samples = parse(make_cache(sampler).body())
    assert value(samples, "wattmeter_source_up", source="broken") == 0.0
    assert value(samples, "wattmeter_source_errors_total", source="broken") == 1.0
    assert value(samples, "wattmeter_source_up", source="rapl") == 1.0


def test_failed_status_read_shows_in_errors_total(
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache],
) -> None:
    sampler, gpu, _, cache = fake
    _, before = parse(cache.body())
    assert value(before, "wattmeter_source_errors_total", source="fakegpu") == 0.0
    gpu.fail_status = True
    sampler._status_once(sampler.states[0])
    assert sampler.states[0].errors_total == 1
    _, after = parse(cache.body())
    assert value(after, "wattmeter_source_errors_total", source="fakegpu") == 1.0


# --- render cache -----------------------------------------------------------------------------------------


def test_cache_renders_once_per_version(
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache],
) -> None:
    sampler, gpu, _, cache = fake
    first = cache.body()
    for _ in range(50):
        assert cache.body() is first
        cache.body(want_gzip=True)
    assert cache.renders == 1

    version = sampler.version
    gpu.energy["gpu0"] = 5000.0
    sampler._read_once(sampler.states[0])
    assert sampler.version > version
    second = cache.body()
    assert cache.renders == 2
    assert second != first
    _, samples = parse(second)
    assert value(samples, "wattmeter_gpu_energy_joules_total", **gpu_labels(0)) == 5000.0
    for _ in range(10):
        cache.body()
    assert cache.renders == 2

    sampler._status_once(sampler.states[0])
    cache.body()
    assert cache.renders == 3


def test_cache_rerenders_after_a_failed_read(
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache],
) -> None:
    sampler, gpu, _, cache = fake
    cache.body()
    gpu.fail = True
    sampler._read_once(sampler.states[0])
    _, samples = parse(cache.body())
    assert cache.renders == 2
    assert value(samples, "wattmeter_source_up", source="fakegpu") == 0.0


def test_gzip_body(fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache]) -> None:
    sampler, _, _, cache = fake
    zipped = cache.body(want_gzip=True)
    assert zipped[:2] == b"\x1f\x8b"
    assert gzip.decompress(zipped) == cache.body()
    assert cache.body(want_gzip=True) is zipped
    sampler._read_once(sampler.states[1])
    rezipped = cache.body(want_gzip=True)
    assert gzip.decompress(rezipped) == cache.body()
    assert cache.renders == 2


# --- HTTP -------------------------------------------------------------------------------------------------


ExporterFactory = Callable[..., PrometheusExporter]


@pytest.fixture
def start_exporter() -> Iterator[ExporterFactory]:
    started: list[PrometheusExporter] = []

    def start(sampler: Sampler, **config: object) -> PrometheusExporter:
        exporter = PrometheusExporter(sampler, PrometheusConfig(listen="127.0.0.1:0", **config))  # type: ignore[arg-type]
        started.append(exporter)
        exporter.start()
        return exporter

    yield start
    for exporter in started:
        exporter.stop()


def get(
    port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def test_http_metrics(
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache], start_exporter: ExporterFactory
) -> None:
    sampler, _, _, _ = fake
    exporter = start_exporter(sampler)
    assert exporter.port > 0
    status, headers, body = get(exporter.port, "/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert headers["content-type"].startswith("text/plain")
    assert int(headers["content-length"]) == len(body)
    _, samples = parse(body)
    assert value(samples, "wattmeter_gpu_energy_joules_total", **gpu_labels(0)) == 1000.5
    status, _, again = get(exporter.port, "/metrics?x=1")
    assert status == 200
    assert again == body
    assert exporter.cache.renders == 1


def test_http_metrics_gzip(
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache], start_exporter: ExporterFactory
) -> None:
    sampler, _, _, _ = fake
    exporter = start_exporter(sampler)
    _, _, plain = get(exporter.port, "/metrics")
    status, headers, zipped = get(exporter.port, "/metrics", {"Accept-Encoding": "gzip, deflate"})
    assert status == 200
    assert headers["content-encoding"] == "gzip"
    assert gzip.decompress(zipped) == plain


def test_http_head(
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache], start_exporter: ExporterFactory
) -> None:
    sampler, _, _, _ = fake
    exporter = start_exporter(sampler)
    status, headers, body = get(exporter.port, "/metrics", method="HEAD")
    assert status == 200
    assert body == b""
    assert int(headers["content-length"]) > 0


def test_http_healthz_and_not_found(start_exporter: ExporterFactory) -> None:
    gpu = FakeGpuSource()
    sampler, (state,) = make_sampler(gpu)
    exporter = start_exporter(sampler)
    status, _, body = get(exporter.port, "/healthz")
    assert status == 503  # nothing read yet
    assert b"no source is up" in body
    sampler._read_once(state)
    status, _, body = get(exporter.port, "/healthz")
    assert status == 200
    assert body == b"ok\n"
    gpu.fail = True
    sampler._read_once(state)
    assert get(exporter.port, "/healthz")[0] == 503
    for path in ("/nope", "/metricsx", "/metrics/", "/healthz/extra"):
        assert get(exporter.port, path)[0] == 404, path
    assert get(exporter.port, "/")[0] == 200


def test_http_healthz_with_no_sources(start_exporter: ExporterFactory) -> None:
    exporter = start_exporter(Sampler([]))
    assert get(exporter.port, "/healthz")[0] == 503
    status, _, body = get(exporter.port, "/metrics")
    assert status == 200
    _, samples = parse(body)
    assert value(samples, "wattmeter_build_info", version=__version__) == 1.0


@pytest.mark.parametrize("scheme", ["sha256", "sha256-upper", "bcrypt"])
def test_http_basic_auth(
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache],
    start_exporter: ExporterFactory,
    scheme: str,
) -> None:
    sampler, _, _, _ = fake
    if scheme == "bcrypt":
        password_hash = bcrypt.hashpw(b"s3cret:pw", bcrypt.gensalt(rounds=4)).decode()
    else:
        digest = hashlib.sha256(b"s3cret:pw").hexdigest()
        password_hash = "sha256:" + (digest.upper() if scheme == "sha256-upper" else digest)
    auth = BasicAuthConfig(username="scraper", password_hash=password_hash)
    exporter = start_exporter(sampler, basic_auth=auth)
    port = exporter.port

    for headers in (
        {},
        basic("scraper", "wrong"),
        basic("someone", "s3cret:pw"),
        basic("scraper", ""),
        {"Authorization": "Basic !!!not-base64!!!"},
        {"Authorization": "Bearer s3cret:pw"},
    ):
        status, response_headers, body = get(port, "/metrics", headers)
        assert status == 401, headers
        assert response_headers["www-authenticate"] == 'Basic realm="wattmeter"'
        assert b"wattmeter_gpu" not in body

    status, _, body = get(port, "/metrics", basic("scraper", "s3cret:pw"))  # a colon in the password
    assert status == 200
    _, samples = parse(body)
    assert value(samples, "wattmeter_gpu_power_watts", **gpu_labels(1)) == 410.5


def test_passed_credentials_are_cached_failed_ones_never(
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache],
    start_exporter: ExporterFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import collector.exporters.prometheus as module

    checks: list[str] = []
    real_check = module.check_password

    def counting(auth: BasicAuthConfig, username: str, password: str) -> bool:
        checks.append(password)
        return real_check(auth, username, password)

    monkeypatch.setattr(module, "check_password", counting)
    sampler, _, _, _ = fake
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    exporter = start_exporter(sampler, basic_auth=BasicAuthConfig(username="u", password_hash=hashed))
    for _ in range(3):
        assert get(exporter.port, "/metrics", basic("u", "pw"))[0] == 200
        assert get(exporter.port, "/metrics", basic("u", "bad"))[0] == 401
    assert checks == ["pw", "bad", "bad", "bad"]


def test_check_password() -> None:
    sha = BasicAuthConfig(username="u", password_hash="sha256:" + hashlib.sha256(b"pw").hexdigest())
    assert check_password(sha, "u", "pw")
    assert not check_password(sha, "u", "pW")
    assert not check_password(sha, "U", "pw")
    hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    bc = BasicAuthConfig(username="u", password_hash=hashed)
    assert check_password(bc, "u", "pw")
    assert not check_password(bc, "u", "px")
    assert not check_password(bc, "v", "pw")


# --- TLS --------------------------------------------------------------------------------------------------


def make_cert(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    openssl = shutil.which("openssl")
    if openssl is not None:
        subprocess.run(
            [
                openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
                "-keyout", str(key), "-out", str(cert),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )  # fmt: skip
        return cert, key
    x509 = pytest.importorskip("cryptography.x509")
    import datetime
    import ipaddress

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert, key


def test_https(
    tmp_path: Path,
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache],
    start_exporter: ExporterFactory,
) -> None:
    sampler, _, _, _ = fake
    cert, key = make_cert(tmp_path)
    exporter = start_exporter(sampler, tls_cert=cert, tls_key=key)
    context = ssl.create_default_context(cafile=str(cert))

    def fetch(path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", exporter.port, timeout=10, context=context)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    status, body = fetch("/metrics")
    assert status == 200
    _, samples = parse(body)
    assert value(samples, "wattmeter_gpu_energy_joules_total", **gpu_labels(0)) == 1000.5

    # plain HTTP to the TLS port does not get metrics
    try:
        answer = get(exporter.port, "/metrics")
    except (http.client.HTTPException, OSError):
        answer = None
    assert answer is None, f"plain HTTP to the TLS port got an answer: {answer!r}"

    # a client that connects and never says hello does not stall the server for others
    with socket.create_connection(("127.0.0.1", exporter.port), timeout=10):
        assert fetch("/healthz") == (200, b"ok\n")

    # a client that does not trust the cert is refused by its own verification
    with pytest.raises(ssl.SSLError):
        conn = http.client.HTTPSConnection("127.0.0.1", exporter.port, timeout=10, context=ssl.create_default_context())
        try:
            conn.request("GET", "/metrics")
        finally:
            conn.close()
    assert fetch("/metrics")[0] == 200


def test_https_with_basic_auth(
    tmp_path: Path,
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache],
    start_exporter: ExporterFactory,
) -> None:
    sampler, _, _, _ = fake
    cert, key = make_cert(tmp_path)
    auth = BasicAuthConfig(username="u", password_hash="sha256:" + hashlib.sha256(b"pw").hexdigest())
    exporter = start_exporter(sampler, tls_cert=cert, tls_key=key, basic_auth=auth)
    context = ssl.create_default_context(cafile=str(cert))
    for headers, expected in (({}, 401), (basic("u", "pw"), 200)):
        conn = http.client.HTTPSConnection("127.0.0.1", exporter.port, timeout=10, context=context)
        try:
            conn.request("GET", "/metrics", headers=headers)
            assert conn.getresponse().status == expected
        finally:
            conn.close()


def test_exporter_stop_frees_the_port(
    fake: tuple[Sampler, FakeGpuSource, FakeCpuSource, ExpositionCache],
) -> None:
    sampler, _, _, _ = fake
    exporter = PrometheusExporter(sampler, PrometheusConfig(listen="127.0.0.1:0"))
    exporter.start()
    port = exporter.port
    try:
        assert get(port, "/healthz")[0] == 200
    finally:
        exporter.stop()
    with pytest.raises(OSError):
        get(port, "/healthz")
