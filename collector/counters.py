"""Turn raw hardware energy counters, which wrap and reset, into totals that never go backwards."""

from __future__ import annotations


class EnergyCounter:
    """Accumulates a raw integer energy counter into a monotonic total.

    ``scale_j`` converts one raw unit to joules (1e-6 for RAPL's microjoules, 1e-3 for NVML's millijoules).
    With ``max_range`` set (RAPL's ``max_energy_range_uj``), a lower value than the last one is a wrap: the
    counter passed ``max_range`` and started again from 0. Without it (NVML's 64-bit counter cannot wrap in
    practice), a lower value is a reset (driver reload): the counter restarted from 0, so the new value is the
    energy used since then. Either way the total keeps growing.

    The total starts at the first raw value, so a counter that counts from driver load is exported as such.
    Arithmetic stays in integers; only the final total is scaled, so no rounding error accumulates.
    """

    __slots__ = ("_last", "_max_range", "_offset", "_rebased", "resets", "scale_j", "wraps")

    def __init__(self, scale_j: float, max_range: int | None = None) -> None:
        if max_range is not None and max_range <= 0:
            raise ValueError(f"max_range must be positive, got {max_range}")
        self.scale_j = scale_j
        self._max_range = max_range
        self._offset = 0
        self._last: int | None = None
        self._rebased = False
        self.wraps = 0
        self.resets = 0

    @property
    def started(self) -> bool:
        return self._last is not None

    @property
    def total_raw(self) -> int:
        return self._offset + (self._last or 0)

    @property
    def total_j(self) -> float:
        return self.total_raw * self.scale_j

    def rebase(self) -> None:
        """Forget the last raw value but keep the total: the next reading is a new baseline.

        For a counter read again after it was lost (a RAPL zone or a GPU that came back): its new value says
        nothing about the energy used while it was away, and must not be mistaken for a wrap or a reset.
        """
        if self._last is not None:
            self._offset += self._last
            self._last = None
            self._rebased = True

    def update(self, raw: int) -> int:
        """Feed one raw reading; returns the increment in raw units since the previous reading."""
        if raw < 0:
            raise ValueError(f"energy counter read negative value {raw}")
        last = self._last
        self._last = raw
        if last is None:
            if self._rebased:  # the total so far stays; this reading is only the new baseline
                self._offset -= raw
                self._rebased = False
            return 0
        if raw >= last:
            return raw - last
        if self._max_range is not None:
            self.wraps += 1
            self._offset += self._max_range
            return raw + self._max_range - last
        self.resets += 1
        self._offset += last
        return raw


class PowerIntegrator:
    """Integrates power samples (trapezoid rule) into energy, for devices without an energy counter."""

    __slots__ = ("_last_power_w", "_last_t_ns", "total_j")

    def __init__(self) -> None:
        self.total_j = 0.0
        self._last_t_ns: int | None = None
        self._last_power_w = 0.0

    def restart(self) -> None:
        """Keep the total but forget the last sample: nothing is integrated across a gap in the samples."""
        self._last_t_ns = None

    def update(self, power_w: float, t_ns: int) -> float:
        """Add a power sample taken at ``t_ns`` (any monotonic ns clock); returns the energy added."""
        added = 0.0
        if self._last_t_ns is not None and t_ns > self._last_t_ns:
            added = (power_w + self._last_power_w) / 2.0 * (t_ns - self._last_t_ns) / 1e9
            self.total_j += added
        if self._last_t_ns is None or t_ns > self._last_t_ns:
            self._last_t_ns = t_ns
            self._last_power_w = power_w
        return added
