from __future__ import annotations

from collections import namedtuple

import pytest

from collector.readings import EnergyMethod
from collector.sources.cpu_model import CpuModelSource, busy_and_total_s

Times = namedtuple("Times", "user nice system idle iowait irq softirq steal guest guest_nice")


def times(busy: float, idle: float) -> Times:
    return Times(busy, 0.0, 0.0, idle, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


def test_busy_excludes_idle_iowait_steal_and_double_counted_guest() -> None:
    busy, total = busy_and_total_s(Times(10.0, 1.0, 2.0, 50.0, 5.0, 0.0, 0.0, 3.0, 4.0, 0.0))
    assert total == pytest.approx(68.0)  # 75 counted, less guest (4, inside user already) and steal (3)
    assert busy == pytest.approx(13.0)


def test_estimate_from_utilisation_is_labelled_model() -> None:
    sequence = iter([times(0.0, 0.0), times(2.0, 2.0), times(2.0, 6.0)])  # 4 cores: 50% then 0% busy
    source = CpuModelSource(watts_per_core=10.0, idle_watts=50.0, cpu_times=lambda: next(sequence), cpu_count=4)
    source.open()
    (info,) = source.devices()
    assert info.source == "model" and info.method is EnergyMethod.MODEL and info.package == "0"
    first = source.read()[0]
    assert first.power_w == pytest.approx(50.0 + 10.0 * 4 * 0.5)
    # 4 CPU-seconds across 4 cores = 1 s of wall time at 70 W
    assert first.energy_j == pytest.approx(70.0)
    second = source.read()[0]
    assert second.power_w == pytest.approx(50.0)
    assert second.energy_j == pytest.approx(70.0 + 50.0)


def test_counter_going_backwards_adds_nothing() -> None:
    sequence = iter([times(5.0, 5.0), times(1.0, 1.0)])
    source = CpuModelSource(10.0, 50.0, cpu_times=lambda: next(sequence), cpu_count=2)
    source.open()
    assert source.read()[0].energy_j == 0.0
