"""NvmlSource against the real pynvml bindings over a fake libnvidia-ml (tests/fakes/fake_nvml.py)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from unittest import mock

import pynvml
import pytest

from collector.config import AgentConfig
from collector.errors import SourceError, SourceUnavailable
from collector.readings import DeviceKind, EnergyMethod
from collector.sources.base import registered_sources
from collector.sources.nvml import NvmlSource
from tests.fakes.fake_nvml import (
    FakeGpu,
    FakeNvmlLibrary,
    FakeProcess,
    FakeUtilSample,
    installed,
    library_missing,
)

S = 1_000_000_000  # ns


class Clock:
    """Injectable clocks: ``mono`` and ``wall`` in ns, advanced by hand so backoff tests never sleep."""

    def __init__(self) -> None:
        self.mono = 1_000 * S
        self.wall = 1_700_000_000 * S

    def monotonic_ns(self) -> int:
        return self.mono

    def time_ns(self) -> int:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += int(seconds * S)
        self.wall += int(seconds * S)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_fake(*gpus: FakeGpu) -> FakeNvmlLibrary:
    return FakeNvmlLibrary(list(gpus) or [FakeGpu("GPU-0000")])


@pytest.fixture
def fake() -> Iterator[FakeNvmlLibrary]:
    lib = make_fake(
        FakeGpu("GPU-aaaa", name="NVIDIA H100 80GB HBM3", energy_mj=1_000_000),
        FakeGpu("GPU-bbbb", name="NVIDIA A100-SXM4-40GB", energy_mj=2_000_000),
    )
    with installed(lib):
        yield lib


def opened(clock: Clock) -> NvmlSource:
    source = NvmlSource(interval_s=0.1, monotonic_ns=clock.monotonic_ns, time_ns=clock.time_ns)
    source.open()
    return source


def tick(fake: FakeNvmlLibrary, clock: Clock, seconds: float) -> None:
    fake.advance(seconds)
    clock.advance(seconds)


def by_id(readings: object) -> dict[str, object]:
    return {r.device_id: r for r in readings}  # type: ignore[attr-defined]


# -- discovery -----------------------------------------------------------------------------------------------


def test_discovers_gpus_with_index_uuid_and_name(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    devices = source.devices()
    assert [(d.device_id, d.index, d.uuid, d.model) for d in devices] == [
        ("gpu0", 0, "GPU-aaaa", "NVIDIA H100 80GB HBM3"),
        ("gpu1", 1, "GPU-bbbb", "NVIDIA A100-SXM4-40GB"),
    ]
    for d in devices:
        assert d.kind is DeviceKind.GPU
        assert d.source == "nvml"
        assert d.vendor == "NVIDIA"
        assert d.method is EnergyMethod.COUNTER
        assert dict(d.attributes) == {"mig_mode": "unsupported", "power_scope": "gpu"}
    source.close()
    assert not fake.initialized


def test_factory_respects_enabled_flag() -> None:
    factory = registered_sources()["nvml"]
    assert isinstance(factory(AgentConfig()), NvmlSource)
    config = AgentConfig()
    config.sources.nvml.enabled = False
    assert factory(config) is None


# -- energy and power ----------------------------------------------------------------------------------------


def test_energy_from_counter_field_and_instant_power(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    first = by_id(source.read())
    assert first["gpu0"].energy_j == pytest.approx(1_000.0)  # type: ignore[attr-defined]
    assert first["gpu1"].energy_j == pytest.approx(2_000.0)  # type: ignore[attr-defined]
    fake.gpus[0].energy_mj += 250_500
    fake.gpus[0].power_mw = 250_000
    tick(fake, clock, 1.0)
    second = by_id(source.read())
    r0 = second["gpu0"]
    assert r0.energy_j == pytest.approx(1_250.5)  # type: ignore[attr-defined]
    assert r0.power_w == pytest.approx(250.0)  # type: ignore[attr-defined]
    assert r0.time_ns == fake.clock_us * 1000  # type: ignore[attr-defined]
    assert r0.mono_ns == clock.mono  # type: ignore[attr-defined]
    assert fake.count("nvmlDeviceGetPowerUsage") == 0


def test_exactly_one_field_values_call_per_gpu_per_read(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    fake.calls.clear()
    for _ in range(5):
        source.read()
    assert fake.count("nvmlDeviceGetFieldValues", 0) == 5
    assert fake.count("nvmlDeviceGetFieldValues", 1) == 5
    assert {name for name, _ in fake.calls} == {"nvmlDeviceGetFieldValues"}


def test_field_timestamp_zero_falls_back_to_wall_clock(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    fake.clock_us = 0
    (r0, _) = source.read()
    assert r0.time_ns == clock.wall


def test_power_usage_used_only_where_instant_field_missing(clock: Clock) -> None:
    lib = make_fake(
        FakeGpu("GPU-new", power_mw=300_000, power_avg_mw=280_000),
        FakeGpu("GPU-old", supports_instant_power=False, power_mw=300_000, power_avg_mw=280_000),
    )
    with installed(lib):
        source = opened(clock)
        lib.calls.clear()
        readings = by_id(source.read())
    assert readings["gpu0"].power_w == pytest.approx(300.0)  # type: ignore[attr-defined]
    assert readings["gpu1"].power_w == pytest.approx(280.0)  # type: ignore[attr-defined]
    assert lib.count("nvmlDeviceGetPowerUsage", 0) == 0
    assert lib.count("nvmlDeviceGetPowerUsage", 1) == 1
    assert lib.count("nvmlDeviceGetFieldValues", 0) == 1
    assert lib.count("nvmlDeviceGetFieldValues", 1) == 1


def test_one_field_not_supported_leaves_the_other(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    source.read()
    # The instant power field stops answering on gpu0: energy stays, power falls back to the averaged call.
    fake.gpus[0].field_errors[pynvml.NVML_FI_DEV_POWER_INSTANT] = pynvml.NVML_ERROR_NOT_SUPPORTED
    fake.gpus[0].energy_mj += 5_000
    tick(fake, clock, 0.1)
    r0 = by_id(source.read())["gpu0"]
    assert r0.energy_j == pytest.approx(1_005.0)  # type: ignore[attr-defined]
    assert r0.power_w == pytest.approx(fake.gpus[0].power_avg_mw / 1000)  # type: ignore[attr-defined]
    # Then the energy field goes instead: the total holds, power comes from the field again.
    del fake.gpus[0].field_errors[pynvml.NVML_FI_DEV_POWER_INSTANT]
    fake.gpus[0].field_errors[pynvml.NVML_FI_DEV_ENERGY] = pynvml.NVML_ERROR_NOT_SUPPORTED
    fake.gpus[0].power_mw = 123_000
    tick(fake, clock, 0.1)
    r0 = by_id(source.read())["gpu0"]
    assert r0.energy_j == pytest.approx(1_005.0)  # type: ignore[attr-defined]
    assert r0.power_w == pytest.approx(123.0)  # type: ignore[attr-defined]
    assert source.device_errors() == {}


def test_power_none_when_no_power_at_all(clock: Clock) -> None:
    lib = make_fake(FakeGpu("GPU-x", supports_instant_power=False, supports_power_usage=False))
    with installed(lib):
        source = opened(clock)
        (r0,) = source.read()
    assert r0.power_w is None
    assert r0.energy_j == 0.0


def test_integrates_power_when_energy_field_not_supported(clock: Clock) -> None:
    lib = make_fake(FakeGpu("GPU-pascal", name="Tesla P100-PCIE-16GB", supports_energy_field=False))
    samples = [(0.0, 100_000), (0.5, 200_000), (1.5, 150_000), (1.75, 50_000)]  # (s, mW)
    with installed(lib):
        source = opened(clock)
        assert source.devices()[0].method is EnergyMethod.INTEGRATED
        start_mono = clock.mono
        energies = []
        for t_s, mw in samples:
            clock.mono = start_mono + int(t_s * S)
            lib.advance(7)  # the monotonic read times, not the field timestamps, drive the integration
            lib.gpus[0].power_mw = mw
            (r0,) = source.read()
            assert r0.time_ns == lib.clock_us * 1000  # the field timestamp still dates the reading
            energies.append(r0.energy_j)
    expected = 0.0
    for (t0, p0), (t1, p1) in itertools.pairwise(samples):
        expected += (p0 + p1) / 2 / 1000 * (t1 - t0)
    assert expected == pytest.approx(0.5 * 150 + 1.0 * 175 + 0.25 * 100)
    assert energies[-1] == pytest.approx(expected)
    assert energies == sorted(energies)


@pytest.mark.parametrize("step_s", [3_600.0, -3_600.0])
def test_wall_clock_step_does_not_change_integrated_energy(clock: Clock, step_s: float) -> None:
    lib = make_fake(FakeGpu("GPU-pascal", supports_energy_field=False, power_mw=100_000))
    with installed(lib):
        source = opened(clock)
        source.read()
        tick(lib, clock, 1.0)
        assert source.read()[0].energy_j == pytest.approx(100.0)
        # NTP steps the wall clock (and so the driver's field timestamps) by an hour; 1 s passes.
        lib.advance(step_s)
        clock.wall += int(step_s * S)
        tick(lib, clock, 1.0)
        (r0,) = source.read()
    assert r0.energy_j == pytest.approx(200.0)
    assert r0.time_ns == lib.clock_us * 1000


def test_integration_without_instant_field_uses_monotonic_time(clock: Clock) -> None:
    lib = make_fake(FakeGpu("GPU-k80", supports_energy_field=False, supports_instant_power=False))
    with installed(lib):
        source = opened(clock)
        lib.gpus[0].power_avg_mw = 60_000
        source.read()
        clock.mono += 2 * S
        lib.gpus[0].power_avg_mw = 80_000
        (r0,) = source.read()
    assert r0.energy_j == pytest.approx(140.0)


def test_counter_reset_keeps_total_monotonic(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    source.read()
    fake.gpus[0].energy_mj = 1_100_000
    tick(fake, clock, 1)
    assert by_id(source.read())["gpu0"].energy_j == pytest.approx(1_100.0)  # type: ignore[attr-defined]
    # Driver reload: the counter restarts from zero and has counted 30 J since.
    fake.gpus[0].energy_mj = 30_000
    tick(fake, clock, 1)
    assert by_id(source.read())["gpu0"].energy_j == pytest.approx(1_130.0)  # type: ignore[attr-defined]
    fake.gpus[0].energy_mj = 40_000
    tick(fake, clock, 1)
    assert by_id(source.read())["gpu0"].energy_j == pytest.approx(1_140.0)  # type: ignore[attr-defined]


# -- lost GPUs -----------------------------------------------------------------------------------------------


def test_lost_gpu_is_left_out_retried_with_backoff_and_recovers(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    assert len(source.read()) == 2
    fake.gpus[1].energy_mj += 10_000
    fake.gpus[1].lost = True
    tick(fake, clock, 0.1)
    readings = by_id(source.read())
    assert set(readings) == {"gpu0"}
    errors = source.device_errors()
    assert set(errors) == {"gpu1"}
    assert "lost" in errors["gpu1"].lower()

    # Retries at 1, 2, 4, 8 ... s after each failure; reads in between do not touch the GPU.
    for backoff in (1.0, 2.0, 4.0, 8.0):
        tries = fake.count("nvmlDeviceGetHandleByUUID", 1)
        tick(fake, clock, backoff - 0.05)
        assert set(by_id(source.read())) == {"gpu0"}
        assert fake.count("nvmlDeviceGetHandleByUUID", 1) == tries, f"retried before {backoff} s"
        tick(fake, clock, 0.05)
        assert set(by_id(source.read())) == {"gpu0"}
        assert fake.count("nvmlDeviceGetHandleByUUID", 1) == tries + 1, f"no retry after {backoff} s"
        assert set(source.device_errors()) == {"gpu1"}

    # The GPU comes back with a new handle (the old one is invalid): re-acquired by UUID.
    fake.reattach(1)
    fake.gpus[1].energy_mj += 5_000
    tick(fake, clock, 16.0)
    uuid_calls = fake.count("nvmlDeviceGetHandleByUUID", 1)
    readings = by_id(source.read())
    assert set(readings) == {"gpu0", "gpu1"}
    assert fake.count("nvmlDeviceGetHandleByUUID", 1) == uuid_calls + 1
    assert source.device_errors() == {}
    # Energy counted while it was away is kept: 2000 J + 10 J + 5 J.
    assert readings["gpu1"].energy_j == pytest.approx(2_015.0)  # type: ignore[attr-defined]
    tick(fake, clock, 0.1)
    assert set(by_id(source.read())) == {"gpu0", "gpu1"}


def test_backoff_caps_at_sixty_seconds(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    source.read()
    fake.gpus[0].lost = True
    source.read()
    attempts = []
    for _ in range(1000):  # 250 s of reads at 0.25 s
        tick(fake, clock, 0.25)
        before = fake.count("nvmlDeviceGetHandleByUUID", 0)
        source.read()
        if fake.count("nvmlDeviceGetHandleByUUID", 0) > before:
            attempts.append(clock.mono)
    gaps = [(b - a) / S for a, b in itertools.pairwise(attempts)]
    assert gaps[:5] == pytest.approx([2.0, 4.0, 8.0, 16.0, 32.0])
    assert gaps[5:] and all(g == pytest.approx(60.0) for g in gaps[5:])


def test_recovered_gpu_after_reset_stays_monotonic(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    source.read()
    fake.gpus[0].lost = True
    tick(fake, clock, 0.1)
    source.read()
    # The GPU was reset while lost: its counter restarted.
    fake.reattach(0)
    fake.gpus[0].energy_mj = 7_000
    tick(fake, clock, 1.0)
    r0 = by_id(source.read())["gpu0"]
    assert r0.energy_j == pytest.approx(1_007.0)  # type: ignore[attr-defined]


def test_reacquire_falls_back_to_index_when_uuid_lookup_fails(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    source.read()
    fake.gpus[0].lost = True
    tick(fake, clock, 0.1)
    source.read()
    fake.reattach(0)
    fake.gpus[0].uuid = "GPU-renamed"  # the UUID lookup now finds nothing
    tick(fake, clock, 1.0)
    index_calls = fake.count("nvmlDeviceGetHandleByIndex_v2", 0)
    assert "gpu0" in by_id(source.read())
    assert fake.count("nvmlDeviceGetHandleByIndex_v2", 0) == index_calls + 1


def test_every_gpu_failing_returns_empty(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    for gpu in fake.gpus:
        gpu.errors["nvmlDeviceGetFieldValues"] = pynvml.NVML_ERROR_UNKNOWN
    assert source.read() == []
    assert set(source.device_errors()) == {"gpu0", "gpu1"}
    assert source.read_status() == []


@pytest.mark.parametrize(
    ("function", "code"),
    [
        ("nvmlDeviceGetHandleByIndex_v2", pynvml.NVML_ERROR_GPU_IS_LOST),
        ("nvmlDeviceGetUUID", pynvml.NVML_ERROR_UNKNOWN),
    ],
)
def test_gpu_failing_discovery_is_kept_down_retried_and_recovers(
    fake: FakeNvmlLibrary, clock: Clock, function: str, code: int
) -> None:
    fake.gpus[1].errors[function] = code
    source = opened(clock)
    # Known but down: listed (so wattmeter_gpu_up is 0 for it), UUID and model unknown yet.
    assert [(d.device_id, d.index, d.uuid, d.model) for d in source.devices()] == [
        ("gpu0", 0, "GPU-aaaa", "NVIDIA H100 80GB HBM3"),
        ("gpu1", 1, "", ""),
    ]
    assert set(by_id(source.read())) == {"gpu0"}
    assert set(source.device_errors()) == {"gpu1"}
    assert [s.device_id for s in source.read_status()] == ["gpu0"]

    # Retried with the per-GPU backoff: 1 s after the failure at open, then 2 s.
    tries = fake.count("nvmlDeviceGetHandleByIndex_v2", 1)
    tick(fake, clock, 0.9)
    source.read()
    assert fake.count("nvmlDeviceGetHandleByIndex_v2", 1) == tries
    tick(fake, clock, 0.1)
    assert set(by_id(source.read())) == {"gpu0"}
    assert fake.count("nvmlDeviceGetHandleByIndex_v2", 1) == tries + 1
    tick(fake, clock, 1.9)
    source.read()
    assert fake.count("nvmlDeviceGetHandleByIndex_v2", 1) == tries + 1

    del fake.gpus[1].errors[function]
    tick(fake, clock, 0.1)
    readings = by_id(source.read())
    assert set(readings) == {"gpu0", "gpu1"}
    assert readings["gpu1"].energy_j == pytest.approx(2_000.0)  # type: ignore[attr-defined]
    assert source.device_errors() == {}
    info = source.devices()[1]
    assert (info.uuid, info.model, info.method) == ("GPU-bbbb", "NVIDIA A100-SXM4-40GB", EnergyMethod.COUNTER)
    fake.gpus[1].energy_mj += 1_000
    tick(fake, clock, 0.1)
    assert by_id(source.read())["gpu1"].energy_j == pytest.approx(2_001.0)  # type: ignore[attr-defined]
    assert [s.device_id for s in source.read_status()] == ["gpu0", "gpu1"]


def test_every_gpu_failing_discovery_still_opens_with_gpus_down(fake: FakeNvmlLibrary, clock: Clock) -> None:
    for gpu in fake.gpus:
        gpu.lost = True
    source = opened(clock)
    assert [d.device_id for d in source.devices()] == ["gpu0", "gpu1"]
    assert source.read() == []
    assert set(source.device_errors()) == {"gpu0", "gpu1"}


def test_per_field_error_other_than_not_supported_marks_gpu_down(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    fake.gpus[0].field_errors[pynvml.NVML_FI_DEV_ENERGY] = pynvml.NVML_ERROR_GPU_IS_LOST
    assert set(by_id(source.read())) == {"gpu1"}
    assert set(source.device_errors()) == {"gpu0"}


def test_uninitialized_nvml_raises_source_error(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    fake.initialized = False
    with pytest.raises(SourceError):
        source.read()


def test_driver_reload_raises_then_reinitialises_after_backoff(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    source.read()
    fake.gpus[0].energy_mj += 100_000
    tick(fake, clock, 1.0)
    assert by_id(source.read())["gpu0"].energy_j == pytest.approx(1_100.0)  # type: ignore[attr-defined]

    # The driver is unloaded: NVML answers UNINITIALIZED, and cannot be initialised until the driver is back.
    fake.reload_driver()
    fake.init_result = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    tick(fake, clock, 0.1)
    with pytest.raises(SourceError):
        source.read()
    assert source.read_status() == []  # the slow path stays off NVML meanwhile, and does not raise
    inits = fake.count("nvmlInitWithFlags")
    tick(fake, clock, 0.9)
    with pytest.raises(SourceError):
        source.read()
    assert fake.count("nvmlInitWithFlags") == inits, "re-initialised before the 1 s backoff"
    tick(fake, clock, 0.1)
    shutdowns = fake.count("nvmlShutdown")
    with pytest.raises(SourceError, match="re-initialisation failed"):
        source.read()
    assert fake.count("nvmlInitWithFlags") == inits + 1
    assert fake.count("nvmlShutdown") == shutdowns + 1

    # The driver is back, its energy counters restarted from 0 (and counted a little since).
    fake.init_result = pynvml.NVML_SUCCESS
    fake.gpus[0].energy_mj = 30_000
    fake.gpus[1].energy_mj = 5_000
    tick(fake, clock, 1.9)
    with pytest.raises(SourceError):
        source.read()  # the backoff doubled to 2 s
    assert fake.count("nvmlInitWithFlags") == inits + 1
    tick(fake, clock, 0.1)
    readings = by_id(source.read())
    assert fake.count("nvmlInitWithFlags") == inits + 2
    assert set(readings) == {"gpu0", "gpu1"}
    # Handles were re-acquired (the old ones are invalid), by UUID, keeping the totals monotonic.
    assert fake.count("nvmlDeviceGetHandleByUUID", 0) == 1
    assert fake.count("nvmlDeviceGetHandleByUUID", 1) == 1
    assert readings["gpu0"].energy_j == pytest.approx(1_130.0)  # type: ignore[attr-defined]
    assert readings["gpu1"].energy_j == pytest.approx(2_005.0)  # type: ignore[attr-defined]
    assert source.device_errors() == {}
    fake.gpus[0].energy_mj = 40_000
    tick(fake, clock, 0.1)
    assert by_id(source.read())["gpu0"].energy_j == pytest.approx(1_140.0)  # type: ignore[attr-defined]
    assert [s.device_id for s in source.read_status()] == ["gpu0", "gpu1"]


def test_library_reinit_backoff_doubles_to_sixty_seconds(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    source.read()
    fake.reload_driver()
    fake.init_result = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    with pytest.raises(SourceError):
        source.read()
    attempts = []
    for _ in range(1200):  # 300 s of reads at 0.25 s
        tick(fake, clock, 0.25)
        before = fake.count("nvmlInitWithFlags")
        with pytest.raises(SourceError):
            source.read()
        if fake.count("nvmlInitWithFlags") > before:
            attempts.append(clock.mono)
    gaps = [(b - a) / S for a, b in itertools.pairwise(attempts)]
    assert gaps[:5] == pytest.approx([2.0, 4.0, 8.0, 16.0, 32.0])
    assert gaps[5:] and all(g == pytest.approx(60.0) for g in gaps[5:])


def test_backoff_keeps_growing_when_nvml_fails_again_right_after_reinit(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    source.read()
    for gpu in fake.gpus:  # NVML initialises each time, then fails again before any GPU answers
        gpu.errors["nvmlDeviceGetFieldValues"] = pynvml.NVML_ERROR_UNINITIALIZED
    attempts = []
    for _ in range(200):  # 50 s of reads
        tick(fake, clock, 0.25)
        before = fake.count("nvmlInitWithFlags")
        with pytest.raises(SourceError):
            source.read()
        if fake.count("nvmlInitWithFlags") > before:
            attempts.append(clock.mono)
    gaps = [(b - a) / S for a, b in itertools.pairwise(attempts)]
    assert gaps[:4] == pytest.approx([2.0, 4.0, 8.0, 16.0])


def test_integrated_gpu_restarts_its_time_base_after_reinit(clock: Clock) -> None:
    lib = make_fake(FakeGpu("GPU-pascal", supports_energy_field=False, power_mw=100_000))
    with installed(lib):
        source = opened(clock)
        source.read()
        tick(lib, clock, 1.0)
        assert source.read()[0].energy_j == pytest.approx(100.0)
        lib.reload_driver()
        tick(lib, clock, 0.1)
        with pytest.raises(SourceError):
            source.read()
        tick(lib, clock, 1.0)
        # The first reading after re-initialisation is a new start: the 1.1 s without NVML add nothing.
        assert source.read()[0].energy_j == pytest.approx(100.0)
        tick(lib, clock, 1.0)
        assert source.read()[0].energy_j == pytest.approx(200.0)


# -- unavailable ---------------------------------------------------------------------------------------------


def test_library_not_found_is_unavailable(clock: Clock) -> None:
    with library_missing(), pytest.raises(SourceUnavailable, match="not found"):
        NvmlSource(monotonic_ns=clock.monotonic_ns).open()


def test_driver_not_loaded_is_unavailable(clock: Clock) -> None:
    lib = make_fake()
    lib.init_result = pynvml.NVML_ERROR_DRIVER_NOT_LOADED
    with installed(lib), pytest.raises(SourceUnavailable, match="driver not loaded") as info:
        NvmlSource().open()
    assert "\n" not in str(info.value)


def test_no_gpus_is_unavailable() -> None:
    lib = FakeNvmlLibrary([])
    with installed(lib), pytest.raises(SourceUnavailable):
        NvmlSource().open()
    assert not lib.initialized


def test_close_swallows_errors(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    fake.initialized = False  # nvmlShutdown now fails
    source.close()
    assert fake.count("nvmlShutdown") == 1
    source.close()  # closing twice does not shut NVML down twice
    assert fake.count("nvmlShutdown") == 1


# -- status --------------------------------------------------------------------------------------------------


def test_read_status_fields_processes_and_per_process_utilisation(clock: Clock) -> None:
    gpu = FakeGpu(
        "GPU-status",
        power_limit_mw=650_000,
        utilization_gpu=87,
        memory_used=12_345_678,
        temperature_c=61,
        sm_clock_mhz=1755,
        processes=[
            FakeProcess(101, used_memory_bytes=1 << 30),
            FakeProcess(202, used_memory_bytes=None),
            FakeProcess(303, used_memory_bytes=2 << 20, graphics=True),
        ],
        util_samples=[
            FakeUtilSample(101, timestamp_us=20, sm_util=55),
            FakeUtilSample(101, timestamp_us=10, sm_util=40),
            FakeUtilSample(303, timestamp_us=15, sm_util=5),
        ],
    )
    lib = make_fake(gpu)
    with installed(lib):
        source = opened(clock)
        (status,) = source.read_status()
        assert status.device_id == "gpu0"
        assert status.power_limit_w == pytest.approx(650.0)
        assert status.utilization_ratio == pytest.approx(0.87)
        assert status.memory_used_bytes == 12_345_678
        assert status.temperature_c == pytest.approx(61.0)
        assert status.sm_clock_hz == pytest.approx(1_755e6)
        assert status.module_power_w is None
        procs = {p.pid: p for p in status.processes}
        assert set(procs) == {101, 202, 303}
        assert procs[101].used_memory_bytes == 1 << 30
        assert procs[202].used_memory_bytes is None
        assert procs[303].used_memory_bytes == 2 << 20
        assert procs[101].sm_utilization_ratio == pytest.approx((0.55 + 0.40) / 2)  # the mean over the interval
        assert procs[202].sm_utilization_ratio == 0.0  # no sample while others had some: it ran no kernel
        assert procs[303].sm_utilization_ratio == pytest.approx(0.05)

        # Only samples newer than the last seen one count; none new means no utilisation (NOT_FOUND).
        (status,) = source.read_status()
        assert all(p.sm_utilization_ratio is None for p in status.processes)
        gpu.util_samples.append(FakeUtilSample(202, timestamp_us=30, sm_util=12))  # type: ignore[union-attr]
        (status,) = source.read_status()
        procs = {p.pid: p for p in status.processes}
        assert procs[202].sm_utilization_ratio == pytest.approx(0.12)
        assert procs[101].sm_utilization_ratio == 0.0


def test_read_status_not_supported_fields_are_none(clock: Clock) -> None:
    gpu = FakeGpu(
        "GPU-bare",
        power_limit_mw=None,
        utilization_gpu=None,
        memory_used=None,
        temperature_c=None,
        sm_clock_mhz=None,
        util_samples=None,
        processes=[FakeProcess(7, used_memory_bytes=100)],
    )
    lib = make_fake(gpu)
    with installed(lib):
        source = opened(clock)
        (status,) = source.read_status()
    assert status.power_limit_w is None
    assert status.utilization_ratio is None
    assert status.memory_used_bytes is None
    assert status.temperature_c is None
    assert status.sm_clock_hz is None
    assert [(p.pid, p.used_memory_bytes, p.sm_utilization_ratio) for p in status.processes] == [(7, 100, None)]


def test_read_status_skips_gpu_on_other_errors(
    fake: FakeNvmlLibrary, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    source = opened(clock)
    fake.gpus[0].errors["nvmlDeviceGetTemperature"] = pynvml.NVML_ERROR_UNKNOWN
    with caplog.at_level(logging.WARNING, logger="collector.sources.nvml"):
        for _ in range(3):
            assert [s.device_id for s in source.read_status()] == ["gpu1"]
        fake.gpus[0].errors["nvmlDeviceGetTemperature"] = pynvml.NVML_ERROR_IN_USE
        source.read_status()
        source.read_status()
    # A warning once per distinct reason, not one per slow read.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert all("gpu0" in w for w in warnings)
    # The slow path reports, it does not decide: the fast path still reads gpu0.
    assert set(by_id(source.read())) == {"gpu0", "gpu1"}
    assert source.device_errors() == {}


@pytest.mark.parametrize(
    "function",
    [
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
        "nvmlDeviceGetProcessUtilization",
    ],
)
def test_no_permission_on_process_queries_keeps_the_rest_of_the_status(
    clock: Clock, caplog: pytest.LogCaptureFixture, function: str
) -> None:
    gpu = FakeGpu(
        "GPU-container",
        power_limit_mw=650_000,
        temperature_c=61,
        processes=[FakeProcess(101, used_memory_bytes=1 << 30), FakeProcess(303, graphics=True)],
        util_samples=[FakeUtilSample(101, timestamp_us=20, sm_util=55)],
        errors={function: pynvml.NVML_ERROR_NO_PERMISSION},
    )
    lib = make_fake(gpu)
    with installed(lib), caplog.at_level(logging.WARNING, logger="collector.sources.nvml"):
        source = opened(clock)
        (status,) = source.read_status()
        source.read_status()
    assert status.power_limit_w == pytest.approx(650.0)
    assert status.temperature_c == pytest.approx(61.0)
    assert status.utilization_ratio == pytest.approx(0.5)
    procs = {p.pid: p.sm_utilization_ratio for p in status.processes}
    expected = {
        "nvmlDeviceGetComputeRunningProcesses_v3": {303: 0.0},  # 101 had samples, 303 none: it ran no kernel
        "nvmlDeviceGetGraphicsRunningProcesses_v3": {101: pytest.approx(0.55)},
        "nvmlDeviceGetProcessUtilization": {101: None, 303: None},
    }[function]
    assert procs == expected
    assert status.processes_listed is (function != "nvmlDeviceGetComputeRunningProcesses_v3")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # once, with the fix
    assert "hostPID" in warnings[0]


def test_read_status_single_call_not_supported_leaves_rest(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    fake.gpus[0].errors["nvmlDeviceGetClockInfo"] = pynvml.NVML_ERROR_NOT_SUPPORTED
    status = {s.device_id: s for s in source.read_status()}
    assert status["gpu0"].sm_clock_hz is None
    assert status["gpu0"].temperature_c == pytest.approx(45.0)
    assert status["gpu1"].sm_clock_hz == pytest.approx(1_980e6)


# -- MIG and module power ------------------------------------------------------------------------------------


def test_mig_attributes(clock: Clock) -> None:
    lib = make_fake(
        FakeGpu("GPU-mig", mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE, mig_slots=7, mig_instances=(0, 1, 4)),
        FakeGpu("GPU-nomig", mig_mode=pynvml.NVML_DEVICE_MIG_DISABLE),
        FakeGpu("GPU-old"),
    )
    with installed(lib):
        source = opened(clock)
        attrs = [dict(d.attributes) for d in source.devices()]
    assert attrs[0] == {"mig_mode": "enabled", "mig_instances": "3", "power_scope": "gpu"}
    assert attrs[1] == {"mig_mode": "disabled", "power_scope": "gpu"}
    assert attrs[2] == {"mig_mode": "unsupported", "power_scope": "gpu"}


def test_grace_hopper_module_power(clock: Clock) -> None:
    lib = make_fake(
        FakeGpu("GPU-gh200", name="NVIDIA GH200 480GB", supports_module_power=True, module_power_mw=612_000),
        FakeGpu("GPU-h100"),
    )
    with installed(lib):
        source = opened(clock)
        assert [dict(d.attributes)["power_scope"] for d in source.devices()] == ["module", "gpu"]
        assert source.read_status()[0].module_power_w is None  # no fast read yet
        lib.calls.clear()
        source.read()
        # Module power rides in the same single field-values call.
        assert lib.count("nvmlDeviceGetFieldValues", 0) == 1
        status = {s.device_id: s for s in source.read_status()}
    assert status["gpu0"].module_power_w == pytest.approx(612.0)
    assert status["gpu1"].module_power_w is None


# -- strictness ----------------------------------------------------------------------------------------------


def test_open_and_status_call_exactly_the_nvml_functions_they_mean_to(fake: FakeNvmlLibrary, clock: Clock) -> None:
    source = opened(clock)
    per_gpu = {name for name, index in fake.calls if index == 0}
    assert per_gpu == {
        "nvmlDeviceGetHandleByIndex_v2",
        "nvmlDeviceGetUUID",
        "nvmlDeviceGetName",
        "nvmlDeviceGetFieldValues",
        "nvmlDeviceGetMigMode",
    }
    assert fake.count("nvmlDeviceGetFieldValues", 0) == 1  # the fields are probed in one call
    assert {name for name, index in fake.calls if index is None} == {"nvmlInitWithFlags", "nvmlDeviceGetCount_v2"}

    fake.calls.clear()
    source.read_status()
    status_calls = {
        "nvmlDeviceGetEnforcedPowerLimit",
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetMemoryInfo",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetClockInfo",
        "nvmlDeviceGetComputeRunningProcesses_v3",
        "nvmlDeviceGetGraphicsRunningProcesses_v3",
        "nvmlDeviceGetProcessUtilization",
    }
    # Each once per GPU; the slow path never touches the fast path's fields.
    assert sorted(fake.calls) == sorted((name, index) for name in status_calls for index in (0, 1))
    source.close()


def test_source_calls_pynvml_with_real_signatures(
    fake: FakeNvmlLibrary, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Autospecced wrappers fail on a misspelled name or a wrong argument list, before reaching the fake.
    for name in (
        "nvmlDeviceGetFieldValues",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetHandleByUUID",
        "nvmlDeviceGetTemperature",
        "nvmlDeviceGetClockInfo",
        "nvmlDeviceGetProcessUtilization",
    ):
        real = getattr(pynvml, name)
        monkeypatch.setattr(pynvml, name, mock.create_autospec(real, side_effect=real))
    fake.gpus[1].supports_instant_power = False
    source = opened(clock)
    source.read()
    fake.gpus[0].lost = True
    source.read()
    fake.gpus[0].lost = False
    clock.advance(2)
    source.read()
    source.read_status()
    assert pynvml.nvmlDeviceGetPowerUsage.call_count == 3  # gpu1, on each read
    pynvml.nvmlDeviceGetHandleByUUID.assert_called_once_with("GPU-aaaa")
