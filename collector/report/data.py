"""What ``wattmeter report`` says, gathered from the aggregator's store: one ``Report`` that every format renders.

Energy comes from the 1-minute rollups, read an hour at a time (``Store.workload_energy``); an hour's energy is
priced at that hour's mean intensity and price (so CO2 is exact for intensity that changes on UTC hours, and
spreads energy evenly within an hour otherwise). Host totals are the devices' own rollups (those that add into
host totals); groups by workload and phase are the workloads' rollups, idle/system/other included, so they add up
to the same total. Requests (J/request, J/token) come from the store's request results.

Training steps (``collector.client.step()``, per workload and minute in the store) give J per step: a workload's
energy in the hours it stepped over the steps it did in them, and its mean power and steps/s over the minutes it
stepped. Workloads the advisor may move: phase training, a ``flexible`` label of true/1/yes (any case, from the
labels its processes registered with), or a name ``--flexible REGEX`` matches.

Per model (and ``--by model``): counts, energy and percentiles over every request of the period; kg and cost from
the store's sums of active J per model and hour (``Store.request_hours``), priced at the hour the requests started
in. Only the power-cap quartiles read requests one by one, the newest ``MAX_REQUESTS``.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from collector.carbon.series import J_PER_KWH, IntensitySeries
from collector.report.advisor import ShiftAdvice, advise
from collector.report.rates import HOUR_NS, HourlyRates, hourly_rates
from collector.store.base import RequestResult, Store, StoredLabelsRow

GroupBy = Literal["workload", "phase", "model", "host"]
TOP_WORKLOADS = 10
MAX_REQUESTS = 200_000  # requests read for the power-cap evidence (the per-model figures count them all)
POWER_BINS = 4
WorkloadKey = tuple[str, str, str, str]  # host, workload, phase, job
FLEXIBLE_LABEL = "flexible"
FLEXIBLE_VALUES = frozenset({"true", "1", "yes"})
MINUTE_S = 60


@dataclass(frozen=True)
class Amount:
    """Energy and what it amounted to over one period."""

    kwh: float
    kg: float
    cost: float | None
    uncovered_kwh: float = 0.0  # energy at times without intensity data (not in kg)


@dataclass(frozen=True)
class GroupRow:
    name: str
    now: Amount
    previous: Amount | None  # the same group in the previous period; None: absent then
    phase: str = ""


@dataclass(frozen=True)
class ModelRow:
    model: str
    requests: int
    energy_kwh: float
    p50_j: float
    p95_j: float
    joules_per_output_token: float | None
    kg: float | None = None
    cost: float | None = None


@dataclass(frozen=True)
class PowerBin:
    """Requests of one model whose mean power (their J over their duration) fell in one quartile."""

    model: str
    quartile: int
    requests: int
    mean_w: float
    median_j_per_request: float
    joules_per_output_token: float | None


@dataclass(frozen=True)
class TrainingPower:
    """A GPU workload without units of work in the store: its energy and mean power over the hours it ran."""

    workload: str
    phase: str
    gpu_kwh: float
    hours_running: int
    mean_w: float


@dataclass(frozen=True)
class StepPowerBin:
    """The hours a workload stepped whose mean power (its J over the minutes it stepped) fell in one quartile."""

    quartile: int
    hours: int
    mean_w: float
    steps_per_s: float
    joules_per_step: float


@dataclass(frozen=True)
class StepPower:
    """A workload that reported training steps: J per step, and its steps/s against its mean power.

    Over the hours it stepped: ``energy_kwh`` on the devices that add into host totals, ``gpu_kwh`` on GPUs;
    ``mean_w`` and ``steps_per_s`` over the minutes it stepped (``stepping_s``). J per step is None without energy."""

    host: str
    workload: str
    phase: str
    job: str
    steps: int
    stepping_s: int
    energy_kwh: float
    gpu_kwh: float
    joules_per_step: float | None
    gpu_joules_per_step: float | None
    mean_w: float
    steps_per_s: float
    bins: list[StepPowerBin] = field(default_factory=list)


@dataclass(frozen=True)
class FlexibleWorkload:
    """A workload the shift advisor may move, and why: ``phase training``, ``label flexible=...``, ``--flexible
    REGEX``."""

    name: str  # host/workload/phase/job, as in the advisor's rows
    host: str
    workload: str
    phase: str
    job: str
    reasons: list[str]


@dataclass
class Report:
    since_ns: int
    until_ns: int
    by: GroupBy
    currency: str
    intensity: str  # how intensity was given
    pue: float
    total: Amount
    previous_total: Amount
    groups: list[GroupRow]
    groups_note: str
    phases: list[GroupRow]
    top_workloads: list[GroupRow]
    models: list[ModelRow]
    models_note: str
    shift: ShiftAdvice
    power_bins: list[PowerBin]
    training_power: list[TrainingPower]
    power_note: str
    hourly_kwh: list[float] = field(default_factory=list)  # the hosts' energy per hour, for the chart
    hourly_g_per_kwh: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    step_power: list[StepPower] = field(default_factory=list)
    step_note: str = ""
    flexible: list[FlexibleWorkload] = field(default_factory=list)


@dataclass
class _Period:
    hour_starts: npt.NDArray[np.int64]
    rates: HourlyRates
    hosts: dict[str, npt.NDArray[np.float64]]  # host -> J per hour (host-total devices)
    workloads: dict[WorkloadKey, npt.NDArray[np.float64]]  # J per hour
    gpu_j: dict[WorkloadKey, npt.NDArray[np.float64]]  # J per hour on GPUs


def _read_period(
    store: Store, series: IntensitySeries, since_ns: int, until_ns: int, gpus: set[tuple[str, str]]
) -> _Period:
    hour_starts = np.arange(since_ns, until_ns, HOUR_NS, dtype=np.int64)
    n = len(hour_starts)
    hosts: dict[str, npt.NDArray[np.float64]] = {}
    workloads: dict[WorkloadKey, npt.NDArray[np.float64]] = {}
    gpu_j: dict[WorkloadKey, npt.NDArray[np.float64]] = {}
    for i, start in enumerate(hour_starts.tolist()):
        for row in store.workload_energy(start, min(start + HOUR_NS, until_ns)):
            if not row.workload:
                hosts.setdefault(row.hostname, np.zeros(n))[i] += row.energy_j
                continue
            key = (row.hostname, row.workload, row.phase, row.job)
            workloads.setdefault(key, np.zeros(n))[i] += row.energy_j
            on_gpu = sum(j for device, j in row.by_device_j.items() if (row.hostname, device) in gpus)
            if on_gpu > 0:
                gpu_j.setdefault(key, np.zeros(n))[i] += on_gpu
    return _Period(hour_starts, hourly_rates(series, hour_starts), hosts, workloads, gpu_j)


def _amount(rates: HourlyRates, energy_j: npt.NDArray[np.float64]) -> Amount:
    footprint = rates.footprint(energy_j)
    return Amount(
        footprint.joules / J_PER_KWH, footprint.grams / 1000, footprint.cost, footprint.uncovered_j / J_PER_KWH
    )


def _sum(arrays: Sequence[npt.NDArray[np.float64]], n: int) -> npt.NDArray[np.float64]:
    total = np.zeros(n)
    for array in arrays:
        total += array
    return total


def _phase_label(workload: str, phase: str) -> str:
    return phase or workload  # idle/system/other carry phase ""


def _group_name(key: WorkloadKey, by: GroupBy) -> str:
    host, workload, phase, _ = key
    if by == "host":
        return host
    if by == "phase":
        return _phase_label(workload, phase)
    return workload


def _grouped(period: _Period, by: GroupBy) -> dict[str, npt.NDArray[np.float64]]:
    groups: dict[str, list[npt.NDArray[np.float64]]] = defaultdict(list)
    if by == "host":
        for host, energy in period.hosts.items():
            groups[host].append(energy)
    else:
        for key, energy in period.workloads.items():
            groups[_group_name(key, by)].append(energy)
    return {name: _sum(parts, len(period.hour_starts)) for name, parts in groups.items()}


def _group_rows(now: _Period, previous: _Period, by: GroupBy) -> list[GroupRow]:
    current = _grouped(now, by)
    before = _grouped(previous, by)
    rows = [
        GroupRow(name, _amount(now.rates, energy), _amount(previous.rates, before[name]) if name in before else None)
        for name, energy in current.items()
    ]
    return sorted(rows, key=lambda row: -row.now.kwh)


def _requests(store: Store, since_ns: int, until_ns: int) -> tuple[list[RequestResult], str]:
    try:
        results = store.requests(since_ns=since_ns, until_ns=until_ns, limit=MAX_REQUESTS)
    except NotImplementedError:
        return [], "no request data: this store does not keep request results"
    done = [r for r in results if r.status in ("final", "approximate") and r.active_j is not None]
    if not done:
        return [], "no request data in the period"
    note = f"the newest {MAX_REQUESTS} requests only" if len(results) >= MAX_REQUESTS else ""
    return done, note


def _model_energy(store: Store, period: _Period) -> dict[str, npt.NDArray[np.float64]]:
    """Per model: its requests' active J per hour of the period, by the hour each request started in (summed by
    the store, so every request counts however many there are)."""
    n = len(period.hour_starts)
    since_ns = int(period.hour_starts[0])
    out: dict[str, npt.NDArray[np.float64]] = {}
    for row in store.request_hours(since_ns, since_ns + n * HOUR_NS):
        out.setdefault(row.model, np.zeros(n))[(row.hour_ns - since_ns) // HOUR_NS] += row.energy_j
    return out


def _model_rows(store: Store, period: _Period) -> tuple[list[ModelRow], str]:
    """Per model: requests, energy, percentiles, and kg and cost at the intensity and price of the hour each
    request started in (a request is seconds long: within an hour of exact for most; priced like the rest)."""
    since_ns = int(period.hour_starts[0])
    until_ns = since_ns + len(period.hour_starts) * HOUR_NS
    try:
        summary = store.request_summary("model", since_ns, until_ns)
    except NotImplementedError:
        return [], "no request data: this store does not keep request results"
    if not summary:
        return [], "no request data in the period"
    energy = _model_energy(store, period)
    rows = []
    for row in summary:
        hourly = energy.get(row.group)
        amount = _amount(period.rates, hourly) if hourly is not None else None
        rows.append(
            ModelRow(
                row.group or "(none)",
                row.count,
                row.energy_j / J_PER_KWH,
                row.p50_j,
                row.p95_j,
                row.joules_per_output_token,
                amount.kg if amount is not None else None,
                amount.cost if amount is not None else None,
            )
        )
    return rows, ""


def _power_bins(done: list[RequestResult]) -> list[PowerBin]:
    by_model: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    for result in done:
        duration_s = (result.end_ns - result.start_ns) / 1e9
        if result.active_j is None or duration_s <= 0:
            continue
        by_model[result.model].append((result.active_j / duration_s, result.active_j, result.output_tokens))
    bins = []
    for model in sorted(by_model):
        rows = sorted(by_model[model])
        if len(rows) < POWER_BINS * 2:
            continue  # too few requests to compare power levels
        for quartile in range(POWER_BINS):
            part = rows[quartile * len(rows) // POWER_BINS : (quartile + 1) * len(rows) // POWER_BINS]
            tokens = sum(t for _, _, t in part)
            joules = sum(j for _, j, _ in part)
            bins.append(
                PowerBin(
                    model or "(none)",
                    quartile + 1,
                    len(part),
                    statistics.fmean(w for w, _, _ in part),
                    statistics.median(j for _, j, _ in part),
                    joules / tokens if tokens else None,
                )
            )
    return bins


def _training_power(period: _Period, stepped: set[WorkloadKey]) -> list[TrainingPower]:
    """GPU training workloads without steps in the store (those with steps are in ``StepPower``)."""
    rows = []
    for key, energy in period.gpu_j.items():
        _, workload, phase, _ = key
        if phase != "training" or key in stepped:
            continue
        running = int((energy > 0).sum())
        if running:
            rows.append(
                TrainingPower(
                    workload, phase, float(energy.sum()) / J_PER_KWH, running, float(energy.sum()) / (running * 3600)
                )
            )
    return sorted(rows, key=lambda row: -row.gpu_kwh)


def _read_steps(
    store: Store, hour_starts: npt.NDArray[np.int64], until_ns: int
) -> dict[WorkloadKey, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
    """Per workload: its steps and the minutes it stepped, per hour of ``hour_starts``."""
    n = len(hour_starts)
    out: dict[WorkloadKey, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]] = {}
    for i, start in enumerate(hour_starts.tolist()):
        for row in store.workload_steps(start, min(start + HOUR_NS, until_ns)):
            steps, minutes = out.setdefault(
                (row.hostname, row.workload, row.phase, row.job),
                (np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)),
            )
            steps[i] += row.steps
            minutes[i] += row.minutes
    return out


def _step_power(
    period: _Period, steps_by_key: dict[WorkloadKey, tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]
) -> list[StepPower]:
    rows = []
    n = len(period.hour_starts)
    for key, (steps, minutes) in steps_by_key.items():
        stepped = steps > 0
        total_steps = int(steps[stepped].sum())
        if total_steps <= 0:
            continue
        energy = period.workloads.get(key, np.zeros(n))
        gpu = period.gpu_j.get(key, np.zeros(n))
        energy_j = float(energy[stepped].sum())
        gpu_j = float(gpu[stepped].sum())
        seconds = int(minutes[stepped].sum()) * MINUTE_S
        bins = []
        hours = np.flatnonzero(stepped & (energy > 0))
        if len(hours) >= POWER_BINS * 2:
            # hours by their mean power while stepping: does the work per joule change with power?
            watts = energy[hours] / (minutes[hours] * MINUTE_S)
            ordered = hours[np.argsort(watts, kind="stable")]
            for quartile in range(POWER_BINS):
                part = ordered[quartile * len(ordered) // POWER_BINS : (quartile + 1) * len(ordered) // POWER_BINS]
                part_s = float(minutes[part].sum()) * MINUTE_S
                part_steps = float(steps[part].sum())
                bins.append(
                    StepPowerBin(
                        quartile + 1,
                        len(part),
                        float(energy[part].sum()) / part_s,
                        part_steps / part_s,
                        float(energy[part].sum()) / part_steps,
                    )
                )
        rows.append(
            StepPower(
                *key,
                steps=total_steps,
                stepping_s=seconds,
                energy_kwh=energy_j / J_PER_KWH,
                gpu_kwh=gpu_j / J_PER_KWH,
                joules_per_step=energy_j / total_steps if energy_j > 0 else None,
                gpu_joules_per_step=gpu_j / total_steps if gpu_j > 0 else None,
                mean_w=energy_j / seconds if seconds else 0.0,
                steps_per_s=total_steps / seconds if seconds else 0.0,
                bins=bins,
            )
        )
    return sorted(rows, key=lambda row: (-row.energy_kwh, row.host, row.workload, row.phase, row.job))


def is_flexible_label(labels: dict[str, str]) -> bool:
    """Whether a workload's labels mark it flexible: ``flexible`` true, 1 or yes, in any case."""
    return labels.get(FLEXIBLE_LABEL, "").strip().lower() in FLEXIBLE_VALUES


