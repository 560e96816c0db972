"""Random counter histories through a fake powercap tree: the exported total never goes backwards and equals the
true energy to the counter's resolution (1 uJ), across wraps and a zone that vanishes and comes back."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from collector.readings import DeviceReading
from collector.sources.rapl import RaplSource
from tests.fakes.powercap import FakePowercap

MAX_RANGE_UJ = 1_000_000


@settings(max_examples=60, deadline=None)
@given(
    start=st.integers(min_value=0, max_value=MAX_RANGE_UJ - 1),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(min_value=0, max_value=MAX_RANGE_UJ - 1)),
            st.tuples(st.just("vanish"), st.integers(min_value=0, max_value=MAX_RANGE_UJ - 1)),
        ),
        max_size=25,
    ),
)
def test_total_is_monotonic_and_exact(start: int, steps: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as root:
        tree = FakePowercap(Path(root))
        zone = tree.add_zone("0", "package-0", energy_uj=start, max_energy_range_uj=MAX_RANGE_UJ)
        tree.add_zone("0:0", "core")  # stays, so the source as a whole keeps answering
        source = RaplSource(tree.class_dir, recheck_interval_s=0.0)
        source.open()

        def package() -> DeviceReading | None:
            return {r.device_id: r for r in source.read()}.get("cpu0")

        first = package()
        assert first is not None
        raw, true_uj, previous = start, 0, first.energy_j
        for kind, amount in steps:
            if kind == "vanish":
                # the zone goes away for a read, and comes back counting from `amount`: what it used while away
                # is unknowable, and must not be invented
                tree.remove_zone(zone)
                assert package() is None
                zone = tree.add_zone("0", "package-0", energy_uj=amount, max_energy_range_uj=MAX_RANGE_UJ)
                raw = amount
            else:
                raw = (raw + amount) % MAX_RANGE_UJ
                true_uj += amount
                tree.set_energy(zone, raw)
            reading = package()
            assert reading is not None
            assert reading.energy_j >= previous
            previous = reading.energy_j
            assert round((reading.energy_j - first.energy_j) * 1e6) == true_uj