def _labels(store: Store) -> dict[WorkloadKey, dict[str, str]]:
    rows: list[StoredLabelsRow] = store.workload_labels()
    return {(row.hostname, row.workload, row.phase, row.job): row.labels for row in rows}


def _flexible(
    workloads: dict[WorkloadKey, npt.NDArray[np.float64]],
    labels: dict[WorkloadKey, dict[str, str]],
    patterns: Sequence[re.Pattern[str]],
) -> list[FlexibleWorkload]:
    out = []
    for key in sorted(workloads):
        _, workload, phase, _ = key
        reasons = []
        if phase == "training":
            reasons.append("phase training")
        own = labels.get(key, {})
        if is_flexible_label(own):
            reasons.append(f"label {FLEXIBLE_LABEL}={own[FLEXIBLE_LABEL]}")
        reasons += [f"--flexible {p.pattern}" for p in patterns if p.search(workload)]
        if reasons:
            out.append(FlexibleWorkload("/".join(key), *key, reasons))
    return out


def build_report(
    store: Store,
    series: IntensitySeries,
    since_ns: int,
    until_ns: int,
    *,
    by: GroupBy = "workload",
    window_s: float = 86400.0,
    flexible: Sequence[str] = (),
    intensity: str = "",
) -> Report:
    """The report for ``[since_ns, until_ns)`` (both floored to whole UTC hours), against the period of the same
    length before it. ``flexible``: regular expressions of workload names the advisor may move, besides phase
    training and workloads labelled flexible=true."""
    since_ns -= since_ns % HOUR_NS
    until_ns -= until_ns % HOUR_NS
    if until_ns <= since_ns:
        until_ns = since_ns + HOUR_NS
    length = until_ns - since_ns
    gpus = {
        (host.hostname, device.device_id) for host in store.hosts() for device in host.devices if device.kind == "gpu"
    }
    now = _read_period(store, series, since_ns, until_ns, gpus)
    previous = _read_period(store, series, since_ns - length, since_ns, gpus)
    n = len(now.hour_starts)
    hosts_now = _sum(list(now.hosts.values()), n)
    notes = []
    total = _amount(now.rates, hosts_now)
    if total.uncovered_kwh > 0:
        notes.append(f"{total.uncovered_kwh:.3f} kWh at times without intensity data are not in the CO2 figures")

    groups_note = ""
    done, requests_note = _requests(store, since_ns, until_ns)
    models, models_note = _model_rows(store, now)
    if by == "model":
        before = {m.model: m for m in _model_rows(store, previous)[0]}
        groups = [GroupRow(m.model, _model_amount(m), _previous_amount(before.get(m.model))) for m in models]
        groups_note = models_note or "request energy (active J), not the hosts' whole energy"
    else:
        groups = _group_rows(now, previous, by)

    phases = _group_rows(now, previous, "phase")
    workload_rows = [
        GroupRow(f"{key[1]}", _amount(now.rates, energy), None, phase=_phase_label(key[1], key[2]))
        for key, energy in now.workloads.items()
        if key[2]  # real workloads, not idle/system/other
    ]
    merged: dict[tuple[str, str], list[Amount]] = defaultdict(list)
    for row in workload_rows:
        merged[(row.name, row.phase)].append(row.now)
    top = sorted(
        (
            GroupRow(name, Amount(sum(a.kwh for a in parts), sum(a.kg for a in parts), _sum_cost(parts)), None, phase)
            for (name, phase), parts in merged.items()
        ),
        key=lambda row: -row.now.kwh,
    )[:TOP_WORKLOADS]

    patterns = [re.compile(p) for p in flexible]
    movable = _flexible(now.workloads, _labels(store), patterns)
    flexible_energy = {row.name: now.workloads[(row.host, row.workload, row.phase, row.job)] for row in movable}
    shift = advise(series, now.hour_starts, flexible_energy, window_s)
    steps_by_key = _read_steps(store, now.hour_starts, until_ns)
    step_power = _step_power(now, steps_by_key)
    step_note = "" if step_power else "no training steps in the period (collector.client.step() reports them)"

    power_note = requests_note or ("" if done else "no request data")  # a capped read says so here
    return Report(
        since_ns,
        until_ns,
        by,
        series.currency,
        intensity,
        series.pue,
        total,
        _amount(previous.rates, _sum(list(previous.hosts.values()), len(previous.hour_starts))),
        groups,
        groups_note,
        phases,
        top,
        models,
        models_note,
        shift,
        _power_bins(done),
        _training_power(now, set(steps_by_key)),
        power_note,
        (hosts_now / J_PER_KWH).tolist(),
        now.rates.grams_per_kwh.tolist(),
        notes,
        step_power,
        step_note,
        movable,
    )


def _model_amount(row: ModelRow) -> Amount:
    return Amount(row.energy_kwh, row.kg or 0.0, row.cost)


def _previous_amount(row: ModelRow | None) -> Amount | None:
    return None if row is None else _model_amount(row)


def _sum_cost(parts: Sequence[Amount]) -> float | None:
    costs = [a.cost for a in parts]
    return None if any(c is None for c in costs) else sum(c for c in costs if c is not None)
